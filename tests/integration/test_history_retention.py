"""The learning history is trimmed by age and count, like the event log.

A real daemon (in-process app, real gRPC, real LMDB); entries come in through
AdminService (each RegisterCandidate appends one) and one is written with an
old timestamp through the daemon's own writer.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
from atlas_sidecar_client.pb import admin_pb2, admin_pb2_grpc

from sidecar.app import SidecarApp
from sidecar.store import append_history, read_history
from sidecar.testing import free_port
from tests._helpers import fixed_port_config, wait_until

DAY_MS = 86_400_000


def _history(app: SidecarApp) -> list[dict[str, Any]]:
    with app.store.read() as txn:
        return list(read_history(txn, app.store))


async def _daemon(tmp_path: Path, **learning: Any) -> SidecarApp:
    config = fixed_port_config(
        tmp_path / "data",
        free_port(),
        store={"retention_interval_seconds": 0.1, "retention_batch": 100},
        learning=learning,
    )
    app = SidecarApp(config)
    await app.start()
    return app


async def test_history_is_trimmed_to_its_count_oldest_first(tmp_path: Path) -> None:
    app = await _daemon(tmp_path, history_max_entries=10, history_retention_seconds=0)
    try:
        async with grpc.aio.insecure_channel(next(iter(app.ports))) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            for i in range(30):
                await admin.RegisterCandidate(admin_pb2.RegisterCandidateRequest(version=f"v{i}"))
            await wait_until(lambda: len(_history(app)) <= 10)
            kept = _history(app)
            assert [d["version"] for d in kept] == [f"v{i}" for i in range(20, 30)]
            # sequence numbers go on from where they were
            await admin.RegisterCandidate(admin_pb2.RegisterCandidateRequest(version="v30"))
            await wait_until(lambda: _history(app)[-1]["version"] == "v30")
            assert _history(app)[-1]["seq"] == 31
            # the registry itself keeps every version: only the history is trimmed
            assert app.registry.count() == 31
            report = await admin.GetReport(admin_pb2.GetReportRequest())
            assert report.json
            assert app.status_dict()["details"]["history"]["history_deleted"] >= 20
    finally:
        await app.shutdown()


async def test_history_older_than_its_retention_is_trimmed(tmp_path: Path) -> None:
    app = await _daemon(tmp_path, history_max_entries=0, history_retention_seconds=86400)
    try:
        now = time.time_ns() // 1_000_000
        await app.writer.run(
            lambda txn: append_history(txn, app.store, "trigger", time_ms=now - 2 * DAY_MS)
        )
        await app.writer.run(
            lambda txn: append_history(txn, app.store, "trigger", time_ms=now - DAY_MS // 2)
        )
        async with grpc.aio.insecure_channel(next(iter(app.ports))) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            await admin.RegisterCandidate(admin_pb2.RegisterCandidateRequest(version="v1"))
        await wait_until(lambda: len(_history(app)) == 2)
        kept = _history(app)
        assert [d["seq"] for d in kept] == [2, 3]
        assert kept[0]["time_ms"] == now - DAY_MS // 2
    finally:
        await app.shutdown()


async def test_the_newest_entry_is_always_kept(tmp_path: Path) -> None:
    app = await _daemon(tmp_path, history_max_entries=1, history_retention_seconds=1)
    try:
        old = time.time_ns() // 1_000_000 - DAY_MS
        for _ in range(3):
            await app.writer.run(lambda txn: append_history(txn, app.store, "trigger", time_ms=old))
        await wait_until(lambda: len(_history(app)) == 1)
        await app.history_retention.run_once()
        assert [d["seq"] for d in _history(app)] == [3]
    finally:
        await app.shutdown()
