"""The rollout engine on a real LMDB store, a fake control plane and a manual clock."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from atlas_sidecar_client.pb import events_pb2

from sidecar.config import RolloutConfig, StoreConfig
from sidecar.rollout import (
    ArmBatch,
    Collected,
    RegressionCase,
    RolloutConflictError,
    RolloutEngine,
    RolloutInputError,
    ShadowBatch,
    StoredObservations,
    TrafficBatch,
)
from sidecar.store import Store, StoreWriter, read_history
from sidecar.testing import FakeControlPlane


class Clock:
    def __init__(self) -> None:
        self.ms = 1_700_000_000_000

    def now_ms(self) -> int:
        return self.ms


class Traffic:
    """Per-step traffic whose candidate share follows the control plane's split."""

    def __init__(self, control: FakeControlPlane, cand_error: float = 0.01) -> None:
        self.control = control
        self.cand_error = cand_error
        #: Feedback rewards per candidate request (stable: one per three requests).
        self.cand_feedback = 1 / 3
        self.rps = 100
        self.rng = np.random.default_rng(7)
        self.candidate = ""

    def collect(self, rollout_id: str, cursor: int, now_ms: int) -> Collected:
        n = self.rps * 30
        w = self.control.weight_bps(self.candidate) / 10_000
        nc = int(n * w)

        def arm(k: int, err: float, feedback: float = 1 / 3) -> ArmBatch:
            return ArmBatch(
                200 * np.exp(self.rng.normal(0, 0.3, k)),
                self.rng.random(k) < err,
                self.rng.beta(3.6, 2.4, int(k * feedback)),
            )

        return Collected(
            TrafficBatch(arm(nc, self.cand_error, self.cand_feedback), arm(n - nc, 0.01)),
            ShadowBatch(),
            cursor + 1,
        )


class Prompts:
    def __init__(self, n: int = 3) -> None:
        self.n = n

    def cases(self, limit: int) -> list[RegressionCase]:
        return [RegressionCase(f"prompt {i}", f"answer {i}") for i in range(min(self.n, limit))]


def _config(**over: Any) -> RolloutConfig:
    base: dict[str, Any] = {
        "initial_stable_version": "v1",
        "unload_after_seconds": 60,
        "validation": {"enabled": False},
        "shadow": {"enabled": False},
        "canary": {"min_dwell_seconds": 60, "min_samples": 50, "max_dwell_seconds": 600},
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return RolloutConfig.model_validate(base)


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.cfg = StoreConfig(data_dir=tmp / "data", sync=False)
        self.store = Store(self.cfg)
        self.writer = StoreWriter(self.store, self.cfg)
        self.control = FakeControlPlane()
        self.clock = Clock()
        self.engines: list[RolloutEngine] = []

    async def open(self) -> None:
        self.store.open()
        await self.writer.start()

    async def engine(self, config: RolloutConfig, source: Any = None, **kw: Any) -> RolloutEngine:
        e = RolloutEngine(
            self.store,
            self.writer,
            self.control,
            config,
            clock=self.clock,
            source=source,
            autorun=False,
            **kw,
        )
        await e.start()
        self.engines.append(e)
        return e

    async def run(self, engine: RolloutEngine, seconds: float, step: float = 30) -> None:
        end = self.clock.ms + int(seconds * 1000)
        while self.clock.ms < end and engine.rollout_active():
            self.clock.ms += int(step * 1000)
            await engine.step()

    async def close(self) -> None:
        for e in self.engines:
            await e.shutdown()
        await self.writer.shutdown()
        self.store.close()

    def history(self, kind: str) -> list[dict[str, Any]]:
        with self.store.read() as txn:
            return list(read_history(txn, self.store, kinds=frozenset({kind})))


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path)
    await harness.open()
    yield harness
    await harness.close()


async def _canary(
    h: Harness, cand_error: float = 0.01, **over: Any
) -> tuple[RolloutEngine, Traffic]:
    traffic = Traffic(h.control, cand_error)
    traffic.candidate = "v2"
    engine = await h.engine(_config(**over), traffic)
    return engine, traffic


async def test_rollout_lifecycle_shutdown_before_start_and_twice(h: Harness) -> None:
    e = RolloutEngine(h.store, h.writer, h.control, _config(), autorun=False)
    await e.shutdown()
    await e.start()
    await e.shutdown()
    await e.shutdown()


async def test_rollout_good_candidate_walks_every_stage_and_is_promoted(h: Harness) -> None:
    engine, _ = await _canary(h)
    await engine.start_rollout("v2")
    assert engine.rollout_active()
    await h.run(engine, 3600)
    rec = engine.list_rollouts()[0]
    assert rec.state == "PROMOTED"
    weights = [h.control.weight_bps("v2") for _ in [0]]
    assert weights == [10_000]
    stages = [d for d in h.control.history if d.routes[0].version == "v2"]
    assert [d.routes[0].weight_bps for d in stages] == [100, 500, 1000, 2500, 5000, 10_000]
    revisions = [d.revision for d in h.control.history]
    assert revisions == sorted(set(revisions))
    assert engine.stable_version == "v2" and not engine.rollout_active()
    promoted = h.history("promoted")
    assert len(promoted) == 1
    assert promoted[0]["candidate_feedback_n"] > 0 and promoted[0]["stable_feedback_n"] > 0
    assert promoted[0]["improvement"] is not None
    assert len(h.history("rollout_transition")) == len(rec.transitions)


async def test_rollout_bad_candidate_rolled_back_before_ten_percent(h: Harness) -> None:
    engine, _ = await _canary(h, cand_error=0.08)
    await engine.start_rollout("v2")
    await h.run(engine, 3600)
    rec = engine.list_rollouts()[0]
    assert rec.state == "ROLLED_BACK"
    assert "error_rate" in rec.transitions[-1].reason
    assert (
        max(d.routes[0].weight_bps for d in h.control.history if d.routes[0].version == "v2")
        <= 1000
    )
    final = h.control.desired()
    assert final is not None and final.routes == (final.routes[0],)
    assert final.routes[0].version == "v1" and final.routes[0].weight_bps == 10_000
    rb = h.history("rollback")
    assert len(rb) == 1 and rb[0]["candidate_requests"] > 0
    assert engine.last_rollback_seconds is not None


def _max_weight(h: Harness, version: str) -> int:
    return max(r.weight_bps for d in h.control.history for r in d.routes if r.version == version)


async def test_rollout_without_evidence_of_non_inferiority_is_not_promoted(h: Harness) -> None:
    # No feedback on the candidate: nothing shows harm, but nothing shows it is
    # no worse either. It holds at the last comparing stage, then rolls back.
    engine, traffic = await _canary(h)
    traffic.cand_feedback = 0.0
    await engine.start_rollout("v2")
    await h.run(engine, 4 * 3600)
    rec = engine.list_rollouts()[0]
    assert rec.state == "ROLLED_BACK"
    assert "non-inferiority not shown" in rec.transitions[-1].reason
    assert _max_weight(h, "v2") == 5000
    ev = h.history("rollback")[0]
    assert ev["candidate_feedback_n"] == 0


async def test_rollout_non_inferiority_margin_zero_promotes_on_no_harm(h: Harness) -> None:
    engine, traffic = await _canary(h, canary={"non_inferiority_margin": 0.0})
    traffic.cand_feedback = 0.0
    await engine.start_rollout("v2")
    await h.run(engine, 4 * 3600)
    assert engine.list_rollouts()[0].state == "PROMOTED"


async def test_rollout_non_inferiority_every_stage_holds_at_the_first(h: Harness) -> None:
    engine, traffic = await _canary(h, canary={"non_inferiority_every_stage": True})
    traffic.cand_feedback = 0.0
    await engine.start_rollout("v2")
    await h.run(engine, 4 * 3600)
    rec = engine.list_rollouts()[0]
    assert rec.state == "ROLLED_BACK"
    assert _max_weight(h, "v2") == 100
    assert rec.transitions[-1].evidence["non_inferiority"]["shown"] is False


async def test_rollout_counts_as_active_until_the_stable_hook_ran(h: Harness) -> None:
    # The learning scheduler trains from the registry's stable version: it must
    # not fire between the promotion and the hook that records the new stable.
    import asyncio

    entered = asyncio.Event()
    release = asyncio.Event()
    seen: list[str] = []

    async def hook(version: str) -> None:
        entered.set()
        await release.wait()
        seen.append(version)

    engine, _ = await _canary(h, canary={"stages_percent": [50, 100], "min_dwell_seconds": 1})
    engine.add_stable_hook(hook)
    await engine.start_rollout("v2")
    task = None
    for _ in range(200):
        h.clock.ms += 30_000
        task = asyncio.ensure_future(engine.step())
        done, _ = await asyncio.wait({task}, timeout=0.05)
        if entered.is_set() or not done:
            break
    await asyncio.wait_for(entered.wait(), 5)
    assert engine.list_rollouts()[0].state == "PROMOTED"
    assert engine.rollout_active()
    release.set()
    assert task is not None
    await task
    assert seen == ["v2"] and not engine.rollout_active()


async def test_rollout_no_traffic_holds_then_rolls_back_at_the_deadline(h: Harness) -> None:
    engine, traffic = await _canary(h)
    traffic.rps = 0
    await engine.start_rollout("v2")
    await h.run(engine, 540)
    rec = engine.active()
    assert rec is not None and rec.state == "CANARY" and rec.stage_index == 0
    await h.run(engine, 120)
    rec = engine.list_rollouts()[0]
    assert rec.state == "ROLLED_BACK"
    assert rec.transitions[-1].reason.startswith("inconclusive")


async def test_rollout_inconclusive_pauses_when_configured_and_operator_promotes(
    h: Harness,
) -> None:
    engine, traffic = await _canary(h, on_inconclusive="pause")
    traffic.rps = 0
    await engine.start_rollout("v2")
    await h.run(engine, 900)
    rec = engine.active()
    assert rec is not None and rec.state == "PAUSED"
    assert h.control.weight_bps("v2") == 100
    await engine.promote(rec.rollout_id, "looked fine")
    assert engine.list_rollouts()[0].state == "PROMOTED"
    assert h.control.weight_bps("v2") == 10_000


async def test_rollout_restart_resumes_stage_without_resending(h: Harness) -> None:
    engine, traffic = await _canary(h)
    rec = await engine.start_rollout("v2")
    await h.run(engine, 150)
    before = engine.active()
    assert before is not None and before.state == "CANARY" and before.stage_index >= 1
    stage, started = before.stage_index, before.stage_started_ms
    sent = len(h.control.history)
    await engine.shutdown()
    again = await h.engine(engine._cfg, traffic)
    resumed = again.active()
    assert resumed is not None and resumed.rollout_id == rec.rollout_id
    assert (resumed.stage_index, resumed.stage_started_ms) == (stage, started)
    assert len(h.control.history) == sent
    await h.run(again, 3600)
    assert again.list_rollouts()[0].state == "PROMOTED"


async def test_rollout_restart_resends_a_split_the_control_plane_lost(h: Harness) -> None:
    engine, traffic = await _canary(h)
    await engine.start_rollout("v2")
    await h.run(engine, 90)
    await engine.shutdown()
    h.control = FakeControlPlane()
    traffic.control = h.control
    again = await h.engine(engine._cfg, traffic)
    assert len(h.control.history) == 1
    assert h.control.weight_bps("v2") == again.active().weight_bps  # type: ignore[union-attr]


async def test_rollout_operator_errors_name_the_problem(h: Harness) -> None:
    engine, _ = await _canary(h)
    with pytest.raises(RolloutInputError, match="candidate_version"):
        await engine.start_rollout("")
    with pytest.raises(RolloutInputError, match="already stable"):
        await engine.start_rollout("v1")
    with pytest.raises(RolloutConflictError):
        await engine.abort()
    await engine.start_rollout("v2")
    with pytest.raises(RolloutConflictError, match=r"in progress|finish or abort"):
        await engine.start_rollout("v3")
    rec = await engine.abort(reason="changed my mind")
    assert rec.state == "ABORTED"
    assert h.control.weight_bps("v1") == 10_000


async def test_rollout_rollback_of_the_last_promotion(h: Harness) -> None:
    engine, _ = await _canary(h)
    seen: list[str] = []
    engine.add_stable_hook(seen.append)
    await engine.start_rollout("v2")
    await engine.promote()
    assert seen == ["v2"]
    rec = await engine.rollback(reason="users complain")
    assert rec.state == "ROLLED_BACK"
    assert engine.stable_version == "v1" and seen == ["v2", "v1"]
    assert h.control.weight_bps("v1") == 10_000
    assert "v2" in h.control.desired().loaded  # type: ignore[union-attr]
    h.clock.ms += 61_000
    await engine.step()
    assert "v2" not in h.control.desired().loaded  # type: ignore[union-attr]


def _probe_event(
    probe_id: str, i: int, version: str, response: str, error: bool = False
) -> events_pb2.Event:
    ev = events_pb2.Event(event_id=f"{probe_id}-{i}")
    inf = ev.inference
    inf.request_id = f"{probe_id}-{i}"
    inf.model_version = version
    inf.role = events_pb2.PROBE
    inf.response = response
    inf.latency_ms = 100
    inf.error = error
    inf.attributes["probe_id"] = probe_id
    inf.attributes["probe_index"] = str(i)
    return ev


async def _feed(h: Harness, engine: RolloutEngine, events: list[events_pb2.Event]) -> None:
    seq0 = h.writer.next_seq

    def write(txn: Any) -> None:
        for k, ev in enumerate(events):
            engine.observer.process(txn, seq0 + 1000 + k, h.clock.ms, ev)
        engine.observer.end_batch(txn)

    await h.writer.run(write)


@pytest.mark.parametrize("good", [True, False])
async def test_rollout_validation_probes_candidate_and_stable(h: Harness, good: bool) -> None:
    cfg = _config(validation={"enabled": True})
    engine = await h.engine(cfg, StoredObservations(h.store), regression=Prompts(3))
    await engine.start_rollout("v2")
    await engine.step()
    assert {p.version for p in h.control.probes} == {"v1", "v2"}
    rec = engine.active()
    assert rec is not None and rec.state == "VALIDATING"
    events = []
    for p in h.control.probes:
        for i in range(3):
            bad = p.version == "v2" and not good
            events.append(
                _probe_event(p.probe_id, i, p.version, "nonsense" if bad else f"answer {i}")
            )
    await _feed(h, engine, events)
    await engine.step()
    rec = engine.list_rollouts()[0]
    if good:
        assert rec.state == "CANARY", rec.transitions[-1].reason
    else:
        assert rec.state == "ROLLED_BACK"
        assert "similarity" in rec.transitions[-1].reason
    await engine.step()
    assert len(h.control.probes) == 2  # never sent twice


async def test_rollout_validation_without_answers_is_inconclusive(h: Harness) -> None:
    cfg = _config(validation={"enabled": True, "deadline_seconds": 120})
    engine = await h.engine(cfg, StoredObservations(h.store), regression=Prompts(3))
    await engine.start_rollout("v2")
    await h.run(engine, 300)
    rec = engine.list_rollouts()[0]
    assert rec.state == "ROLLED_BACK" and "probe answers missing" in rec.transitions[-1].reason


def _inference(rid: str, version: str, role: int, response: str) -> events_pb2.Event:
    ev = events_pb2.Event(event_id=f"{rid}-{role}")
    ev.inference.request_id = rid
    ev.inference.model_version = version
    ev.inference.role = role  # type: ignore[assignment]
    ev.inference.response = response
    ev.inference.latency_ms = 120
    return ev


@pytest.mark.parametrize(
    ("answer", "state"),
    [(lambda i: f"the answer is {i}", "CANARY"), (lambda i: "no", "ROLLED_BACK")],
)
async def test_rollout_shadow_compares_answers_then_gates(
    h: Harness, answer: Callable[[int], str], state: str
) -> None:
    cfg = _config(shadow={"enabled": True, "min_samples": 20, "min_dwell_seconds": 30})
    engine = await h.engine(cfg, StoredObservations(h.store))
    await engine.start_rollout("v2")
    assert h.control.desired().shadow is not None  # type: ignore[union-attr]
    events = []
    for i in range(30):
        events.append(_inference(f"r{i}", "v1", events_pb2.PRIMARY, f"the answer is {i}"))
        events.append(_inference(f"r{i}", "v2", events_pb2.SHADOW, answer(i)))
    await _feed(h, engine, events)
    h.clock.ms += 60_000
    await engine.step()
    rec = engine.list_rollouts()[0]
    assert rec.state == state, rec.transitions[-1].reason
    assert rec.transitions[-1].evidence["compared"] == 30


async def test_rollout_shadow_pairs_by_mirror_of_when_the_shadow_has_its_own_id(
    h: Harness,
) -> None:
    cfg = _config(shadow={"enabled": True, "min_samples": 20, "min_dwell_seconds": 30})
    engine = await h.engine(cfg, StoredObservations(h.store))
    await engine.start_rollout("v2")
    events = []
    for i in range(25):
        shadow = _inference(f"m{i}", "v2", events_pb2.SHADOW, f"the answer is {i}")
        shadow.inference.attributes["mirror_of"] = f"r{i}"
        # The mirrored answer may be recorded before the live one.
        events += [shadow, _inference(f"r{i}", "v1", events_pb2.PRIMARY, f"the answer is {i}")]
    await _feed(h, engine, events)
    h.clock.ms += 60_000
    await engine.step()
    rec = engine.list_rollouts()[0]
    assert rec.state == "CANARY", rec.transitions[-1].reason
    assert rec.transitions[-1].evidence["compared"] == 25


async def test_rollout_blue_green_switches_after_probe_and_keeps_old_loaded(h: Harness) -> None:
    cfg = _config(strategy="blue_green", blue_green={"retention_seconds": 120})
    engine = await h.engine(cfg, StoredObservations(h.store), regression=Prompts(2))
    await engine.start_rollout("v2")
    await engine.step()
    (probe,) = h.control.probes
    assert probe.version == "v2"
    await _feed(h, engine, [_probe_event(probe.probe_id, i, "v2", "ok") for i in range(2)])
    await engine.step()
    assert engine.list_rollouts()[0].state == "PROMOTED"
    d = h.control.desired()
    assert d is not None and d.routes[0].version == "v2" and d.loaded == {"v1", "v2"}
    h.clock.ms += 121_000
    await engine.step()
    assert h.control.desired().loaded == {"v2"}  # type: ignore[union-attr]


async def test_rollout_observer_stores_feedback_scored_per_version(h: Harness) -> None:
    engine = await h.engine(_config(), StoredObservations(h.store))
    rec = await engine.start_rollout("v2")
    fb = events_pb2.Event(event_id="f1")
    fb.feedback.request_id = "c1"
    fb.feedback.signal = events_pb2.THUMBS_DOWN
    await _feed(
        h,
        engine,
        [
            _inference("c1", "v2", events_pb2.PRIMARY, "x"),
            _inference("s1", "v1", events_pb2.PRIMARY, "y"),
            fb,
        ],
    )
    got = StoredObservations(h.store).collect(rec.rollout_id, 0, h.clock.ms)
    assert got.traffic.candidate.requests == 1 and got.traffic.stable.requests == 1
    assert got.traffic.candidate.reward.tolist() == [0.0]
    assert json.loads(engine.list_rollouts()[0].to_json())["candidate"] == "v2"
