"""Holdout and replay through a real daemon: nothing held out is ever exported for training.

Thousands of answers stream in through the Python ``EventStream`` (ratings,
implicit signals, retries, edits, repeated prompts over three tasks). Two
manual triggers write two dataset snapshots: the first fills the episodic
memory, the second shows the replay ratio exactly. Every dataset file and
every export (``ExportSamples`` while the daemon runs, ``atlas-sidecar
export`` on the stopped data dir) is checked against the holdout read back
from the store.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from atlas_sidecar_client import EventStream, Signal
from atlas_sidecar_client.pb import admin_pb2, admin_pb2_grpc

from sidecar.cli import main as cli_main
from sidecar.config import load_config
from sidecar.learning import HoldoutSet
from sidecar.scoring import iter_pairs, iter_samples
from sidecar.store import Store
from sidecar.testing import DaemonProcess

#: answers per phase: the second is smaller, so what the first update put in
#: memory covers all the replay the second asks for
PHASES = {1: 2500, 2: 1500}
CAPACITY = 1000
FRACTION = 0.15
REPLAY_RATIO = 0.5


def _config(path: Path) -> Path:
    doc: dict[str, Any] = {
        "store": {"sync": False},
        "scoring": {"reward_window_seconds": 0.3, "dwell_engage_ms": 0},
        # only manual triggers: the test decides when a snapshot is written
        "learning": {
            "sample_count": 1_000_000,
            "time_interval_seconds": 1_000_000,
            "evaluate_interval_seconds": 0.1,
            "min_interval_seconds": 0,
        },
        "holdout": {"fraction": FRACTION, "max_per_task": 0},
        "memory": {"replay_ratio": REPLAY_RATIO, "capacity_per_task": CAPACITY},
        # every good sample clears the threshold, so the batch size is known
        "selective": {"value_threshold": 0.0, "max_batch_samples": 0},
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def _stream_traffic(stream: EventStream, phase: int, n: int) -> None:
    """Answers with ratings, signals, retries, edits and prompts asked several times."""
    rnd = random.Random(1000 + phase)
    last_prompt = ""
    for i in range(n):
        rid = f"p{phase}-r{i}"
        # about a third of the prompts repeat (other answers to them make
        # score pairs); retries repeat the previous prompt
        prompt = f"phase {phase} question {rnd.randrange(n * 2 // 3)}"
        retry_of = ""
        if i and rnd.random() < 0.08:
            retry_of = f"p{phase}-r{i - 1}"
            prompt = last_prompt
        last_prompt = prompt
        stream.record_inference(
            rid,
            "v1",
            prompt=prompt,
            response=f"answer {phase}-{i} " + " ".join(rnd.choice("abcdefgh") for _ in range(6)),
            token_logprobs=[-rnd.random() * 2 for _ in range(5)],
            user_id=f"user{rnd.randrange(40)}",
            retry_of=retry_of,
            attributes={
                "task_id": rnd.choice(["chat", "chat", "code", "sql"]),
                "priority": rnd.choice(["low", "normal", "high"]),
            },
        )
        roll = rnd.random()
        if roll < 0.55:
            stream.record_feedback(rid, rating=rnd.choice([0.0, 0.2, 0.8, 0.9, 1.0]))
        elif roll < 0.75:
            stream.record_feedback(rid, signal=rnd.choice([Signal.COPY, Signal.SHARE]))
        elif roll < 0.85:
            stream.record_feedback(rid, signal=Signal.DISMISS)
        elif roll < 0.93:
            stream.record_feedback(
                rid, signal=Signal.EDIT, correction=f"corrected answer {phase}-{i}"
            )


class _Admin:
    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = admin_pb2_grpc.AdminServiceStub(self.channel)

    def status(self) -> dict[str, Any]:
        resp = self.stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=10)
        doc: dict[str, Any] = json.loads(resp.details_json)
        return doc

    def wait(self, cond: Callable[[dict[str, Any]], bool], timeout: float = 90) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = self.status()
            if cond(last):
                return last
            time.sleep(0.1)
        raise AssertionError(f"condition not met in {timeout}s; last status: {last['learning']}")

    def export(self, kind: str) -> list[dict[str, Any]]:
        k = {
            "sft": admin_pb2.EXPORT_KIND_SFT,
            "dpo": admin_pb2.EXPORT_KIND_DPO,
            "kto": admin_pb2.EXPORT_KIND_KTO,
        }[kind]
        rows = self.stub.ExportSamples(admin_pb2.ExportSamplesRequest(kind=k), timeout=60)
        return [json.loads(r.json) for r in rows]

    def trigger(self, reason: str) -> str:
        resp = self.stub.TriggerLearning(
            admin_pb2.TriggerLearningRequest(reason=reason), timeout=10
        )
        assert resp.fired, resp.reason
        return str(resp.update_id)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path / "data", config=_config(tmp_path / "c.yaml"), http_port=0)
    d.start()
    try:
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()


def _settled(total: int) -> Callable[[dict[str, Any]], bool]:
    def cond(s: dict[str, Any]) -> bool:
        lrn = s["learning"]
        return bool(
            lrn["samples"] >= total
            and lrn["open_requests"] == 0
            and s["processing"]["processors"]["scoring"]["lag"] == 0
        )

    return cond


def _snapshot(data_dir: Path, admin: _Admin, update_id: str) -> dict[str, Any]:
    admin.wait(
        lambda s: (
            (s["learning"]["last_update"] or {}).get("update_id") == update_id
            and s["learning"]["in_flight"] == ""
        )
    )
    folder = data_dir / "datasets" / update_id
    files = {"sft": "sft.jsonl", "dpo": "preferences.jsonl", "kto": "kto.jsonl"}
    out: dict[str, Any] = {
        kind: [json.loads(line) for line in (folder / name).read_text().splitlines()]
        for kind, name in files.items()
    }
    out["manifest"] = json.loads((folder / "manifest.json").read_text())
    return out


def _prompts(rows: list[dict[str, Any]]) -> set[str]:
    return {r["prompt"] for r in rows}


def test_held_out_samples_never_exported_and_replay_ratio_exact(
    tmp_path: Path, daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    admin = _Admin(daemon.target)
    stream = EventStream(daemon.target)
    snapshots: list[dict[str, Any]] = []
    grpc_exports: dict[str, list[dict[str, Any]]] = {}
    try:
        total = 0
        for phase, n in PHASES.items():
            _stream_traffic(stream, phase, n)
            total += n
            assert stream.flush(60)
            admin.wait(_settled(total))
            uid = admin.trigger(f"phase {phase}")
            snapshots.append(_snapshot(daemon.data_dir, admin, uid))
        assert stream.stats.rejected == 0
        # what an operator sees: atlas-sidecar status --json
        capsys.readouterr()
        assert cli_main(["status", "--target", daemon.target, "--json"]) == 0
        status = json.loads(capsys.readouterr().out)["details"]
        grpc_exports = {kind: admin.export(kind) for kind in ("sft", "dpo", "kto")}
    finally:
        stream.close(5)
        admin.channel.close()
    assert daemon.stop() == 0

    # -- what the store says is held out, and what it could have leaked -------
    config = load_config(
        daemon.config, environ={}, overrides={"store": {"data_dir": str(daemon.data_dir)}}
    )
    store = Store(config.store)
    store.open()
    try:
        holdout = HoldoutSet(store, config.holdout)
        with store.read() as txn:
            held = list(holdout.items(txn))
            samples = list(iter_samples(txn, store))
            pairs = list(iter_pairs(txn, store))
            held_ids = {s.request_id for s in samples if holdout.is_held_out(txn, s.request_id)}
            counts = holdout.counts(txn)
    finally:
        store.close()
    held_prompts = {h.prompt for h in held}
    good = [s for s in samples if s.qualifies]
    assert len(samples) == sum(PHASES.values())
    # stratified by task, about FRACTION of each task's good samples
    assert set(counts) == {"chat", "code", "sql"}
    for task, c in counts.items():
        assert c["held"] >= 0.8 * FRACTION * c["offered"], (task, c)
        assert c["held"] <= 1.3 * FRACTION * c["offered"] + 2, (task, c)
    assert len(held) > 200
    assert held_ids == {h.sample_id for h in held}
    # the test can fail: held-out prompts have other answers, feedback and pairs
    assert sum(1 for s in samples if s.prompt in held_prompts) > len(held)
    assert any(set(p.request_ids) & held_ids for p in pairs)
    assert any(p.prompt in held_prompts and p.kind == "edit" for p in pairs)
    assert any(p.prompt in held_prompts and p.kind in ("retry", "score") for p in pairs)

    # -- offline export (atlas-sidecar export on the stopped data dir) --------
    cli_exports: dict[str, list[dict[str, Any]]] = {}
    for kind in ("sft", "dpo", "kto"):
        out = tmp_path / f"{kind}.jsonl"
        argv = ["export", "--kind", kind, "--out", str(out), "--data-dir", str(daemon.data_dir)]
        assert cli_main([*argv, "--config", str(daemon.config)]) == 0
        cli_exports[kind] = [json.loads(line) for line in out.read_text().splitlines()]

    # -- nothing held out anywhere ---------------------------------------------
    everything = {
        **{
            f"snapshot{i}:{k}": snap[k]
            for i, snap in enumerate(snapshots)
            for k in ("sft", "dpo", "kto")
        },
        **{f"grpc:{k}": rows for k, rows in grpc_exports.items()},
        **{f"cli:{k}": rows for k, rows in cli_exports.items()},
    }
    for name, rows in everything.items():
        assert rows, name
        leaked = _prompts(rows) & held_prompts
        assert not leaked, (name, sorted(leaked)[:5])
        if name.endswith("dpo"):
            for r in rows:
                assert r["chosen"] not in {h.completion for h in held}, name
        else:
            held_completions = {h.completion for h in held}
            assert not {r["completion"] for r in rows} & held_completions, name
    # the exports are the store's trainable rows, no fewer
    trainable_sft = [s for s in good if s.prompt not in held_prompts]
    assert len(cli_exports["sft"]) == len(grpc_exports["sft"]) == len(trainable_sft)

    # -- replay: memory filled by the first update, exact ratio in the second --
    first, second = snapshots
    assert {r["source"] for r in first["sft"]} == {"new"}  # memory was empty
    new = [r for r in second["sft"] if r["source"] == "new"]
    replay = [r for r in second["sft"] if r["source"] == "replay"]
    assert len(new) > 500
    assert len(replay) == round(len(new) * REPLAY_RATIO / (1 - REPLAY_RATIO))
    comp = second["manifest"]["composition"]
    assert comp["replay"] == len(replay) and comp["new"] == len(new)
    assert comp["replay_ratio"] == len(replay) / (len(new) + len(replay))
    # replayed rows are what the first update trained on (phase 1 prompts)
    assert _prompts(replay) <= _prompts(first["sft"])
    assert all(r["prompt"].startswith("phase 1 ") for r in replay)
    # phase 2's new rows: its good, trainable samples, highest value first
    phase2_good = [s for s in trainable_sft if s.prompt.startswith("phase 2 ")]
    assert len(new) == len(phase2_good)
    assert second["manifest"]["counts"]["by_source"]["replay"] >= len(replay)
    assert comp["held_out"] > 0 and comp["held_out_pairs_dropped"] > 0

    # -- status and the report fields ------------------------------------------
    mem = status["memory"]
    assert set(mem["size_per_task"]) == {"chat", "code", "sql"}
    assert 0 < mem["size"] <= 3 * CAPACITY
    assert status["holdout"]["size"] == len(held)
    # under capacity, memory holds exactly what the two updates trained on
    trained = Counter(s.attribute("task_id") for s in trainable_sft)
    assert max(trained.values()) < CAPACITY
    assert mem["size_per_task"] == dict(trained)
    assert status["holdout"]["size"] == len(held)
    assert status["holdout"]["size_per_task"] == {t: c["held"] for t, c in counts.items()}
    active = status["active_learning"]
    assert {"ask_rate", "answer_rate"} <= set(active)
