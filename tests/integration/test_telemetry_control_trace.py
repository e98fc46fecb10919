"""A traced ControlService.Connect stream is served as an untraced one.

Connect is a coroutine that reads and writes through its servicer context
(no response iterator), unlike StreamEvents. With tracing on and a
``traceparent`` in the metadata, the server's trace interceptor must still
run it: the daemon in-process, real grpc.aio on loopback, real LMDB.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import grpc.aio
import pytest
from atlas_sidecar_client.pb import control_pb2, control_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sidecar.app import SidecarApp
from sidecar.config import load_config
from sidecar.control import DesiredState, RouteSpec
from tests._helpers import wait_until

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.mark.timeout(60)
async def test_connect_with_a_traceparent_gets_its_directives(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    cfg = load_config(
        environ={},
        overrides={
            "store": {"data_dir": str(tmp_path / "data"), "sync": False},
            "server": {"listen": ["127.0.0.1:0"], "http_listen": ""},
            "telemetry": {"enabled": True},
        },
    )
    exporter = InMemorySpanExporter()
    app = SidecarApp(cfg, telemetry_options={"span_exporter": exporter, "environ": {}})
    await app.start()
    try:
        assert app.telemetry.grpc_interceptors(), "tracing must be on for this test"
        target = f"127.0.0.1:{next(p for a, p in app.ports.items() if a != 'http')}"
        async with grpc.aio.insecure_channel(target) as channel:
            call = control_pb2_grpc.ControlServiceStub(channel).Connect(
                metadata=(("traceparent", TRACEPARENT),)
            )
            await call.write(
                control_pb2.ServerMessage(
                    hello=control_pb2.Hello(server_id="pod-a", loaded_versions=["v1", "v2"])
                )
            )
            md = dict(await call.initial_metadata())
            assert "atlas-desired-revision" in md
            await wait_until(lambda: app.control.connected_servers() == 1, what="pod-a connected")
            await app.control.apply(
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
                        directive_id=split.directive_id, ok=True, split_revision=1
                    )
                )
            )
            await wait_until(lambda: app.control.converged(1), what="converged")
            await call.done_writing()
            await wait_until(lambda: app.control.connected_servers() == 0, what="stream ended")
            assert await call.code() == grpc.StatusCode.OK
    finally:
        await app.shutdown()
    assert "Traceback" not in caplog.text, caplog.text
