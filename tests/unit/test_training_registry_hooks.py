"""Candidate registry, trainer hooks (real subprocesses, a real HTTP server), snapshots."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from atlas_sidecar_client.pb import admin_pb2

from sidecar.config import StoreConfig, TrainingConfig
from sidecar.scoring import Pair, Sample
from sidecar.store import Store, StoreWriter, read_history
from sidecar.testing import free_port
from sidecar.training import (
    CandidateExistsError,
    CommandHook,
    HttpHook,
    InvalidCandidateError,
    LearningBatch,
    ModelRecord,
    ModelRegistry,
    TrainingFailed,
    TrainingJob,
    write_snapshot,
)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[Store, StoreWriter]]:
    cfg = StoreConfig(data_dir=tmp_path / "data", sync=False)
    store = Store(cfg)
    store.open()
    writer = StoreWriter(store, cfg)
    await writer.start()
    yield store, writer
    await writer.shutdown()
    store.close()


async def test_registry_versions_are_immutable_and_callbacks_run(
    env: tuple[Store, StoreWriter],
) -> None:
    store, writer = env
    reg = ModelRegistry(store, writer)
    seen: list[str] = []

    async def on_registered(rec: ModelRecord) -> str | None:
        seen.append(rec.version)
        return f"ro-{rec.version}"

    async def broken(rec: ModelRecord) -> str | None:
        raise RuntimeError("listener bug")

    reg.on_registered += [broken, on_registered]
    resp = await reg.register(
        admin_pb2.RegisterCandidateRequest(
            version="v2", artifact_uri="s3://a", update_id="upd-000001", metrics={"loss": 0.5}
        )
    )
    assert resp.model.version == "v2" and resp.rollout_id == "ro-v2"
    assert resp.model.state == "candidate" and resp.model.metrics["loss"] == 0.5
    with pytest.raises(CandidateExistsError):
        await reg.register(admin_pb2.RegisterCandidateRequest(version="v2", artifact_uri="s3://b"))
    assert reg.get("v2") is not None and reg.get("v2").artifact_uri == "s3://a"  # type: ignore[union-attr]
    with pytest.raises(InvalidCandidateError, match="version"):
        await reg.register(admin_pb2.RegisterCandidateRequest(version=""))
    await reg.register(admin_pb2.RegisterCandidateRequest(version="v3"))
    assert [r.version for r in reg.list()] == ["v3", "v2"]
    assert reg.find_by_update("upd-000001").version == "v2"  # type: ignore[union-attr]
    assert seen == ["v2", "v3"]
    with store.read() as txn:
        kinds = [h["kind"] for h in read_history(txn, store)]
    assert kinds == ["candidate_registered", "candidate_registered"]


async def test_stable_version_from_traffic_then_promotion(env: tuple[Store, StoreWriter]) -> None:
    store, writer = env
    reg = ModelRegistry(store, writer)
    assert reg.stable_version() is None
    await writer.run(lambda txn: reg.observe_primary_version(txn, "v1"))
    await writer.run(lambda txn: reg.observe_primary_version(txn, "v9"))
    assert reg.stable_version() == "v1"
    await reg.register(admin_pb2.RegisterCandidateRequest(version="v2"))
    await reg.set_stable("v2")
    assert reg.stable_version() == "v2"
    assert reg.get("v2").state == "stable"  # type: ignore[union-attr]
    configured = ModelRegistry(store, writer, base_version="base")
    await configured.start()
    assert configured.stable_version() == "v2"  # a configured base never overrides


def _job(tmp_path: Path, timeout: float = 30.0) -> TrainingJob:
    batch = LearningBatch(
        samples=(
            Sample(1, 1, "a", "p", "good", 0.9, 0.8, True, True, "v1"),
            Sample(2, 2, "b", "p", "bad", 0.1, -0.8, True, False, "v1"),
        ),
        pairs=(Pair(1, "score", "p", "good", "bad", 0.8, 0.9),),
    )
    snap = write_snapshot(
        tmp_path / "datasets",
        "upd-000007",
        batch,
        trigger="manual",
        reason="test",
        base_version="v1",
        created_ms=1,
    )
    return TrainingJob(
        update_id="upd-000007",
        dataset_dir=snap.path,
        output_dir=tmp_path / "out",
        base_version="v1",
        manifest=snap.manifest,
        timeout_seconds=timeout,
    )


def _trainer(mode: str) -> CommandHook:
    return CommandHook(
        [
            sys.executable,
            "-m",
            "sidecar.testing.fake_trainer",
            "--dataset-dir",
            "{dataset_dir}",
            "--output-dir",
            "{output_dir}",
            "--base-version",
            "{base_version}",
            "--mode",
            mode,
        ]
    )


def test_snapshot_files_and_manifest(tmp_path: Path) -> None:
    job = _job(tmp_path)
    files = {p.name for p in job.dataset_dir.iterdir()}
    assert files == {"sft.jsonl", "preferences.jsonl", "kto.jsonl", "manifest.json"}
    sft = [json.loads(x) for x in (job.dataset_dir / "sft.jsonl").read_text().splitlines()]
    kto = [json.loads(x) for x in (job.dataset_dir / "kto.jsonl").read_text().splitlines()]
    dpo = [json.loads(x) for x in (job.dataset_dir / "preferences.jsonl").read_text().splitlines()]
    assert sft == [{"prompt": "p", "completion": "good", "reward": 0.9, "source": "new"}]
    assert [r["label"] for r in kto] == [True, False]
    assert dpo[0]["chosen"] == "good" and dpo[0]["rejected"] == "bad" and dpo[0]["margin"] == 0.8
    m = job.manifest
    assert m["counts"]["sft"] == 1 and m["counts"]["kto"] == 2 and m["counts"]["dpo"] == 1
    assert m["trigger"]["name"] == "manual" and m["base_version"] == "v1"


async def test_command_hook_success(tmp_path: Path) -> None:
    spec = await _trainer("ok").train(_job(tmp_path))
    assert spec is not None and spec.version == "v1-upd-000007"
    assert spec.metrics["rows_sft"] == 1.0
    assert "wrote candidate" in (tmp_path / "out" / "trainer.log").read_text()


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("crash", "exited with code 3"),
        ("hang", "timed out"),
        ("broken", "candidate.json: not valid JSON"),
    ],
)
async def test_command_hook_failures(tmp_path: Path, mode: str, reason: str) -> None:
    with pytest.raises(TrainingFailed, match=reason):
        await _trainer(mode).train(_job(tmp_path, timeout=1.5 if mode == "hang" else 60))


async def test_command_hook_missing_binary(tmp_path: Path) -> None:
    with pytest.raises(TrainingFailed, match="cannot start trainer"):
        await CommandHook(["/nonexistent/trainer"]).train(_job(tmp_path))


async def test_http_hook_retries_then_takes_the_candidate(tmp_path: Path) -> None:
    calls: list[dict[str, object]] = []

    async def handle(request: web.Request) -> web.Response:
        calls.append(await request.json())
        if len(calls) < 3:
            return web.Response(status=503, text="busy")
        return web.json_response({"version": "v-http", "artifact_uri": "s3://x"})

    app = web.Application()
    app.router.add_post("/train", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        hook = HttpHook(f"http://127.0.0.1:{port}/train", retries=3, backoff_seconds=0.01)
        spec = await hook.train(_job(tmp_path))
        assert spec is not None and spec.version == "v-http"
        assert len(calls) == 3 and calls[0]["update_id"] == "upd-000007"
        assert calls[0]["files"]["sft.jsonl"]["rows"] == 1  # type: ignore[index]
        bad = HttpHook(f"http://127.0.0.1:{port}/nope", retries=1, backoff_seconds=0.01)
        with pytest.raises(TrainingFailed, match="HTTP 404"):
            await bad.train(_job(tmp_path))
    finally:
        await runner.cleanup()


def test_training_config_names_the_bad_key() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="command"):
        TrainingConfig(hook="command")
    with pytest.raises(ValidationError, match="hook"):
        TrainingConfig(hook="carrier-pigeon")
