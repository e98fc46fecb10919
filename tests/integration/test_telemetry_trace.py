"""One client call carrying a W3C traceparent produces one connected trace.

The daemon runs in-process (real grpc.aio server on loopback, real LMDB) with
an in-memory span exporter. The processor below stands in for the learning,
training and rollout stages and uses only the helpers those stages use:
``ins.span`` inside ``process`` (runs on the writer thread, inside the
processor batch span), ``ins.trace_fields`` into a history entry, and
``ins.span(parent=<history entry>)`` in a later asyncio task.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import grpc
import lmdb
import pytest
from atlas_sidecar_client.pb import events_pb2, ingest_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from sidecar import instruments as ins
from sidecar.app import SidecarApp
from sidecar.config import load_config
from sidecar.store import append_history, read_history
from sidecar.telemetry._logging import TraceContextFilter

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
STREAM_TRACE = "0af7651916cd43dd8448eb211c80319c"


class TriggerOnBatch:
    """A processor that 'fires a trigger' once per batch holding inferences."""

    name = "test.trigger"

    def __init__(self, app: SidecarApp) -> None:
        self._app = app
        self._fired_in: object = None

    def process(self, txn: lmdb.Transaction, seq: int, ingest_ms: int, ev: Any) -> None:
        if self._fired_in is txn:
            return
        self._fired_in = txn
        with ins.span("learning.trigger", reason="count", samples=3):
            append_history(txn, self._app.store, "trigger", reason="count", **ins.trace_fields())

    def tick(self, txn: lmdb.Transaction, now_ms: int) -> None:
        return None


def _event(i: int) -> events_pb2.Event:
    return events_pb2.Event(
        event_id=f"trace-ev-{i}",
        inference=events_pb2.Inference(
            request_id=f"r{i}", model_version="v1", prompt="p", response="r", latency_ms=5
        ),
    )


async def _wait_for(pred: Any, what: str, within: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def _by_name(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert found, f"no span {name!r} in {[s.name for s in spans]}"
    return found[0]


@pytest.mark.timeout(60)
async def test_telemetry_one_traceparent_one_connected_trace(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    cfg = load_config(
        environ={},
        overrides={
            "store": {"data_dir": str(tmp_path / "data")},
            "server": {"listen": ["127.0.0.1:0"], "http_listen": ""},
        },
    )
    app = SidecarApp(cfg, telemetry_options={"span_exporter": exporter, "environ": {}})
    app.processors.add(TriggerOnBatch(app))
    await app.start()
    try:
        target = f"127.0.0.1:{next(p for a, p in app.ports.items() if a != 'http')}"
        async with grpc.aio.insecure_channel(target) as channel:
            # health checks are never traced
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            ack = await stub.RecordEvents(
                events_pb2.EventBatch(events=[_event(i) for i in range(3)]),
                metadata=(("traceparent", TRACEPARENT),),
            )
            assert ack.accepted == 3
            # A long-lived stream has no span of its own: each batch's span is
            # a child of the producer's context.
            stream = stub.StreamEvents(
                iter([events_pb2.EventBatch(events=[_event(10 + i)]) for i in range(2)]),
                metadata=(("traceparent", f"00-{STREAM_TRACE}-{CLIENT_SPAN}-01"),),
            )
            assert [a.accepted async for a in stream] == [1, 1]
        await app.processors.wait_idle()

        # A later stage (training, then rollout) continues from the stored entry.
        with app.store.read() as txn:
            trigger = next(read_history(txn, app.store, kinds=frozenset({"trigger"})))
        assert "traceparent" in trigger

        async def train_then_roll_out() -> None:
            with ins.span("training.run", parent=trigger, update_id="u1"):
                await asyncio.sleep(0)
                with ins.span("rollout.transition", to_state="CANARY", stage_index=0):
                    pass

        await asyncio.create_task(train_then_roll_out())
        await _wait_for(
            lambda: any(s.name == "rollout.transition" for s in exporter.get_finished_spans()),
            "the rollout span",
        )
    finally:
        await app.shutdown()

    spans = list(exporter.get_finished_spans())
    names = [s.name for s in spans]
    assert not any("Health" in n for n in names), names
    server = _by_name(spans, "atlas.sidecar.v1.IngestService/RecordEvents")
    ingest = next(
        s
        for s in spans
        if s.name == "ingest.batch" and s.context and format(s.context.trace_id, "032x") == TRACE_ID
    )
    streamed = [
        s
        for s in spans
        if s.name == "ingest.batch"
        and s.context
        and format(s.context.trace_id, "032x") == STREAM_TRACE
    ]
    assert len(streamed) == 2
    for s in streamed:
        assert s.parent is not None and format(s.parent.span_id, "016x") == CLIENT_SPAN
    process = next(
        s
        for s in spans
        if s.name == "process.batch" and (s.attributes or {}).get("processor") == "test.trigger"
    )
    trigger_span = _by_name(spans, "learning.trigger")
    training = _by_name(spans, "training.run")
    rollout = _by_name(spans, "rollout.transition")

    chain = [server, ingest, process, trigger_span, training, rollout]
    for s in chain:
        assert s.context is not None
        assert format(s.context.trace_id, "032x") == TRACE_ID, s.name
    assert server.parent is not None and format(server.parent.span_id, "016x") == CLIENT_SPAN
    for child, parent in zip(chain[1:], chain[:-1], strict=True):
        assert child.parent is not None and parent.context is not None
        assert child.parent.span_id == parent.context.span_id, (child.name, parent.name)
    assert ingest.attributes is not None
    assert ingest.attributes["accepted"] == 3
    assert ingest.attributes["events"] == 3
    assert process.attributes is not None
    # the first processor batch holds the call's 3 events, maybe the stream's 2 too
    assert process.attributes["events"] in (3, 5)
    if process.attributes["events"] == 5:
        linked = {format(link.context.trace_id, "032x") for link in process.links}
        assert linked == {STREAM_TRACE}
    # per batch, never per event
    assert names.count("ingest.batch") == 3
    assert not any("StreamEvents" in n for n in names)


def test_telemetry_logs_carry_trace_ids_and_no_user_text() -> None:
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("t")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "msg", None, None)
    record.prompt = "secret user prompt"
    record.response = "secret answer"
    with tracer.start_as_current_span("s") as sp:
        assert TraceContextFilter().filter(record)
    assert record.trace_id == format(sp.get_span_context().trace_id, "032x")
    assert record.span_id == format(sp.get_span_context().span_id, "016x")
    assert "secret" not in json.dumps({"p": record.prompt, "r": record.response})
    assert record.prompt == "<18 chars redacted>"


@pytest.mark.timeout(60)
async def test_telemetry_without_a_span_exporter_makes_no_ingest_spans(tmp_path: Path) -> None:
    # No OTLP endpoint and no exporter: an ingest span would be exported
    # nowhere, so none is made; the ingest counters are still exported.
    cfg = load_config(
        environ={},
        overrides={
            "store": {"data_dir": str(tmp_path / "data")},
            "server": {"listen": ["127.0.0.1:0"], "http_listen": ""},
        },
    )
    app = SidecarApp(cfg, telemetry_options={"environ": {}})
    await app.start()
    try:
        tel = app.telemetry
        assert not tel.traces_exported
        target = f"127.0.0.1:{next(p for a, p in app.ports.items() if a != 'http')}"
        async with grpc.aio.insecure_channel(target) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            events = [_event(i) for i in range(4)]
            ack = await stub.RecordEvents(events_pb2.EventBatch(events=events))
            assert ack.accepted == 4
            bad = events_pb2.Event(event_id="")
            ack = await stub.RecordEvents(events_pb2.EventBatch(events=[*events[:2], bad]))
            assert (ack.accepted, ack.duplicates, len(ack.rejected)) == (0, 2, 1)
        assert not tel._pending_ingest
        assert not ins.ingest_contexts(0, 10**9)
        counted = {
            s.labels["outcome"]: s.value
            for family in text_string_to_metric_families(tel.metrics_text().decode())
            for s in family.samples
            if s.name == "atlas_ingest_events_total"
        }
        assert counted == {"accepted": 4, "duplicate": 2, "rejected": 1}
        # the daemon's memory is in its status
        process = app.status_dict()["details"]["process"]
        assert process["rss_bytes"] > 0 and process["release_mapped_pages_seconds"] == 1.0
    finally:
        await app.shutdown()
