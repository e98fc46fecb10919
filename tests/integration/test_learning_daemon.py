"""The learning loop in a real daemon: real gRPC, real LMDB, a real trainer subprocess."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from atlas_sidecar_client.pb import admin_pb2, admin_pb2_grpc, events_pb2, ingest_pb2_grpc

from sidecar.cli import main as cli_main
from sidecar.store import Store, read_cursor
from sidecar.testing import DaemonProcess

S = events_pb2.Signal
CLI = (sys.executable, "-m", "sidecar.cli")


def trainer_argv(mode_file: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sidecar.testing.fake_trainer",
        "--dataset-dir",
        "{dataset_dir}",
        "--output-dir",
        "{output_dir}",
        "--base-version",
        "{base_version}",
        "--mode-file",
        str(mode_file),
    ]


def write_config(path: Path, **sections: dict[str, Any]) -> Path:
    doc: dict[str, Any] = {
        "store": {"sync": False},
        "scoring": {"reward_window_seconds": 0.5},
        "learning": {"evaluate_interval_seconds": 0.1, "min_interval_seconds": 0},
    }
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(doc))
    return path


class Client:
    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.ingest = ingest_pb2_grpc.IngestServiceStub(self.channel)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)

    def send(self, events: list[events_pb2.Event]) -> None:
        for i in range(0, len(events), 250):
            ack = self.ingest.RecordEvents(
                events_pb2.EventBatch(events=events[i : i + 250]), timeout=30
            )
            assert not ack.rejected, ack.rejected

    def learning(self) -> dict[str, Any]:
        status = self.admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=10)
        details: dict[str, Any] = json.loads(status.details_json)
        return {**details["learning"], "_processing": details["processing"]}

    def wait(self, cond: Callable[[dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = self.learning()
            if cond(last):
                return last
            time.sleep(0.1)
        raise AssertionError(f"condition not met in {timeout}s; last learning status: {last}")

    def close(self) -> None:
        self.channel.close()


def traffic(n: int, *, seed: int = 7, tag: str = "") -> list[events_pb2.Event]:
    """PRIMARY answers with ratings, signals, retries, edits and repeated prompts."""
    rnd = random.Random(seed)
    out: list[events_pb2.Event] = []
    for i in range(n):
        rid = f"{tag}r{i}"
        prompt = f"question {rnd.randrange(n // 4 + 1)}"
        inf = events_pb2.Inference(
            request_id=rid,
            model_version="v1",
            prompt=prompt,
            response=f"answer {i}",
            user_id=f"user{rnd.randrange(12)}",
            token_logprobs=[-rnd.random() for _ in range(4)],
            attributes={"task_id": f"t{i % 3}"},
        )
        if i and rnd.random() < 0.1:
            inf.retry_of = f"{tag}r{i - 1}"
        out.append(events_pb2.Event(event_id=f"{tag}i{i}", inference=inf))
        roll = rnd.random()
        fb = events_pb2.Feedback(request_id=rid, user_id=inf.user_id)
        if roll < 0.6:
            fb.rating = rnd.choice([0.0, 0.3, 0.8, 0.9, 1.0])
        elif roll < 0.75:
            fb.signal = rnd.choice([S.COPY, S.RETRY, S.DISMISS, S.SHARE])
        elif roll < 0.85:
            fb.signal = S.EDIT
            fb.correction = f"better answer {i}"
        else:
            continue
        out.append(events_pb2.Event(event_id=f"{tag}f{i}", feedback=fb))
    return out


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., tuple[DaemonProcess, Client]]]:
    running: list[tuple[DaemonProcess, Client]] = []

    def make(config: Path, data: str = "data") -> tuple[DaemonProcess, Client]:
        d = DaemonProcess(tmp_path / data, config=config, http_port=0).start()
        c = Client(d.target)
        running.append((d, c))
        return d, c

    yield make
    for d, c in running:
        c.close()
        d.kill()


def test_count_trigger_trains_and_registers_the_candidate(
    tmp_path: Path, make_daemon: Callable[..., tuple[DaemonProcess, Client]]
) -> None:
    mode = tmp_path / "mode"
    mode.write_text("ok")
    cfg = write_config(
        tmp_path / "c.yaml",
        learning={"sample_count": 40},
        training={"hook": "command", "command": trainer_argv(mode), "timeout_seconds": 60},
    )
    daemon, client = make_daemon(cfg)
    client.send(traffic(120))
    st = client.wait(lambda s: bool(s["candidates"]))
    cand = st["candidates"][0]
    assert cand["version"] == "v1-upd-000001" and cand["update_id"] == "upd-000001"
    assert st["stable_version"] == "v1"  # the first version seen in PRIMARY traffic
    assert st["last_decisions"][-1]["trigger"] == "sample_count"

    ds = daemon.data_dir / "datasets" / "upd-000001"
    manifest = json.loads((ds / "manifest.json").read_text())
    assert manifest["trigger"]["name"] == "sample_count" and manifest["base_version"] == "v1"
    shapes = {
        "sft.jsonl": ["prompt", "completion", "reward", "source"],
        "preferences.jsonl": ["prompt", "chosen", "rejected", "margin", "reward", "source"],
        "kto.jsonl": ["prompt", "completion", "label", "reward", "source"],
    }
    for name, keys in shapes.items():
        lines = (ds / name).read_text().splitlines()
        assert len(lines) == manifest["files"][name]["rows"] > 0, name
        for line in lines:
            row = json.loads(line)
            assert list(row) == keys, (name, row)
            assert isinstance(row["prompt"], str) and row["prompt"].startswith("question")
            assert 0.0 <= row["reward"] <= 1.0 and row["source"] == "new"
            if name == "sft.jsonl":
                assert row["reward"] >= 0.7 and row["completion"].startswith("answer")
            elif name == "preferences.jsonl":
                assert row["chosen"] != row["rejected"] and row["margin"] >= 0
            else:
                assert isinstance(row["label"], bool)
                assert row["label"] == (row["reward"] >= 0.7)

    # the candidate is immutable: registering its version again is refused
    with pytest.raises(grpc.RpcError) as err:
        client.admin.RegisterCandidate(
            admin_pb2.RegisterCandidateRequest(version=cand["version"]), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS

    # the CLI exports the same shapes from the running daemon
    out = tmp_path / "sft.jsonl"
    subprocess.run(
        [*CLI, "export", "--kind", "sft", "--out", str(out), "--target", daemon.target],
        check=True,
        capture_output=True,
    )
    exported = [json.loads(x) for x in out.read_text().splitlines()]
    assert exported and all(r["reward"] >= 0.7 for r in exported)


def test_failing_trainers_are_recorded_and_do_not_storm(
    tmp_path: Path, make_daemon: Callable[..., tuple[DaemonProcess, Client]]
) -> None:
    mode = tmp_path / "mode"
    cfg = write_config(
        tmp_path / "c.yaml",
        learning={"sample_count": 100_000, "failure_backoff_seconds": 0},
        training={"hook": "command", "command": trainer_argv(mode), "timeout_seconds": 6},
    )
    daemon, client = make_daemon(cfg)
    expected = {
        "crash": "exited with code 3",
        "hang": "timed out",
        "broken": "candidate.json: not valid JSON",
        "silent": "wrote no candidate.json",
    }
    for n, (m, reason) in enumerate(expected.items(), start=1):
        mode.write_text(m)
        client.send(traffic(20, seed=n, tag=f"{m}-"))
        client.wait(lambda s: s["pending_samples"] > 0)
        resp = client.admin.TriggerLearning(
            admin_pb2.TriggerLearningRequest(reason=f"try {m}"), timeout=10
        )
        assert resp.fired, resp.reason
        uid = f"upd-{n:06d}"
        assert resp.update_id == uid
        st = client.wait(
            lambda s, uid=uid: (
                (s["last_update"] or {}).get("update_id") == uid
                and s["last_update"]["kind"] == "training_failed"
            )
        )
        assert reason in st["last_update"]["reason"]
        assert st["in_flight"] == "" and st["candidates"] == []
    time.sleep(1.0)  # give a storm the chance to show
    st = client.learning()
    fired = [d for d in st["last_decisions"] if d["kind"] == "trigger"]
    assert [d["trigger"] for d in fired] == ["manual"] * 4
    assert st["consecutive_failures"] == 4
    assert daemon.proc is not None and daemon.proc.poll() is None  # still serving


def grpc_export(client: Client, kind: str) -> bytes:
    k = {"sft": admin_pb2.EXPORT_KIND_SFT, "dpo": admin_pb2.EXPORT_KIND_DPO}.get(
        kind, admin_pb2.EXPORT_KIND_KTO
    )
    rows = client.admin.ExportSamples(admin_pb2.ExportSamplesRequest(kind=k), timeout=60)
    return "".join(r.json + "\n" for r in rows).encode()


def test_kill_9_then_restart_equals_an_uninterrupted_run(
    tmp_path: Path, make_daemon: Callable[..., tuple[DaemonProcess, Client]]
) -> None:
    cfg = write_config(tmp_path / "c.yaml", learning={"sample_count": 100_000})
    daemon, client = make_daemon(cfg)
    events = traffic(3000, seed=11)
    # one batch: its ack comes once it is durable, and processing it takes a while
    ack = client.ingest.RecordEvents(events_pb2.EventBatch(events=events), timeout=60)
    assert ack.accepted == len(events)
    daemon.kill()  # SIGKILL while the processors are still working through it
    store = Store(yaml_store_config(cfg, daemon.data_dir))
    store.open()
    with store.read() as txn:
        cursor = read_cursor(txn, store, "scoring")
        last = int(txn.stat(store.db("events"))["entries"])
    store.close()
    assert last == len(events)
    assert cursor <= last  # processing was cut short

    daemon, client = make_daemon(cfg)
    client.wait(
        lambda s: (
            s["open_requests"] == 0
            and s["_processing"]["processors"]["scoring"]["lag"] == 0
            and s["samples"] > 0
        )
    )
    after_crash = {kind: grpc_export(client, kind) for kind in ("sft", "dpo", "kto")}
    client.close()
    assert daemon.stop() == 0

    # the reference: recompute every view from the same log in one uninterrupted run
    rebuilt = subprocess.run(
        [*CLI, "reprocess", "--data-dir", str(daemon.data_dir), "--config", str(cfg)],
        check=True,
        capture_output=True,
        text=True,
    )
    assert "events (100%)" in rebuilt.stderr.splitlines()[-1], rebuilt.stderr
    for kind in ("sft", "dpo", "kto"):
        out = tmp_path / f"{kind}.jsonl"
        argv = ["export", "--kind", kind, "--out", str(out), "--data-dir", str(daemon.data_dir)]
        assert cli_main([*argv, "--config", str(cfg)]) == 0
        assert after_crash[kind].count(b"\n") > 10, kind
        assert after_crash[kind] == out.read_bytes(), kind


def yaml_store_config(cfg: Path, data_dir: Path) -> Any:
    from sidecar.config import load_config

    return load_config(cfg, environ={}, overrides={"store": {"data_dir": str(data_dir)}}).store
