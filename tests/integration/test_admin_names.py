"""AdminService names: checked where they enter, and a rollout loads what was registered.

A real daemon (in-process app, real gRPC on loopback, real LMDB) and a real
ControlService.Connect stream from the client library's ControlLoop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from atlas_sidecar_client import ControlLoop, Router
from atlas_sidecar_client.pb import admin_pb2, admin_pb2_grpc

from sidecar.app import SidecarApp
from sidecar.testing import free_port
from tests._helpers import FAST_CONTROL_RETRY, fixed_port_config

WAIT = 20.0

_NO_ANALYSIS = {
    "initial_stable_version": "v1",
    "validation": {"enabled": False},
    "shadow": {"enabled": False},
}


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[SidecarApp]:
    config = fixed_port_config(
        tmp_path / "data", free_port(), rollout=_NO_ANALYSIS, control=FAST_CONTROL_RETRY
    )
    a = SidecarApp(config)
    await a.start()
    yield a
    await a.shutdown()


@pytest.fixture
async def admin(app: SidecarApp) -> AsyncIterator[admin_pb2_grpc.AdminServiceStub]:
    async with grpc.aio.insecure_channel(next(iter(app.ports))) as channel:
        yield admin_pb2_grpc.AdminServiceStub(channel)


async def _refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value


async def test_operator_rollout_loads_the_registered_artifact_uri(
    app: SidecarApp, admin: admin_pb2_grpc.AdminServiceStub
) -> None:
    loads: list[tuple[str, str]] = []
    loaded = asyncio.Event()

    async def on_load(version: str, artifact_uri: str) -> None:
        loads.append((version, artifact_uri))
        loaded.set()

    loop = ControlLoop(
        next(iter(app.ports)),
        "pod-a",
        router=Router(),
        on_load=on_load,
        on_unload=lambda version: None,
        loaded_versions={"v1"},
        backoff_initial=0.02,
        backoff_max=0.2,
    )
    async with loop:
        async with asyncio.timeout(WAIT):
            await loop.wait_connected()
        await admin.RegisterCandidate(
            admin_pb2.RegisterCandidateRequest(
                version="v2", artifact_uri="s3://models/v2/adapter", update_id="u-1"
            )
        )
        started = await admin.StartRollout(admin_pb2.StartRolloutRequest(candidate_version="v2"))
        assert started.state == admin_pb2.ROLLOUT_STATE_CANARY
        async with asyncio.timeout(WAIT):
            await loaded.wait()
    assert loads[0] == ("v2", "s3://models/v2/adapter")
    desired = app.control.desired()
    assert desired is not None and desired.artifacts == {"v2": "s3://models/v2/adapter"}


async def test_start_rollout_of_an_unregistered_version_is_refused(
    app: SidecarApp, admin: admin_pb2_grpc.AdminServiceStub
) -> None:
    err = await _refused(admin.StartRollout(admin_pb2.StartRolloutRequest(candidate_version="v9")))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "'v9'" in (err.details() or "") and "not registered" in (err.details() or "")
    assert not app.rollout_active()
    assert app.control.desired() is None


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (admin_pb2.RegisterCandidateRequest(version="../etc"), "register.version"),
        (admin_pb2.RegisterCandidateRequest(version="-rf"), "register.version"),
        (admin_pb2.RegisterCandidateRequest(version="v 2"), "register.version"),
        (admin_pb2.RegisterCandidateRequest(version="v" * 129), "register.version"),
        (
            admin_pb2.RegisterCandidateRequest(version="v2", update_id="u/../../x"),
            "register.update_id",
        ),
        (
            admin_pb2.RegisterCandidateRequest(version="v2", base_version=".hidden"),
            "register.base_version",
        ),
        (
            admin_pb2.StartRolloutRequest(candidate_version="v2;rm"),
            "start_rollout.candidate_version",
        ),
        (admin_pb2.AbortRolloutRequest(rollout_id="../r"), "abort_rollout.rollout_id"),
        (admin_pb2.PromoteRolloutRequest(rollout_id="a b"), "promote_rollout.rollout_id"),
        (admin_pb2.RollbackRequest(rollout_id="\n"), "rollback.rollout_id"),
    ],
)
async def test_bad_names_are_refused_naming_the_field(
    app: SidecarApp,
    admin: admin_pb2_grpc.AdminServiceStub,
    request_: object,
    field: str,
) -> None:
    rpc = {
        admin_pb2.RegisterCandidateRequest: admin.RegisterCandidate,
        admin_pb2.StartRolloutRequest: admin.StartRollout,
        admin_pb2.AbortRolloutRequest: admin.AbortRollout,
        admin_pb2.PromoteRolloutRequest: admin.PromoteRollout,
        admin_pb2.RollbackRequest: admin.Rollback,
    }[type(request_)]
    err = await _refused(rpc(request_))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.details() or "").startswith(f"{field}: ")
    assert app.registry.count() == 0
    assert not app.rollout_active()
    assert app.status_dict()["details"]["admin"]["invalid_requests"] == 1


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            admin_pb2.RegisterCandidateRequest(version="v2", artifact_uri="s3://" + "a" * 4092),
            "register.artifact_uri: longer than 4096 bytes (admin.max_artifact_uri_bytes)",
        ),
        (
            admin_pb2.RegisterCandidateRequest(
                version="v2", metrics={f"m{i}": 1.0 for i in range(65)}
            ),
            "register.metrics: more than 64 (admin.max_metrics)",
        ),
        (
            admin_pb2.RegisterCandidateRequest(version="v2", metrics={"m" * 129: 1.0}),
            "register.metrics: longer than 128 bytes (admin.max_metric_name_bytes)",
        ),
        (
            admin_pb2.StartRolloutRequest(candidate_version="v2", reason="é" * 513),
            "start_rollout.reason: longer than 1024 bytes (admin.max_reason_bytes)",
        ),
        (
            admin_pb2.AbortRolloutRequest(reason="x" * 1025),
            "abort_rollout.reason: longer than 1024 bytes (admin.max_reason_bytes)",
        ),
        (
            admin_pb2.PromoteRolloutRequest(reason="x" * 1025),
            "promote_rollout.reason: longer than 1024 bytes (admin.max_reason_bytes)",
        ),
        (
            admin_pb2.RollbackRequest(reason="x" * 1025),
            "rollback.reason: longer than 1024 bytes (admin.max_reason_bytes)",
        ),
        (
            admin_pb2.TriggerLearningRequest(reason="x" * 1025),
            "trigger_learning.reason: longer than 1024 bytes (admin.max_reason_bytes)",
        ),
    ],
)
async def test_text_over_its_limit_is_refused_naming_the_field(
    app: SidecarApp,
    admin: admin_pb2_grpc.AdminServiceStub,
    request_: object,
    message: str,
) -> None:
    rpc = {
        admin_pb2.RegisterCandidateRequest: admin.RegisterCandidate,
        admin_pb2.StartRolloutRequest: admin.StartRollout,
        admin_pb2.AbortRolloutRequest: admin.AbortRollout,
        admin_pb2.PromoteRolloutRequest: admin.PromoteRollout,
        admin_pb2.RollbackRequest: admin.Rollback,
        admin_pb2.TriggerLearningRequest: admin.TriggerLearning,
    }[type(request_)]
    if isinstance(request_, admin_pb2.StartRolloutRequest):
        await admin.RegisterCandidate(admin_pb2.RegisterCandidateRequest(version="v2"))
    err = await _refused(rpc(request_))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == message
    assert not app.rollout_active()
    assert app.training.status()["last_decisions"] == []


async def test_text_at_its_limit_is_accepted(
    app: SidecarApp, admin: admin_pb2_grpc.AdminServiceStub
) -> None:
    uri = "s3://" + "a" * 4091
    resp = await admin.RegisterCandidate(
        admin_pb2.RegisterCandidateRequest(
            version="v2", artifact_uri=uri, metrics={f"m{i}": 1.0 for i in range(64)}
        )
    )
    assert resp.model.artifact_uri == uri
    started = await admin.StartRollout(
        admin_pb2.StartRolloutRequest(candidate_version="v2", reason="r" * 1024)
    )
    assert started.transitions[0].reason == "r" * 1024


async def test_the_limits_are_config_keys(tmp_path: Path) -> None:
    config = fixed_port_config(
        tmp_path / "data",
        free_port(),
        rollout=_NO_ANALYSIS,
        admin={"max_reason_bytes": 16},
    )
    app = SidecarApp(config)
    await app.start()
    try:
        async with grpc.aio.insecure_channel(next(iter(app.ports))) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            err = await _refused(
                admin.TriggerLearning(admin_pb2.TriggerLearningRequest(reason="x" * 17))
            )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details() == (
            "trigger_learning.reason: longer than 16 bytes (admin.max_reason_bytes)"
        )
    finally:
        await app.shutdown()
