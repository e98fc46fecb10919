"""ControlService against hostile or broken servers: a real daemon, real gRPC, real LMDB.

A server's Hello and Applied are input like any other: a revision the sidecar
never issued, names that are not names, oversized records, bytes that are not
UTF-8. None of them may poison the stored state, and the daemon keeps starting
rollouts (also after a restart).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from atlas_sidecar_client.pb import admin_pb2, admin_pb2_grpc, control_pb2, control_pb2_grpc

from sidecar.app import SidecarApp
from sidecar.control import DesiredState, RouteSpec
from sidecar.control._state import REPLICA_PREFIX, Replica
from sidecar.testing import free_port
from tests._helpers import FAST_CONTROL_RETRY, fixed_port_config, running_store, wait_until

WAIT = 20.0
HOSTILE_REVISION = 2**64 - 5

#: A daemon whose operator-started rollouts go straight to the canary.
ROLLOUT = {
    "initial_stable_version": "v1",
    "validation": {"enabled": False},
    "shadow": {"enabled": False},
}


def _app(data_dir: Path, port: int, **control: Any) -> SidecarApp:
    return SidecarApp(
        fixed_port_config(
            data_dir, port, control={**FAST_CONTROL_RETRY, **control}, rollout=ROLLOUT
        )
    )


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[SidecarApp]:
    app = _app(tmp_path / "data", free_port())
    await app.start()
    yield app
    await app.shutdown()


def _target(app: SidecarApp) -> str:
    return next(iter(app.ports))


async def _hello(channel: grpc.aio.Channel, hello: control_pb2.Hello) -> grpc.aio.StreamStreamCall:
    """Opens Connect and says ``hello``; returns once the sidecar has taken it (or refused it)."""
    call = control_pb2_grpc.ControlServiceStub(channel).Connect()
    await call.write(control_pb2.ServerMessage(hello=hello))
    await call.initial_metadata()
    return call


async def _refused(channel: grpc.aio.Channel, hello: control_pb2.Hello) -> grpc.aio.AioRpcError:
    """The error that ends the stream after ``hello``; fails the test if the stream stays open."""
    call = await _hello(channel, hello)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async with asyncio.timeout(WAIT):
            await call.read()
    return info.value


async def _rollout_round_trip(app: SidecarApp, candidate: str = "v2") -> None:
    """Registers ``candidate``, then StartRollout and AbortRollout over gRPC; all must succeed."""
    async with grpc.aio.insecure_channel(_target(app)) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        await admin.RegisterCandidate(
            admin_pb2.RegisterCandidateRequest(
                version=candidate, artifact_uri=f"file:///models/{candidate}"
            )
        )
        started = await admin.StartRollout(
            admin_pb2.StartRolloutRequest(candidate_version=candidate)
        )
        assert started.state == admin_pb2.ROLLOUT_STATE_CANARY
        aborted = await admin.AbortRollout(admin_pb2.AbortRolloutRequest(reason="test"))
        assert aborted.state == admin_pb2.ROLLOUT_STATE_ABORTED
    desired = app.control.desired()
    assert desired is not None and desired.revision < 100


def _stored_replicas(app: SidecarApp) -> dict[str, Replica]:
    store = app.store
    out = {}
    with store.read() as txn, txn.cursor(db=store.db("directives")) as cur:
        for key, value in cur:
            if bytes(key).startswith(REPLICA_PREFIX):
                r = Replica.from_json(bytes(value))
                out[r.server_id] = r
    return out


# -- item 1: revisions a server reports ----------------------------------------


async def test_hello_with_a_revision_never_issued_is_refused_and_rollouts_still_work(
    tmp_path: Path,
) -> None:
    port = free_port()
    app = _app(tmp_path / "data", port)
    await app.start()
    try:
        async with grpc.aio.insecure_channel(_target(app)) as channel:
            err = await _refused(
                channel, control_pb2.Hello(server_id="evil", split_revision=HOSTILE_REVISION)
            )
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "hello.split_revision" in (err.details() or "")
            assert str(HOSTILE_REVISION) in (err.details() or "")
        assert "evil" not in _stored_replicas(app)
        assert app.control.counters["bad_revisions"] == 1
        assert app.control.next_revision() == 1
        await _rollout_round_trip(app)
        issued = app.control.issued_revision()
        assert issued >= 2

        # One above the newest issued revision is just as impossible.
        async with grpc.aio.insecure_channel(_target(app)) as channel:
            err = await _refused(
                channel, control_pb2.Hello(server_id="ahead", split_revision=issued + 1)
            )
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            # The newest issued one is fine.
            call = await _hello(
                channel,
                control_pb2.Hello(server_id="pod-a", loaded_versions=["v1"], split_revision=issued),
            )
            await wait_until(lambda: app.control.connected_servers() == 1, what="pod-a connected")
            call.cancel()
        await app.shutdown()

        # After a restart on the same data dir: rollouts and Connect still work.
        app = _app(tmp_path / "data", port)
        await app.start()
        await _rollout_round_trip(app, "v3")
        async with grpc.aio.insecure_channel(_target(app)) as channel:
            call = await _hello(channel, control_pb2.Hello(server_id="pod-a", split_revision=1))
            md = dict(await call.initial_metadata())
            assert int(md["atlas-desired-revision"]) == app.control.issued_revision()
            call.cancel()
    finally:
        await app.shutdown()


async def test_applied_with_a_revision_never_issued_is_ignored_and_counted(
    daemon: SidecarApp,
) -> None:
    async with grpc.aio.insecure_channel(_target(daemon)) as channel:
        call = await _hello(
            channel,
            control_pb2.Hello(
                server_id="pod-a", loaded_versions=["v1", "v2"], capabilities=["load_model"]
            ),
        )
        await daemon.control.apply(
            DesiredState(
                revision=1,
                loaded=frozenset({"v1", "v2"}),
                routes=(RouteSpec("v1", 9000), RouteSpec("v2", 1000)),
                stable_version="v1",
            )
        )
        split = await call.read()
        assert split.WhichOneof("action") == "set_traffic_split"
        await call.write(
            control_pb2.ServerMessage(
                applied=control_pb2.Applied(
                    directive_id=split.directive_id, ok=True, split_revision=HOSTILE_REVISION
                )
            )
        )
        await wait_until(lambda: daemon.control.counters["bad_revisions"] == 1, what="counted")
        # The rest of the answer stands: the split it acknowledged is applied.
        await wait_until(lambda: daemon.control.converged(1), what="converged")
        assert [r.split_revision for r in daemon.control.replicas()] == [1]
        await wait_until(
            lambda: not _stored_replicas(daemon)["pod-a"].pending, what="answer stored"
        )
        assert _stored_replicas(daemon)["pod-a"].split_revision == 1
        assert daemon.control.next_revision() == 2
        call.cancel()
    await _rollout_round_trip(daemon)


async def test_a_store_poisoned_by_an_older_daemon_is_repaired_at_start(tmp_path: Path) -> None:
    """A replica record holding a revision never issued (written before the check)."""
    port = free_port()
    app = _app(tmp_path / "data", port)
    config = app.config
    async with running_store(config.store) as (store, writer):
        poisoned = Replica("old-pod", loaded={"v1"}, split_revision=HOSTILE_REVISION)

        def put(txn: Any) -> None:
            txn.put(poisoned.key, poisoned.to_json(), db=store.db("directives"))

        await writer.run(put)
    await app.start()
    try:
        assert app.control.next_revision() == 1
        assert app.control.counters["bad_revisions"] == 1
        await _rollout_round_trip(app)
    finally:
        await app.shutdown()


# -- item 1: replica records are bounded ---------------------------------------


def _big_hello(server_id: str, versions: int) -> control_pb2.Hello:
    return control_pb2.Hello(
        server_id=server_id,
        loaded_versions=[f"{server_id}-{i:04d}".ljust(128, "x") for i in range(versions)],
        capabilities=["load_model", *(f"cap-{i}-" + "y" * 200 for i in range(500))],
    )


async def test_many_hellos_with_big_payloads_keep_records_and_status_bounded(
    daemon: SidecarApp,
) -> None:
    most = daemon.config.control.max_replicas
    versions = daemon.config.control.max_loaded_versions
    async with grpc.aio.insecure_channel(_target(daemon)) as channel:
        err = await _refused(channel, _big_hello("too-many", versions + 1))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "hello.loaded_versions" in (err.details() or "")
        assert "control.max_loaded_versions" in (err.details() or "")
        for i in range(200):
            call = await _hello(channel, _big_hello(f"pod-{i:03d}", versions))
            call.cancel()
            await wait_until(lambda: daemon.control.connected_servers() == 0, what="disconnect")
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        status = await admin.GetStatus(admin_pb2.GetStatusRequest())
    control = json.loads(status.details_json)["control"]
    assert len(control["replicas"]) == most
    # The newest records are kept, the oldest disconnected ones went first.
    assert sorted(control["replicas"]) == [f"pod-{i:03d}" for i in range(200 - most, 200)]
    assert control["replicas_expired"] == 200 - most
    stored = _stored_replicas(daemon)
    assert sorted(stored) == sorted(control["replicas"])
    # Unknown capabilities are not kept: a record holds what the channel acts on.
    assert all(r.capabilities == frozenset({"load_model"}) for r in stored.values())
    # The bound: max_replicas records of max_loaded_versions names of 128 bytes.
    assert len(status.details_json) < most * versions * 160 + 256 * 1024
    record_bytes = max(len(r.to_json()) for r in stored.values())
    assert record_bytes < versions * 160 + 4096


async def test_at_the_cap_with_every_replica_connected_a_new_one_is_refused(
    tmp_path: Path,
) -> None:
    app = _app(tmp_path / "data", free_port(), max_replicas=3)
    await app.start()
    try:
        async with grpc.aio.insecure_channel(_target(app)) as channel:
            calls = [
                await _hello(channel, control_pb2.Hello(server_id=f"pod-{i}")) for i in range(3)
            ]
            err = await _refused(channel, control_pb2.Hello(server_id="pod-3"))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "control.max_replicas" in (err.details() or "")
            assert app.control.counters["replicas_refused"] == 1
            # A known replica reconnecting is never refused for the cap (only
            # while its old stream is still live, and then for that reason).
            dup = await _refused(channel, control_pb2.Hello(server_id="pod-1"))
            assert dup.code() == grpc.StatusCode.ALREADY_EXISTS
            calls[1].cancel()
            await wait_until(lambda: app.control.connected_servers() == 2, what="pod-1 gone")
            again = await _hello(channel, control_pb2.Hello(server_id="pod-1"))
            await wait_until(lambda: app.control.connected_servers() == 3, what="pod-1 back")
            calls[0].cancel()
            await wait_until(lambda: app.control.connected_servers() == 2, what="pod-0 gone")
            late = await _hello(channel, control_pb2.Hello(server_id="pod-3"))
            await wait_until(lambda: app.control.connected_servers() == 3, what="pod-3 connected")
            assert sorted(_stored_replicas(app)) == ["pod-1", "pod-2", "pod-3"]
            for c in (*calls, again, late):
                c.cancel()
    finally:
        await app.shutdown()


async def test_disconnected_replicas_expire_after_their_age(tmp_path: Path) -> None:
    app = _app(tmp_path / "data", free_port(), replica_expiry_seconds=0.2)
    await app.start()
    try:
        async with grpc.aio.insecure_channel(_target(app)) as channel:
            old = await _hello(channel, control_pb2.Hello(server_id="old"))
            old.cancel()
            await wait_until(lambda: app.control.connected_servers() == 0, what="old gone")
            await asyncio.sleep(0.3)  # past the expiry age (a lower bound, not a timing check)
            new = await _hello(channel, control_pb2.Hello(server_id="new"))
            assert [r.server_id for r in app.control.replicas()] == ["new"]
            assert sorted(_stored_replicas(app)) == ["new"]
            new.cancel()
    finally:
        await app.shutdown()


# -- item 1: LoadModel before the split after a reconnect ----------------------


async def test_reconnect_without_a_version_gets_load_model_before_the_split(
    daemon: SidecarApp,
) -> None:
    caps = ["load_model", "unload_model"]
    async with grpc.aio.insecure_channel(_target(daemon)) as channel:
        call = await _hello(
            channel,
            control_pb2.Hello(server_id="pod-a", loaded_versions=["v1", "v2"], capabilities=caps),
        )
        await daemon.control.apply(
            DesiredState(
                revision=1,
                loaded=frozenset({"v1", "v2"}),
                routes=(RouteSpec("v1", 9000), RouteSpec("v2", 1000)),
                stable_version="v1",
                artifacts={"v2": "file:///models/v2"},
            )
        )
        first = await call.read()
        assert first.WhichOneof("action") == "set_traffic_split"
        call.cancel()  # gone before answering
        await wait_until(lambda: daemon.control.connected_servers() == 0, what="disconnect")

    # The server restarted and lost v2.
    async with grpc.aio.insecure_channel(_target(daemon)) as channel:
        call = await _hello(
            channel, control_pb2.Hello(server_id="pod-a", loaded_versions=["v1"], capabilities=caps)
        )
        load = await call.read()
        assert load.WhichOneof("action") == "load_model"
        assert load.load_model.version == "v2"
        assert load.load_model.artifact_uri == "file:///models/v2"
        # Nothing else comes before the load is answered (a read left
        # pending: cancelling one would cancel the call).
        following = asyncio.ensure_future(call.read())
        await asyncio.sleep(0.3)
        assert not following.done()
        await call.write(
            control_pb2.ServerMessage(
                applied=control_pb2.Applied(directive_id=load.directive_id, ok=True)
            )
        )
        split = await following
        assert split.WhichOneof("action") == "set_traffic_split"
        assert split.set_traffic_split.revision == 1
        await call.write(
            control_pb2.ServerMessage(
                applied=control_pb2.Applied(
                    directive_id=split.directive_id, ok=True, split_revision=1
                )
            )
        )
        await wait_until(lambda: daemon.control.converged(1), what="converged")
        call.cancel()


# -- item 4: names in Hello ------------------------------------------------------


@pytest.mark.parametrize(
    ("hello", "field"),
    [
        (control_pb2.Hello(server_id="../../etc"), "hello.server_id"),
        (control_pb2.Hello(server_id="-rf"), "hello.server_id"),
        (control_pb2.Hello(server_id="p" * 129), "hello.server_id"),
        (control_pb2.Hello(server_id=""), "hello.server_id"),
        (
            control_pb2.Hello(server_id="pod-a", loaded_versions=["v1", "v2; rm -rf /"]),
            "hello.loaded_versions[1]",
        ),
        (control_pb2.Hello(server_id="pod-a", loaded_versions=[".hidden"]), "loaded_versions[0]"),
    ],
)
async def test_hello_with_a_bad_name_is_refused_naming_the_field(
    daemon: SidecarApp, hello: control_pb2.Hello, field: str
) -> None:
    async with grpc.aio.insecure_channel(_target(daemon)) as channel:
        err = await _refused(channel, hello)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (err.details() or "")
    assert _stored_replicas(daemon) == {}
    assert daemon.control.counters["bad_messages"] == 1


# -- item 9: bytes that are not UTF-8 --------------------------------------------


def _raw_connect(channel: grpc.aio.Channel) -> Any:
    """Connect with messages sent as raw bytes (so they can be malformed)."""
    return channel.stream_stream(
        "/atlas.sidecar.v1.ControlService/Connect",
        request_serializer=lambda b: b,
        response_deserializer=control_pb2.Directive.FromString,
    )()


def _with_bad_utf8(msg: control_pb2.ServerMessage, good: str) -> bytes:
    """``msg`` serialized with the string ``good`` replaced by invalid UTF-8 of the same length."""
    raw = msg.SerializeToString()
    assert raw.count(good.encode()) == 1
    return raw.replace(good.encode(), b"\xff" * len(good))


async def test_control_messages_with_bad_utf8_answer_invalid_argument(
    daemon: SidecarApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with grpc.aio.insecure_channel(_target(daemon)) as channel:
        hello = control_pb2.ServerMessage(
            hello=control_pb2.Hello(server_id="pod-a", loaded_versions=["v1", "BADNAME"])
        )
        call = _raw_connect(channel)
        await call.write(_with_bad_utf8(hello, "BADNAME"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (info.value.details() or "").startswith("hello.loaded_versions[1]")

        # A good Hello, then an Applied whose error text is not UTF-8.
        call = _raw_connect(channel)
        good = control_pb2.ServerMessage(hello=control_pb2.Hello(server_id="pod-b"))
        await call.write(good.SerializeToString())
        await call.initial_metadata()
        bad = control_pb2.ServerMessage(
            applied=control_pb2.Applied(directive_id="d-1", ok=False, error="BADTEXT")
        )
        await call.write(_with_bad_utf8(bad, "BADTEXT"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (info.value.details() or "").startswith("applied.error")
        await wait_until(lambda: daemon.control.connected_servers() == 0, what="stream ended")
        assert daemon.control.counters["bad_messages"] == 2

        # The daemon serves the next one as before.
        fine = await _hello(channel, control_pb2.Hello(server_id="pod-b"))
        await wait_until(lambda: daemon.control.connected_servers() == 1, what="reconnected")
        fine.cancel()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records
    assert "Traceback" not in caplog.text
