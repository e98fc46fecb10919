"""ControlService end to end: a real daemon app, real LMDB, real ControlLoops over loopback."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from atlas_sidecar_client import ControlLoop, EventStream, Router
from atlas_sidecar_client.pb import (
    admin_pb2,
    admin_pb2_grpc,
    control_pb2,
    control_pb2_grpc,
    events_pb2,
)

from sidecar.app import SidecarApp
from sidecar.config import load_config
from sidecar.control import ControlChannel, DesiredState, RouteSpec, ShadowSpec
from sidecar.store import Store, StoreWriter, decode_log_value
from sidecar.testing import free_port
from tests._helpers import control_app, wait_until

WAIT = 20.0


def _target(app: SidecarApp) -> str:
    return next(iter(app.ports))


class Server:
    """A pretend inference server: records every handler call in order."""

    def __init__(self, loaded: set[str], *, fail_loads: int = 0) -> None:
        self.models = set(loaded)
        self.calls: list[tuple[str, str]] = []
        self.fail_loads = fail_loads

    async def load(self, version: str, artifact_uri: str) -> None:
        self.calls.append(("load", version))
        if self.fail_loads > 0:
            self.fail_loads -= 1
            raise RuntimeError("out of GPU memory")
        self.models.add(version)

    def unload(self, version: str) -> None:
        self.calls.append(("unload", version))
        self.models.discard(version)

    def loop(self, app: SidecarApp, server_id: str, router: Router | None = None) -> ControlLoop:
        return ControlLoop(
            _target(app),
            server_id,
            router=router or Router(),
            on_load=self.load,
            on_unload=self.unload,
            loaded_versions=self.models,
            backoff_initial=0.02,
            backoff_max=0.2,
        )


def _canary(revision: int, weight: int, *, lease: int = 30) -> DesiredState:
    return DesiredState(
        revision=revision,
        loaded=frozenset({"v1", "v2"}),
        routes=(RouteSpec("v1", 10000 - weight), RouteSpec("v2", weight)),
        stable_version="v1",
        lease_seconds=lease,
        artifacts={"v2": "file:///models/v2"},
    )


def _stable(revision: int) -> DesiredState:
    return DesiredState(
        revision=revision,
        loaded=frozenset({"v1"}),
        routes=(RouteSpec("v1", 10000),),
        stable_version="v1",
    )


async def test_control_lifecycle_shutdown_without_start_and_twice(tmp_path: Path) -> None:
    cfg = load_config(environ={}, overrides={"store": {"data_dir": str(tmp_path)}})
    store = Store(cfg.store)
    writer = StoreWriter(store, cfg.store)
    channel = ControlChannel(store, writer, cfg.control)
    await channel.shutdown()
    store.open()
    await writer.start()
    await channel.start()
    await channel.shutdown()
    await channel.shutdown()
    await writer.shutdown()
    store.close()


async def test_control_load_then_split_then_unload_in_order(sidecar: SidecarApp) -> None:
    server = Server({"v1"})
    async with server.loop(sidecar, "pod-a") as loop:
        async with asyncio.timeout(WAIT):
            await loop.wait_connected()
        await sidecar.control.apply(_canary(1, 500))
        async with asyncio.timeout(WAIT):
            await sidecar.control.wait_converged(1)
        assert server.calls == [("load", "v2")]
        assert loop.router.revision == 1
        assert {loop.router.route(f"r{i}").version for i in range(400)} == {"v1", "v2"}

        await sidecar.control.apply(_stable(2))
        await wait_until(lambda: "v2" not in server.models, what="v2 unloaded")
        assert server.calls == [("load", "v2"), ("unload", "v2")]
        assert loop.router.revision == 2
        assert {loop.router.route(f"r{i}").version for i in range(400)} == {"v1"}
        async with asyncio.timeout(WAIT):
            await sidecar.control.wait_converged(2)
        assert loop.stats.applied_failed == 0


async def test_control_reconnect_convergence_after_server_restart(sidecar: SidecarApp) -> None:
    server = Server({"v1"})
    loop = server.loop(sidecar, "pod-a")
    await loop.start()
    await sidecar.control.apply(_canary(1, 1000))
    async with asyncio.timeout(WAIT):
        await sidecar.control.wait_converged(1)
    await loop.stop()
    await wait_until(lambda: sidecar.control.connected_servers() == 0, what="disconnect")
    # The split moves on while the server is away.
    await sidecar.control.apply(_canary(2, 2500))

    # The server process restarts: a fresh router, models still on disk.
    restarted = server.loop(sidecar, "pod-a", router=Router())
    async with restarted:
        async with asyncio.timeout(WAIT):
            await restarted.wait_revision(2)
            await sidecar.control.wait_converged(2)
        split = restarted.router.split
        assert split is not None
        assert [(r.version, r.weight_bps) for r in split.routes] == [("v1", 7500), ("v2", 2500)]
    # v2 was loaded once; the Hello told the sidecar it was still there.
    assert server.calls == [("load", "v2")]


async def test_control_server_restart_without_models_gets_them_back(sidecar: SidecarApp) -> None:
    first = Server({"v1"})
    async with first.loop(sidecar, "pod-a"):
        await sidecar.control.apply(_canary(1, 500))
        async with asyncio.timeout(WAIT):
            await sidecar.control.wait_converged(1)
    fresh = Server({"v1"})  # a new pod: only the base model
    async with fresh.loop(sidecar, "pod-a") as loop:
        async with asyncio.timeout(WAIT):
            await loop.wait_revision(1)
            await sidecar.control.wait_converged(1)
    assert fresh.calls == [("load", "v2")]


async def test_control_sidecar_restart_resumes_without_applying_twice(tmp_path: Path) -> None:
    port = free_port()
    app = control_app(tmp_path / "data", port)
    await app.start()
    server = Server({"v1"})
    loop = server.loop(app, "pod-a")
    await loop.start()
    try:
        await app.control.apply(_canary(1, 500))
        async with asyncio.timeout(WAIT):
            await app.control.wait_converged(1)
        directives_before = loop.stats.directives
        await app.shutdown()

        app = control_app(tmp_path / "data", port)
        await app.start()
        assert app.control.desired() == _canary(1, 500)
        async with asyncio.timeout(WAIT):
            await app.control.wait_converged(1)
        # The replica's Hello matched the stored desired state: nothing to send.
        assert app.control.counters["directives_sent"] == 0
        assert loop.stats.directives == directives_before
        assert loop.stats.reconnects >= 1

        # The next change goes through the restarted sidecar once.
        await app.control.apply(_stable(2))
        await wait_until(lambda: "v2" not in server.models, what="unload")
        assert server.calls == [("load", "v2"), ("unload", "v2")]
    finally:
        await loop.stop()
        await app.shutdown()


async def _raw_stream(
    app: SidecarApp, hello: control_pb2.Hello
) -> tuple[grpc.aio.Channel, grpc.aio.StreamStreamCall]:
    channel = grpc.aio.insecure_channel(_target(app))
    call = control_pb2_grpc.ControlServiceStub(channel).Connect()
    await call.write(control_pb2.ServerMessage(hello=hello))
    return channel, call


async def test_control_unacknowledged_directive_resent_with_its_id(sidecar: SidecarApp) -> None:
    hello = control_pb2.Hello(
        server_id="raw", loaded_versions=["v1", "v2"], capabilities=["load_model"]
    )
    await sidecar.control.apply(_canary(1, 500))
    channel, call = await _raw_stream(sidecar, hello)
    first = await call.read()
    assert first.WhichOneof("action") == "set_traffic_split"
    await channel.close()  # gone before answering
    await wait_until(lambda: sidecar.control.connected_servers() == 0, what="disconnect")

    channel, call = await _raw_stream(sidecar, hello)
    again = await call.read()
    assert again.directive_id == first.directive_id
    await call.write(
        control_pb2.ServerMessage(
            applied=control_pb2.Applied(directive_id=again.directive_id, ok=True, split_revision=1)
        )
    )
    async with asyncio.timeout(WAIT):
        await sidecar.control.wait_converged(1)
    # A duplicate answer changes nothing and is counted.
    await call.write(
        control_pb2.ServerMessage(
            applied=control_pb2.Applied(directive_id=again.directive_id, ok=True, split_revision=1)
        )
    )
    await wait_until(
        lambda: sidecar.control.counters["applied_unknown"] == 1, what="duplicate counted"
    )
    await channel.close()


async def test_control_loop_answers_a_repeated_directive_without_applying_again(
    sidecar: SidecarApp,
) -> None:
    """A scripted sidecar sends the same directive id twice on one stream."""
    answers: list[control_pb2.Applied] = []
    got_two = asyncio.Event()

    class Scripted(control_pb2_grpc.ControlServiceServicer):
        async def Connect(self, request_iterator: Any, context: Any) -> None:  # type: ignore[override]
            await context.read()
            await context.send_initial_metadata(())
            d = control_pb2.Directive(
                directive_id="d-1", load_model=control_pb2.LoadModel(version="v9")
            )
            await context.write(d)
            answers.append((await context.read()).applied)
            await context.write(d)
            answers.append((await context.read()).applied)
            got_two.set()
            await asyncio.sleep(60)

    server = grpc.aio.server()
    control_pb2_grpc.add_ControlServiceServicer_to_server(Scripted(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    pod = Server({"v1"})
    ran: list[tuple[str, str | None, bool]] = []
    loop = ControlLoop(
        f"127.0.0.1:{port}",
        "pod-a",
        on_load=pod.load,
        loaded_versions={"v1"},
        on_applied=lambda d, a: ran.append((d.directive_id, d.WhichOneof("action"), a.ok)),
    )
    try:
        await loop.start()
        async with asyncio.timeout(WAIT):
            await got_two.wait()
        assert pod.calls == [("load", "v9")]
        assert [(a.directive_id, a.ok) for a in answers] == [("d-1", True), ("d-1", True)]
        assert loop.stats.duplicates == 1
        # The observer hears of the directive once: the repeat was answered from memory.
        assert ran == [("d-1", "load_model", True)]
    finally:
        await loop.stop()
        await server.stop(0)


async def test_control_replicas_reconciled_independently(sidecar: SidecarApp) -> None:
    ready = Server({"v1", "v2"})
    flaky = Server({"v1"}, fail_loads=2)
    manual = ControlLoop(_target(sidecar), "pod-c", loaded_versions={"v1", "v2"})  # no on_load
    async with ready.loop(sidecar, "pod-a") as a, flaky.loop(sidecar, "pod-b") as b, manual:
        async with asyncio.timeout(WAIT):
            for lp in (a, b, manual):
                await lp.wait_connected()
        assert sidecar.control.connected_servers() == 3
        await sidecar.control.apply(_canary(1, 500))
        async with asyncio.timeout(WAIT):
            await a.wait_revision(1)
            await manual.wait_revision(1)
            await sidecar.control.wait_converged(1)
        assert ready.calls == []  # already had v2
        assert flaky.calls == [("load", "v2")] * 3  # two failures, retried, then loaded
        assert b.router.revision == 1
        by_id = {r.server_id: r for r in sidecar.control.replicas()}
        assert by_id["pod-b"].failed == 2
        assert "out of GPU memory" in by_id["pod-b"].last_error
        assert by_id["pod-c"].loaded == {"v1", "v2"}

        stub = admin_pb2_grpc.AdminServiceStub(grpc.aio.insecure_channel(_target(sidecar)))
        status = await stub.GetStatus(admin_pb2.GetStatusRequest())
        assert status.connected_servers == 3
        control = json.loads(status.details_json)["control"]
        assert control["desired_revision"] == 1 and control["converged"] is True
        assert set(control["replicas"]) == {"pod-a", "pod-b", "pod-c"}


async def test_control_probe_answers_arrive_as_probe_events(sidecar: SidecarApp) -> None:
    events = EventStream(_target(sidecar), linger_ms=1)
    calls: list[tuple[str, str]] = []

    async def answer(version: str, prompt: str) -> str:
        calls.append((version, prompt))
        if prompt == "boom":
            raise RuntimeError("model crashed")
        return prompt.upper()

    loop = ControlLoop(
        _target(sidecar),
        "pod-a",
        on_probe=answer,
        events=events,
        loaded_versions={"v1"},
        backoff_initial=0.02,
    )
    # Queued before any server is connected; sent when one is.
    probe_id = await sidecar.control.run_probe("v1", ["hi", "boom", "there"])
    status = sidecar.control.probe(probe_id)
    assert status is not None and status.state == "queued"
    async with loop:
        await wait_until(
            lambda: (p := sidecar.control.probe(probe_id)) is not None and p.state == "done",
            what="probe done",
        )
    events.close()
    assert calls == [("v1", "hi"), ("v1", "boom"), ("v1", "there")]
    store = sidecar.store
    found = {}
    with store.read() as txn:
        for _, raw in txn.cursor(db=store.db("events")):
            ev = events_pb2.Event.FromString(decode_log_value(raw)[1])
            if ev.inference.role == events_pb2.PROBE:
                found[ev.inference.attributes["probe_index"]] = ev.inference
    assert sorted(found) == ["0", "1", "2"]
    assert all(f.attributes["probe_id"] == probe_id for f in found.values())
    assert found["0"].response == "HI" and not found["0"].error
    assert found["1"].error and found["1"].error_code == "RuntimeError"


async def test_control_rejects_a_stream_without_hello(sidecar: SidecarApp) -> None:
    channel = grpc.aio.insecure_channel(_target(sidecar))
    call = control_pb2_grpc.ControlServiceStub(channel).Connect()
    await call.write(
        control_pb2.ServerMessage(applied=control_pb2.Applied(directive_id="x", ok=True))
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "hello" in (info.value.details() or "")
    await channel.close()
    assert sidecar.control.counters["bad_messages"] == 1


async def test_control_apply_validates_and_keeps_revisions_monotonic(sidecar: SidecarApp) -> None:
    bad = DesiredState(
        revision=1,
        loaded=frozenset({"v1"}),
        routes=(RouteSpec("v1", 9000), RouteSpec("v2", 1000)),
        stable_version="v1",
    )
    with pytest.raises(ValueError, match=r"desired\.loaded"):
        await sidecar.control.apply(bad)
    await sidecar.control.apply(_canary(3, 500))
    await sidecar.control.apply(_canary(3, 500))  # the same state again: no-op
    with pytest.raises(ValueError, match="older"):
        await sidecar.control.apply(_canary(2, 500))
    with pytest.raises(ValueError, match="already used"):
        await sidecar.control.apply(_canary(3, 1000))
    assert sidecar.control.next_revision() == 4
    shadow = DesiredState(
        revision=4,
        loaded=frozenset({"v1", "v2"}),
        routes=(RouteSpec("v1", 10000),),
        stable_version="v1",
        shadow=ShadowSpec("v2", 1000),
    )
    await sidecar.control.apply(shadow)
    assert sidecar.control.desired() == shadow


async def test_control_lease_fallback_when_the_sidecar_is_gone(tmp_path: Path) -> None:
    port = free_port()
    app = control_app(tmp_path / "data", port)
    await app.start()
    now = [1000.0]
    router = Router(clock=lambda: now[0])
    server = Server({"v1", "v2"})
    loop = server.loop(app, "pod-a", router=router)
    await loop.start()
    try:
        full = DesiredState(
            revision=1,
            loaded=frozenset({"v1", "v2"}),
            routes=(RouteSpec("v1", 0), RouteSpec("v2", 10000)),
            stable_version="v1",
            lease_seconds=5,
        )
        await app.control.apply(full)
        async with asyncio.timeout(WAIT):
            await loop.wait_revision(1)
        assert router.route("r").version == "v2"
        await app.shutdown()  # the sidecar goes away
        await wait_until(lambda: not loop.connected, what="loop notices")
        now[0] += 4
        assert router.route("r").version == "v2"  # within the lease
        now[0] += 2
        assert router.route("r").version == "v1"  # lease ran out: stable
        app = control_app(tmp_path / "data", port)
        await app.start()
        async with asyncio.timeout(WAIT):
            await loop.wait_connected()
        assert router.route("r").version == "v2"  # back under the sidecar's split
    finally:
        await loop.stop()
        await app.shutdown()
