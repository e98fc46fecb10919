"""One traced client call, followed through the real stages: ingest, processing,
the count trigger, the dataset snapshot, a real trainer subprocess, registration
and the automatic rollout all land in the caller's trace."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from atlas_sidecar_client.pb import events_pb2, ingest_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sidecar.app import SidecarApp
from sidecar.config import load_config
from tests.integration.test_learning_daemon import traffic, trainer_argv

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


@pytest.mark.timeout(120)
async def test_one_traced_call_to_a_rollout_is_one_trace(tmp_path: Path) -> None:
    mode = tmp_path / "mode"
    mode.write_text("ok")
    exporter = InMemorySpanExporter()
    cfg = load_config(
        environ={},
        overrides={
            "store": {"data_dir": str(tmp_path / "data"), "sync": False},
            "server": {"listen": ["127.0.0.1:0"], "http_listen": ""},
            "scoring": {"reward_window_seconds": 0.5},
            "learning": {
                "sample_count": 40,
                "evaluate_interval_seconds": 0.1,
                "min_interval_seconds": 0,
            },
            "training": {
                "hook": "command",
                "command": trainer_argv(mode),
                "timeout_seconds": 60,
                "base_version": "v1",
            },
            "rollout": {"auto_start": True, "initial_stable_version": "v1"},
        },
    )
    app = SidecarApp(cfg, telemetry_options={"span_exporter": exporter, "environ": {}})
    await app.start()
    try:
        target = f"127.0.0.1:{next(p for a, p in app.ports.items() if a != 'http')}"
        async with grpc.aio.insecure_channel(target) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            ack = await stub.RecordEvents(
                events_pb2.EventBatch(events=traffic(150)), metadata=(("traceparent", TRACEPARENT),)
            )
            assert ack.accepted > 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 90
        while not any(s.name.startswith("rollout.") for s in exporter.get_finished_spans()):
            assert loop.time() < deadline, [s.name for s in exporter.get_finished_spans()]
            await asyncio.sleep(0.1)
    finally:
        await app.shutdown()

    spans = exporter.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans if s.context}

    def first(name: str):  # type: ignore[no-untyped-def]
        found = [s for s in spans if s.name == name]
        assert found, f"no {name} span in {sorted({s.name for s in spans})}"
        return found[0]

    def ancestors(span):  # type: ignore[no-untyped-def]
        out = []
        while span.parent is not None and span.parent.span_id in by_id:
            span = by_id[span.parent.span_id]
            out.append(span.name)
        return out

    chain = [
        "ingest.batch",
        "learning.trigger",
        "learning.update",
        "learning.dataset",
        "training.run",
        "rollout.rollout_transition",
    ]
    for name in chain:
        s = first(name)
        assert format(s.context.trace_id, "032x") == TRACE_ID, name
    assert "process.batch" in {
        s.name for s in spans if format(s.context.trace_id, "032x") == TRACE_ID
    }
    # parentage, not just a shared id: the rollout hangs under training, which
    # hangs under the update, which hangs under the trigger
    assert ancestors(first("rollout.rollout_transition"))[:3] == [
        "training.run",
        "learning.update",
        "learning.trigger",
    ]
    assert first("learning.dataset").parent.span_id == first("learning.update").context.span_id
