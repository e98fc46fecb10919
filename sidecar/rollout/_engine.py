"""RolloutEngine: one durable state machine per rollout.

``PENDING -> VALIDATING -> SHADOW -> CANARY(stage i) | BLUE_GREEN -> PROMOTED``,
or ``ROLLED_BACK`` / ``ABORTED``, or ``PAUSED`` for an operator. Every
transition is stored (``rollouts`` database) with its reason and evidence,
and appended to the learning history, *before* the directive it implies is
handed to the control plane; a restart resumes from the stored record and
re-sends a split only when the control plane does not hold it already.

Stage clocks are wall-clock times stored in the record, so a restart keeps
them. No traffic never advances a stage; a stage short of evidence at its
deadline is inconclusive and rolls back or pauses, by configuration.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import lmdb
import numpy as np
from atlas_sidecar_client import uuid7

from sidecar import instruments as ins
from sidecar._aio import cancel_and_wait, spawn
from sidecar.config import CanaryConfig, RolloutConfig
from sidecar.control import ControlPlane, DesiredState, RouteSpec, ShadowSpec
from sidecar.names import check_name
from sidecar.rollout._analysis import CanaryJudge, SequentialJudge, TrafficBatch
from sidecar.rollout._compare import Comparator, comparator_by_name
from sidecar.rollout._errors import RolloutConflictError, RolloutInputError, RolloutNotFoundError
from sidecar.rollout._observe import (
    ActiveView,
    Collected,
    RecentGoodAnswers,
    RegressionSource,
    RolloutObserver,
    ShadowBatch,
    StoredObservations,
    TrafficSource,
    obs_prefix,
    probe_answers,
)
from sidecar.rollout._record import RolloutRecord, Transition
from sidecar.rollout._sequential import RateRatioTest
from sidecar.scoring import WeightTable
from sidecar.store import Store, StoreWriter, append_history

__all__ = ["Clock", "JudgeFactory", "RolloutEngine", "SystemClock"]

log = logging.getLogger(__name__)

_ACTIVE_KEY = b"active"
_STABLE_KEY = b"stable"
_REC = b"r/"

#: Builds the canary judge from config and (after a restart) its saved state.
JudgeFactory = Callable[[CanaryConfig, Mapping[str, Any] | None], CanaryJudge]
#: Called with the new stable version after a promotion or a rollback of one.
StableHook = Callable[[str], Awaitable[None] | None]


class Clock(Protocol):
    def now_ms(self) -> int: ...


class Candidate(Protocol):
    """What a rollout needs of a registered candidate."""

    @property
    def artifact_uri(self) -> str: ...
    @property
    def update_id(self) -> str: ...


class CandidateSource(Protocol):
    """The model registry, as the engine reads it: a registered version or None."""

    def get(self, version: str) -> Candidate | None: ...


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


def _default_judge(config: CanaryConfig, state: Mapping[str, Any] | None) -> CanaryJudge:
    return SequentialJudge(config, state)


def _rec_key(rollout_id: str) -> bytes:
    return _REC + rollout_id.encode()


def _p99(x: list[float]) -> float:
    return float(np.quantile(np.asarray(x), 0.99)) if x else 0.0


class RolloutEngine:
    """Runs rollouts of candidate versions against the stable version.

    Stage lifecycle: ``start()`` loads the active rollout and resumes it;
    ``shutdown()`` stops evaluating (safe before start and twice). Operator
    actions (``start_rollout``, ``promote``, ``abort``, ``rollback``) raise
    :class:`~sidecar.rollout.RolloutError` subclasses naming what is wrong.
    """

    def __init__(
        self,
        store: Store,
        writer: StoreWriter,
        control: ControlPlane,
        config: RolloutConfig,
        *,
        clock: Clock | None = None,
        source: TrafficSource | None = None,
        regression: RegressionSource | None = None,
        judge_factory: JudgeFactory | None = None,
        comparator: Comparator | None = None,
        autorun: bool = True,
        candidates: CandidateSource | None = None,
        weights: WeightTable | None = None,
    ) -> None:
        """``weights``: the configured scoring table (scoring.*), so that the
        canary's feedback guardrail means by reward what the training data does."""
        self._store = store
        #: The model registry: a rollout of a version it does not hold is
        #: refused, and the rollout loads the artifact it registered. None
        #: (engine-only tests) accepts any version, with no artifact.
        self._candidates = candidates
        self._writer = writer
        self._control = control
        self._cfg = config
        self._clock = clock or SystemClock()
        self._source = source or StoredObservations(store)
        self._regression = regression or RecentGoodAnswers(store)
        #: Asked for the stable version when neither config nor a stored or
        #: desired state names one (the app points it at the model registry).
        self.stable_source: Callable[[], str | None] = lambda: None
        self._judge_factory = judge_factory or _default_judge
        self.observer = RolloutObserver(
            store,
            comparator or comparator_by_name(config.shadow.comparator),
            pool_size=config.regression_pool,
            good_reward=config.regression_min_reward,
            join_capacity=config.feedback_join_capacity,
            feedback_window_ms=round(config.feedback_window_seconds * 1000),
            weights=weights,
        )
        self._probe_cmp = comparator_by_name(config.validation.comparator)
        self._autorun = autorun
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._active: RolloutRecord | None = None
        self._judge: CanaryJudge | None = None
        self._retiring: dict[str, RolloutRecord] = {}
        self._hooks: list[StableHook] = []
        self._last_checkpoint = 0
        self._stable_version = config.initial_stable_version
        #: Seconds from the last rollback decision to its directive being handed over.
        self.last_rollback_seconds: float | None = None
        self.errors = 0

    # -- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            return
        self._load()
        async with self._lock:
            await self._recover()
        if self._autorun:
            self._task = spawn(self._run(), stage="rollout", name="engine")

    async def shutdown(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._cfg.evaluate_interval_seconds)
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.errors += 1
                log.exception("rollout evaluation failed; retrying")

    def _load(self) -> None:
        db = self._store.db("rollouts")
        with self._store.read() as txn:
            raw = txn.get(_STABLE_KEY, db=db)
            if raw:
                self._stable_version = bytes(raw).decode()
            active = txn.get(_ACTIVE_KEY, db=db)
            if active:
                rec_raw = txn.get(_rec_key(bytes(active).decode()), db=db)
                if rec_raw:
                    rec = RolloutRecord.from_json(bytes(rec_raw))
                    if rec.active:
                        self._set_active(rec)
            for rec in self._scan(txn, limit=50):
                if rec.unload_version or rec.hooks_pending:
                    self._retiring[rec.rollout_id] = rec
        if not self._stable_version:
            d = self._control.desired()
            if d is not None:
                self._stable_version = d.stable_version
        self.observer.stable_version = self._stable_version

    async def _recover(self) -> None:
        """Re-sends the active rollout's split only if the control plane lacks it."""
        rec = self._active
        if rec is not None and rec.revision:
            current = self._control.desired()
            if current is None or current.revision < rec.revision:
                await self._control.apply(self._desired(rec, rec.revision))
            rec.applied_revision = rec.revision
        for rec in list(self._retiring.values()):
            if rec.hooks_pending:
                await self._run_hooks(rec)

    # -- public API --------------------------------------------------------

    def rollout_active(self) -> bool:
        """True while a rollout is in progress (the learning scheduler waits).

        A finished rollout whose stable-version hooks have not yet run still
        counts: until they have, the registry names the old stable version,
        and an update triggered then would train from it.
        """
        return self._active is not None or any(r.hooks_pending for r in self._retiring.values())

    @property
    def stable_version(self) -> str:
        return self._stable_version

    def add_stable_hook(self, hook: StableHook) -> None:
        """``hook(version)`` runs once after a promotion makes ``version`` stable (or a
        rollback of a promotion makes the old one stable again)."""
        self._hooks.append(hook)

    def active(self) -> RolloutRecord | None:
        return self._active

    async def start_rollout(
        self,
        candidate: str,
        *,
        strategy: str | None = None,
        reason: str = "",
        artifact_uri: str | None = None,
        update_id: str = "",
    ) -> RolloutRecord:
        reason_bad = check_name("candidate_version", candidate)
        if reason_bad is not None:
            raise RolloutInputError(reason_bad)
        strategy = strategy or self._cfg.strategy
        if strategy not in ("canary", "blue_green"):
            raise RolloutInputError(f"strategy: unknown strategy {strategy!r}")
        async with self._lock:
            if self._active is not None:
                raise RolloutConflictError(
                    f"rollout {self._active.rollout_id} of {self._active.candidate} is "
                    f"{self._active.state}; finish or abort it first"
                )
            stable = self._stable_version or (self.stable_source() or "")
            if not stable:
                raise RolloutConflictError(
                    "no stable version is known: set rollout.initial_stable_version "
                    "or connect an inference server"
                )
            if candidate == stable:
                raise RolloutInputError(f"candidate_version {candidate!r} is already stable")
            if artifact_uri is None:
                artifact_uri, found_update = self._lookup_candidate(candidate)
                update_id = update_id or found_update
            now = self._clock.now_ms()
            rec = RolloutRecord(
                rollout_id=uuid7(),
                candidate=candidate,
                stable=stable,
                strategy=strategy,
                state="PENDING",
                started_ms=now,
                updated_ms=now,
                state_started_ms=now,
                artifact_uri=artifact_uri,
                update_id=update_id,
                traceparent=ins.traceparent() or "",
            )
            self._set_active(rec)
            self._judge = self._judge_factory(self._cfg.canary, None)
            await self._transition(rec, "PENDING", reason or "requested", {}, apply=False)
            await self._advance_from(rec, "PENDING", "rollout started")
        return rec

    async def promote(self, rollout_id: str = "", reason: str = "") -> RolloutRecord:
        async with self._lock:
            rec = self._require_active(rollout_id)
            await self._promote(rec, reason or "promoted by operator", self._evidence())
            return rec

    async def abort(self, rollout_id: str = "", reason: str = "") -> RolloutRecord:
        async with self._lock:
            rec = self._require_active(rollout_id)
            await self._end(rec, "ABORTED", reason or "aborted by operator", self._evidence())
            return rec

    async def rollback(self, rollout_id: str = "", reason: str = "") -> RolloutRecord:
        """Rolls back the active rollout, or else the given / last promoted one."""
        async with self._lock:
            rec = self._active
            if rec is not None and rollout_id in ("", rec.rollout_id):
                await self._end(
                    rec, "ROLLED_BACK", reason or "rolled back by operator", self._evidence()
                )
                return rec
            target = self.get(rollout_id) if rollout_id else self._last_promoted()
            if target is None:
                raise RolloutNotFoundError(
                    f"rollout_id: no rollout {rollout_id!r}"
                    if rollout_id
                    else "rollout_id: no active or promoted rollout to roll back"
                )
            if target.state != "PROMOTED" or self._stable_version != target.candidate:
                raise RolloutConflictError(
                    f"rollout {target.rollout_id} is {target.state}"
                    + (
                        ""
                        if target.state != "PROMOTED"
                        else f" but {self._stable_version} is stable now"
                    )
                    + "; only the active rollout or the last promotion can be rolled back"
                )
            await self._unpromote(target, reason or "rolled back by operator")
            return target

    def get(self, rollout_id: str) -> RolloutRecord | None:
        if self._active is not None and self._active.rollout_id == rollout_id:
            return self._active
        with self._store.read() as txn:
            raw = txn.get(_rec_key(rollout_id), db=self._store.db("rollouts"))
        return RolloutRecord.from_json(bytes(raw)) if raw else None

    def list_rollouts(self, limit: int = 0) -> list[RolloutRecord]:
        """Rollouts, newest first (the active one as it is in memory)."""
        with self._store.read() as txn:
            out = self._scan(txn, limit)
        if self._active is not None:
            out = [self._active if r.rollout_id == self._active.rollout_id else r for r in out]
        return out

    def status(self) -> dict[str, Any]:
        rec = self._active
        doc: dict[str, Any] = {
            "stable_version": self._stable_version,
            "active": rec is not None,
            "evaluation_errors": self.errors,
        }
        if rec is not None:
            doc.update(
                rollout_id=rec.rollout_id,
                candidate=rec.candidate,
                state=rec.state,
                phase=rec.phase,
                stage_index=rec.stage_index,
                candidate_weight_bps=rec.weight_bps,
                last_reason=rec.transitions[-1].reason if rec.transitions else "",
            )
        if self.last_rollback_seconds is not None:
            doc["last_rollback_directive_ms"] = round(self.last_rollback_seconds * 1000, 3)
        return doc

    # -- evaluation ------------------------------------------------------

    async def step(self) -> None:
        """Evaluates the active rollout once; runs due unloads and hooks."""
        async with self._lock:
            now = self._clock.now_ms()
            rec = self._active
            if rec is not None:
                collected = self._source.collect(rec.rollout_id, rec.cursor, now)
                rec.cursor = collected.cursor
                handler = {
                    "PENDING": self._step_pending,
                    "VALIDATING": self._step_validating,
                    "SHADOW": self._step_shadow,
                    "CANARY": self._step_canary,
                    "BLUE_GREEN": self._step_blue_green,
                    "PAUSED": self._step_paused,
                }[rec.state]
                await handler(rec, now, collected)
                if self._active is rec and now - self._last_checkpoint >= (
                    self._cfg.checkpoint_interval_seconds * 1000
                ):
                    await self._save(rec)
            for old in list(self._retiring.values()):
                if old.unload_version and old.unload_at_ms <= now:
                    await self._unload(old)

    async def _step_pending(self, rec: RolloutRecord, now: int, c: Collected) -> None:
        await self._advance_from(rec, "PENDING", "resumed")

    async def _advance_from(self, rec: RolloutRecord, after: str, reason: str) -> None:
        """Moves to the first enabled phase after ``after``."""
        order = ["VALIDATING", "SHADOW", "CANARY"]
        if rec.strategy == "blue_green":
            order = ["VALIDATING", "BLUE_GREEN"]
        start = order.index(after) + 1 if after in order else 0
        for state in order[start:]:
            if state == "VALIDATING" and not self._cfg.validation.enabled:
                continue
            if state == "SHADOW" and not self._cfg.shadow.enabled:
                continue
            if state == "CANARY":
                await self._enter_stage(rec, 0, reason)
                return
            rec.phase = "load"
            rec.phase_started_ms = self._clock.now_ms()
            await self._transition(rec, state, reason, {})
            return

    def _deadline_passed(self, rec: RolloutRecord, now: int, seconds: float) -> bool:
        return now - rec.state_started_ms >= seconds * 1000

    # validation ------------------------------------------------------------

    async def _step_validating(self, rec: RolloutRecord, now: int, c: Collected) -> None:
        vcfg = self._cfg.validation
        if rec.phase == "load":
            if self._control.converged(rec.revision):
                await self._send_probes(rec, ("candidate", "stable"), vcfg.prompts)
                if not rec.probes:
                    await self._advance_from(
                        rec, "VALIDATING", "validation skipped: no regression prompts yet"
                    )
                    return
            elif self._deadline_passed(rec, now, vcfg.deadline_seconds):
                await self._inconclusive(rec, "the inference servers did not load the candidate")
            return
        cand = probe_answers(self._store, rec.probes["candidate"])
        stab = probe_answers(self._store, rec.probes["stable"])
        n = int(rec.probes.get("n", "0"))
        if len(cand) < n or len(stab) < n:
            if self._deadline_passed(rec, now, vcfg.deadline_seconds):
                await self._inconclusive(
                    rec, f"probe answers missing: candidate {len(cand)}/{n}, stable {len(stab)}/{n}"
                )
            return
        ok, why, evidence = self._judge_probes(cand, stab, json.loads(rec.probes["refs"]))
        if ok:
            await self._advance_from(rec, "VALIDATING", f"validation passed: {why}")
        else:
            await self._end(rec, "ROLLED_BACK", f"validation failed: {why}", evidence)

    async def _send_probes(self, rec: RolloutRecord, arms: tuple[str, ...], limit: int) -> None:
        cases = list(self._regression.cases(limit))
        if not cases:
            return
        prompts = [c.prompt for c in cases]
        probes = {"n": str(len(prompts)), "refs": json.dumps([c.reference for c in cases])}
        for arm in arms:
            version = rec.candidate if arm == "candidate" else rec.stable
            probes[arm] = await self._control.run_probe(version, prompts)
        rec.probes = probes
        rec.phase = "probe"
        rec.phase_started_ms = self._clock.now_ms()
        await self._save(rec)

    def _judge_probes(
        self, cand: list[dict[str, Any]], stab: list[dict[str, Any]], refs: list[str]
    ) -> tuple[bool, str, dict[str, Any]]:
        v = self._cfg.validation
        ce = sum(1 for a in cand if a["error"]) / len(cand)
        se = sum(1 for a in stab if a["error"]) / len(stab) if stab else 0.0
        c_lat = float(np.median([a["latency_ms"] for a in cand]))
        s_lat = float(np.median([a["latency_ms"] for a in stab])) if stab else c_lat
        ev: dict[str, Any] = {
            "prompts": len(cand),
            "candidate_error_rate": ce,
            "stable_error_rate": se,
            "candidate_latency_p50": c_lat,
            "stable_latency_p50": s_lat,
        }
        if ce > se + v.max_error_rate_increase:
            return False, f"error rate {ce:.3f} vs stable {se:.3f}", ev
        if s_lat > 0 and c_lat / s_lat > v.max_latency_ratio:
            return False, f"median latency {c_lat:.1f} ms vs stable {s_lat:.1f} ms", ev
        if any(refs) and stab:

            def sim(answers: list[dict[str, Any]]) -> float:
                vals = [
                    0.0
                    if a["error"]
                    else self._probe_cmp.similarity(refs[a["index"]], a["response"])
                    for a in answers
                    if a["index"] < len(refs) and refs[a["index"]]
                ]
                return float(np.mean(vals)) if vals else 0.0

            cs, ss = sim(cand), sim(stab)
            ev.update(candidate_similarity=cs, stable_similarity=ss)
            if cs < v.min_similarity_ratio * ss:
                return False, f"similarity to references {cs:.3f} vs stable {ss:.3f}", ev
        return True, f"{len(cand)} probes no worse than stable", ev

    # shadow -------------------------------------------------------------------

    async def _step_shadow(self, rec: RolloutRecord, now: int, c: Collected) -> None:
        s = self._cfg.shadow
        st = rec.shadow or {"n": 0, "agree": 0.0, "c_lat": [], "s_lat": [], "errors": None}
        test = RateRatioTest()
        if st["errors"]:
            test.restore(st["errors"])
        sb: ShadowBatch = c.shadow
        if sb.agreement:
            st["n"] += len(sb.agreement)
            st["agree"] += float(sum(sb.agreement))
            st["c_lat"] = (st["c_lat"] + [round(x, 2) for x in sb.candidate_latency])[-5000:]
            st["s_lat"] = (st["s_lat"] + [round(x, 2) for x in sb.stable_latency])[-5000:]
            test.update(sum(sb.candidate_error), sum(sb.stable_error), 0.5)
        st["errors"] = test.state()
        rec.shadow = st
        n = st["n"]
        agreement = st["agree"] / n if n else 0.0
        ratio = _p99(st["c_lat"]) / max(_p99(st["s_lat"]), 1e-9) if n else 0.0
        ev = {
            "compared": n,
            "agreement": round(agreement, 4),
            "latency_p99_ratio": round(ratio, 3),
            "error_e_value": round(min(test.harm_e, 1e9), 3),
            "candidate_errors": test.events_candidate,
            "stable_errors": test.events_stable,
        }
        if test.harm_e >= 1.0 / self._cfg.canary.alpha:
            await self._end(rec, "ROLLED_BACK", "shadow: candidate errors more than stable", ev)
            return
        dwelt = now - rec.state_started_ms >= s.min_dwell_seconds * 1000
        if dwelt and n >= s.min_samples:
            if agreement < s.min_agreement:
                await self._end(
                    rec, "ROLLED_BACK", f"shadow: agreement {agreement:.3f} too low", ev
                )
            elif ratio > s.max_latency_p99_ratio:
                await self._end(rec, "ROLLED_BACK", f"shadow: latency p99 ratio {ratio:.2f}", ev)
            else:
                self.observer.view = ActiveView(rec.rollout_id, rec.candidate, rec.stable)
                await self._enter_stage(rec, 0, "shadow passed", ev)
        elif self._deadline_passed(rec, now, s.max_dwell_seconds):
            await self._inconclusive(rec, f"shadow compared {n} of {s.min_samples} requests", ev)

    # canary -------------------------------------------------------------------

    def _stage_bps(self, index: int) -> int:
        return round(self._cfg.canary.stages_percent[index] * 100)

    async def _enter_stage(
        self, rec: RolloutRecord, index: int, reason: str, evidence: dict[str, Any] | None = None
    ) -> None:
        stages = self._cfg.canary.stages_percent
        if index >= len(stages) or self._stage_bps(index) >= 10_000:
            await self._promote(rec, reason, evidence or {})
            return
        now = self._clock.now_ms()
        rec.stage_index = index
        rec.weight_bps = self._stage_bps(index)
        rec.stage_started_ms = now
        if self._judge is None:
            self._judge = self._judge_factory(self._cfg.canary, None)
        self._judge.begin_stage(index, rec.weight_bps)
        rec.analysis = {"judge": self._judge.state(), "stage_requests": 0}
        await self._transition(rec, "CANARY", reason, evidence or {})

    def _observe(self, rec: RolloutRecord, traffic: TrafficBatch) -> None:
        assert self._judge is not None
        self._judge.observe(traffic)
        rec.analysis["stage_requests"] = (
            int(rec.analysis.get("stage_requests", 0)) + traffic.candidate.requests
        )

    async def _step_canary(self, rec: RolloutRecord, now: int, c: Collected) -> None:
        cfg = self._cfg.canary
        self._observe(rec, c.traffic)
        assert self._judge is not None
        samples = int(rec.analysis["stage_requests"])
        dwelt = now - rec.stage_started_ms >= cfg.min_dwell_seconds * 1000
        complete = dwelt and samples >= cfg.min_samples
        last = rec.stage_index + 1 >= len(cfg.stages_percent) or (
            self._stage_bps(rec.stage_index + 1) >= 10_000
        )
        verdict = self._judge.verdict(stage_complete=complete, final_stage=last)
        evidence = dict(verdict.evidence, stage_samples=samples)
        if verdict.harm is not None:
            await self._end(
                rec, "ROLLED_BACK", f"guardrail {verdict.harm}: candidate worse", evidence
            )
        elif complete and verdict.safe:
            await self._enter_stage(
                rec, rec.stage_index + 1, f"stage {rec.stage_index} passed", evidence
            )
        elif now - rec.stage_started_ms >= cfg.max_dwell_seconds * 1000:
            why = (
                f"stage {rec.stage_index} saw {samples} of {cfg.min_samples} candidate requests"
                if not complete
                else f"stage {rec.stage_index}: non-inferiority not shown"
            )
            await self._inconclusive(rec, why, evidence)

    async def _step_paused(self, rec: RolloutRecord, now: int, c: Collected) -> None:
        # Paused with canary traffic on: the guardrails keep watching.
        if rec.paused_from == "CANARY" and self._judge is not None:
            self._observe(rec, c.traffic)
            verdict = self._judge.verdict(stage_complete=False, final_stage=False)
            if verdict.harm is not None:
                await self._end(
                    rec,
                    "ROLLED_BACK",
                    f"guardrail {verdict.harm}: candidate worse",
                    verdict.evidence,
                )

    async def _inconclusive(
        self, rec: RolloutRecord, why: str, evidence: dict[str, Any] | None = None
    ) -> None:
        if self._cfg.on_inconclusive == "pause":
            rec.paused_from = rec.state
            await self._transition(rec, "PAUSED", f"inconclusive: {why}", evidence or {})
        else:
            await self._end(rec, "ROLLED_BACK", f"inconclusive: {why}", evidence or {})

    # blue-green ---------------------------------------------------------------

    async def _step_blue_green(self, rec: RolloutRecord, now: int, c: Collected) -> None:
        b = self._cfg.blue_green
        if rec.phase == "load":
            if self._control.converged(rec.revision):
                await self._send_probes(rec, ("candidate",), self._cfg.validation.prompts)
                if not rec.probes:
                    await self._promote(rec, "switched (no regression prompts to probe)", {})
            elif self._deadline_passed(rec, now, b.deadline_seconds):
                await self._inconclusive(rec, "the inference servers did not load the candidate")
            return
        n = int(rec.probes.get("n", "0"))
        answers = probe_answers(self._store, rec.probes["candidate"])
        if len(answers) < n:
            if self._deadline_passed(rec, now, b.deadline_seconds):
                await self._inconclusive(rec, f"probe answers missing: {len(answers)}/{n}")
            return
        rate = sum(1 for a in answers if a["error"]) / max(1, len(answers))
        ev = {"prompts": n, "candidate_error_rate": rate}
        if rate > b.max_probe_error_rate:
            await self._end(rec, "ROLLED_BACK", f"blue-green probe error rate {rate:.3f}", ev)
        else:
            await self._promote(rec, "blue-green probe passed; switched", ev)

    # transitions -----------------------------------------------------------------

    def _evidence(self) -> dict[str, Any]:
        if self._judge is None:
            return {}
        return dict(self._judge.verdict(stage_complete=False, final_stage=False).evidence)

    async def _promote(self, rec: RolloutRecord, reason: str, evidence: dict[str, Any]) -> None:
        now = self._clock.now_ms()
        old = rec.stable
        rec.weight_bps = 10_000
        rec.unload_version = old
        retention = (
            self._cfg.blue_green.retention_seconds
            if rec.strategy == "blue_green"
            else self._cfg.unload_after_seconds
        )
        rec.unload_at_ms = now + int(retention * 1000)
        rec.hooks_pending = ["stable"] if self._hooks else []
        self._stable_version = rec.candidate
        await self._transition(rec, "PROMOTED", reason, evidence, outcome="promoted")

    async def _end(
        self, rec: RolloutRecord, state: str, reason: str, evidence: dict[str, Any]
    ) -> None:
        decided = time.perf_counter()
        now = self._clock.now_ms()
        rec.weight_bps = 0
        rec.unload_version = rec.candidate
        rec.unload_at_ms = now + int(self._cfg.unload_after_seconds * 1000)
        outcome = "rollback" if state == "ROLLED_BACK" else None
        await self._transition(rec, state, reason, evidence, outcome=outcome)
        if state == "ROLLED_BACK":
            self.last_rollback_seconds = time.perf_counter() - decided

    async def _unpromote(self, rec: RolloutRecord, reason: str) -> None:
        decided = time.perf_counter()
        self._stable_version = rec.stable
        rec.weight_bps = 0
        rec.unload_version = rec.candidate
        rec.unload_at_ms = self._clock.now_ms() + int(self._cfg.unload_after_seconds * 1000)
        rec.hooks_pending = ["stable"] if self._hooks else []
        await self._transition(rec, "ROLLED_BACK", reason, {}, outcome="rollback")
        self.last_rollback_seconds = time.perf_counter() - decided

    async def _transition(
        self,
        rec: RolloutRecord,
        to_state: str,
        reason: str,
        evidence: dict[str, Any],
        *,
        apply: bool = True,
        outcome: str | None = None,
    ) -> None:
        """Stores the transition (and history) durably, then hands the split over."""
        now = self._clock.now_ms()
        from_state = rec.state if rec.transitions else ""
        rec.transitions.append(
            Transition(from_state, to_state, rec.stage_index, now, reason, evidence)
        )
        rec.state = to_state
        rec.state_started_ms = now
        rec.updated_ms = now
        if to_state != "PAUSED":
            rec.paused_from = ""
        desired: DesiredState | None = None
        if apply:
            current = self._control.desired()
            rec.revision = max(rec.revision, current.revision if current else 0) + 1
            # The control channel also knows revisions replicas report (after a
            # restore from an older backup, say); a split must be newer than all.
            next_revision = getattr(self._control, "next_revision", None)
            if callable(next_revision):
                rec.revision = max(rec.revision, int(next_revision()))
            desired = self._desired(rec, rec.revision)
        if not rec.active:
            self._active = None
            self.observer.view = None
            self._judge = None
            if rec.unload_version or rec.hooks_pending:
                self._retiring[rec.rollout_id] = rec
        elif rec.state == "SHADOW":
            self.observer.view = ActiveView(rec.rollout_id, rec.candidate, rec.stable, True)
        doc = {
            "rollout_id": rec.rollout_id,
            "candidate": rec.candidate,
            "stable": rec.stable,
            "strategy": rec.strategy,
            "from": from_state,
            "to": to_state,
            "stage_index": rec.stage_index,
            "weight_bps": rec.weight_bps,
            "reason": reason,
            "evidence": evidence,
        }
        history: list[tuple[str, dict[str, Any]]] = [("rollout_transition", doc)]
        if outcome is not None:
            history.append((outcome, self._outcome_doc(rec, reason, evidence)))
        await self._save(rec, history=history, now=now)
        if desired is not None:
            await self._control.apply(desired)
            rec.applied_revision = desired.revision
        if rec.hooks_pending:
            await self._run_hooks(rec)

    def _outcome_doc(
        self, rec: RolloutRecord, reason: str, ev: Mapping[str, Any]
    ) -> dict[str, Any]:
        c, s = ev.get("candidate_score"), ev.get("stable_score")
        total = ev.get("total", {})
        return {
            "rollout_id": rec.rollout_id,
            "candidate": rec.candidate,
            "stable": rec.stable,
            "update_id": rec.update_id,
            "reason": reason,
            "stage_index": rec.stage_index,
            "candidate_score": c,
            "stable_score": s,
            "improvement": round(c - s, 6) if c is not None and s is not None else None,
            "candidate_feedback_n": ev.get("candidate_feedback_n", 0),
            "stable_feedback_n": ev.get("stable_feedback_n", 0),
            "candidate_requests": total.get("cand_req", 0),
            "stable_requests": total.get("stab_req", 0),
        }

    async def _run_hooks(self, rec: RolloutRecord) -> None:
        version = self._stable_version
        for hook in self._hooks:
            try:
                result = hook(version)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                self.errors += 1
                log.exception("stable-version hook failed", extra={"version": version})
        rec.hooks_pending = []
        if not rec.unload_version:
            self._retiring.pop(rec.rollout_id, None)
        await self._save(rec)

    async def _unload(self, rec: RolloutRecord) -> None:
        version = rec.unload_version
        current = self._control.desired()
        rec.unload_version = ""
        in_use = self._active is not None and version in (
            self._active.candidate,
            self._active.stable,
        )
        if (
            current is not None
            and version in current.loaded
            and not in_use
            and not any(r.version == version and r.weight_bps for r in current.routes)
        ):
            await self._control.apply(
                DesiredState(
                    revision=current.revision + 1,
                    loaded=current.loaded - {version},
                    routes=current.routes,
                    stable_version=current.stable_version,
                    shadow=current.shadow,
                    lease_seconds=current.lease_seconds,
                    artifacts={k: v for k, v in current.artifacts.items() if k != version},
                )
            )
        if not rec.hooks_pending:
            self._retiring.pop(rec.rollout_id, None)
        await self._save(rec)

    def _desired(self, rec: RolloutRecord, revision: int) -> DesiredState:
        c, s = rec.candidate, rec.stable
        artifacts = {c: rec.artifact_uri} if rec.artifact_uri else {}
        both = frozenset({c, s})
        lease = self._cfg.lease_seconds
        st = rec.state if rec.state != "PAUSED" else rec.paused_from
        if st == "PROMOTED":
            return DesiredState(revision, both, (RouteSpec(c, 10_000),), c, None, lease, artifacts)
        if st in ("ROLLED_BACK", "ABORTED"):
            return DesiredState(revision, both, (RouteSpec(s, 10_000),), s, None, lease, artifacts)
        if st == "CANARY":
            w = rec.weight_bps
            routes = (RouteSpec(c, w), RouteSpec(s, 10_000 - w))
            return DesiredState(revision, both, routes, s, None, lease, artifacts)
        shadow = ShadowSpec(c, self._cfg.shadow.mirror_bps) if st == "SHADOW" else None
        return DesiredState(revision, both, (RouteSpec(s, 10_000),), s, shadow, lease, artifacts)

    # storage ---------------------------------------------------------------------

    async def _save(
        self,
        rec: RolloutRecord,
        *,
        history: Sequence[tuple[str, dict[str, Any]]] = (),
        now: int | None = None,
    ) -> None:
        if rec.active and self._judge is not None and rec.state in ("CANARY", "PAUSED"):
            rec.analysis["judge"] = self._judge.state()
        raw = rec.to_json()
        active = rec.active
        rid = rec.rollout_id
        stable = self._stable_version.encode()
        store = self._store
        when = now if now is not None else self._clock.now_ms()

        def write(txn: lmdb.Transaction) -> None:
            db = store.db("rollouts")
            txn.put(_rec_key(rid), raw, db=db)
            if active:
                txn.put(_ACTIVE_KEY, rid.encode(), db=db)
            else:
                cur = txn.get(_ACTIVE_KEY, db=db)
                if cur is not None and bytes(cur) == rid.encode():
                    txn.delete(_ACTIVE_KEY, db=db)
                self._drop_observations(txn, rid)
            if stable:
                txn.put(_STABLE_KEY, stable, db=db)
            for kind, doc in history:
                with ins.span(
                    f"rollout.{kind}",
                    parent=rec.traceparent or None,
                    rollout_id=rid,
                    candidate=rec.candidate,
                    state=rec.state,
                    stage_index=rec.stage_index,
                ):
                    append_history(txn, store, kind, time_ms=when, **doc, **ins.trace_fields())

        await self._writer.run(write)
        self._last_checkpoint = self._clock.now_ms()
        self.observer.stable_version = self._stable_version

    def _drop_observations(self, txn: lmdb.Transaction, rollout_id: str) -> None:
        prefix = obs_prefix(rollout_id)
        db = self._store.db("rollouts")
        with txn.cursor(db=db) as cur:
            ok = cur.set_range(prefix)
            while ok and bytes(cur.key()).startswith(prefix):
                ok = cur.delete()

    def _scan(self, txn: lmdb.Transaction, limit: int) -> list[RolloutRecord]:
        out: list[RolloutRecord] = []
        with txn.cursor(db=self._store.db("rollouts")) as cur:
            ok = cur.prev() if cur.set_range(_REC + b"\xff") else cur.last()
            while ok and bytes(cur.key()).startswith(_REC):
                out.append(RolloutRecord.from_json(bytes(cur.value())))
                if limit and len(out) >= limit:
                    break
                ok = cur.prev()
        return out

    def _last_promoted(self) -> RolloutRecord | None:
        for rec in self.list_rollouts(50):
            if rec.state == "PROMOTED":
                return rec
        return None

    def _require_active(self, rollout_id: str) -> RolloutRecord:
        rec = self._active
        if rec is None:
            if rollout_id and self.get(rollout_id) is None:
                raise RolloutNotFoundError(f"rollout_id: no rollout {rollout_id!r}")
            raise RolloutConflictError("no rollout is in progress")
        if rollout_id and rollout_id != rec.rollout_id:
            other = self.get(rollout_id)
            if other is None:
                raise RolloutNotFoundError(f"rollout_id: no rollout {rollout_id!r}")
            raise RolloutConflictError(f"rollout {rollout_id} is {other.state}, not in progress")
        return rec

    def _set_active(self, rec: RolloutRecord) -> None:
        self._active = rec
        self.observer.view = ActiveView(
            rec.rollout_id, rec.candidate, rec.stable, rec.state == "SHADOW"
        )
        if rec.state in ("CANARY", "PAUSED") and rec.analysis.get("judge") is not None:
            self._judge = self._judge_factory(self._cfg.canary, rec.analysis["judge"])
        else:
            self._judge = self._judge_factory(self._cfg.canary, None)

    def _lookup_candidate(self, version: str) -> tuple[str, str]:
        """(artifact_uri, update_id) of a registered candidate.

        Raises:
            RolloutNotFoundError: the registry does not hold ``version``.
        """
        if self._candidates is None:
            return "", ""
        found = self._candidates.get(version)
        if found is None:
            raise RolloutNotFoundError(
                f"candidate_version {version!r} is not registered; "
                "register it (RegisterCandidate) before starting its rollout"
            )
        return found.artifact_uri, found.update_id
