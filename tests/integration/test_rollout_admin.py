"""Rollout RPCs and the CLI against a real daemon (in-process app, real gRPC, real LMDB)."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from atlas_sidecar_client.pb import admin_pb2, admin_pb2_grpc

from sidecar.app import SidecarApp
from sidecar.cli import main as cli_main
from sidecar.config import load_config
from sidecar.testing import free_port


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[SidecarApp]:
    port = free_port()
    config = load_config(
        environ={},
        overrides={
            "server": {"listen": [f"127.0.0.1:{port}"], "http_listen": ""},
            "store": {"data_dir": str(tmp_path / "data"), "sync": False},
            "rollout": {
                "initial_stable_version": "v1",
                "validation": {"enabled": False},
                "shadow": {"enabled": False},
            },
        },
    )
    a = SidecarApp(config)
    await a.start()
    yield a
    await a.shutdown()


def _cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli_main(list(argv))
    return rc, out.getvalue()


async def test_rollout_admin_start_list_abort_over_grpc_and_cli(app: SidecarApp) -> None:
    target = next(iter(app.ports))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.StartRollout(admin_pb2.StartRolloutRequest())
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "candidate_version" in (err.value.details() or "")
        for version in ("v2", "v3"):
            await stub.RegisterCandidate(admin_pb2.RegisterCandidateRequest(version=version))
        started = await stub.StartRollout(admin_pb2.StartRolloutRequest(candidate_version="v2"))
        assert started.state == admin_pb2.ROLLOUT_STATE_CANARY
        assert started.candidate_weight_bps == 100
        assert app.rollout_active()
        desired = app.control.desired()
        assert desired is not None and {r.version for r in desired.routes} == {"v1", "v2"}
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.StartRollout(admin_pb2.StartRolloutRequest(candidate_version="v3"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        rc, text = await asyncio.to_thread(_cli, "rollout", "list", "--target", target)
        assert rc == 0 and "v2" in text and "CANARY" in text

        rc, text = await asyncio.to_thread(
            _cli, "rollout", "abort", "--target", target, "--reason", "test"
        )
        assert rc == 0 and "ABORTED" in text
        listed = await stub.ListRollouts(admin_pb2.ListRolloutsRequest())
        assert [r.state for r in listed.rollouts] == [admin_pb2.ROLLOUT_STATE_ABORTED]
        assert listed.rollouts[0].transitions[-1].reason == "test"
        assert not app.rollout_active()
        d = app.control.desired()
        assert d is not None and d.routes[0].version == "v1" and d.routes[0].weight_bps == 10_000
