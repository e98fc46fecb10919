"""Requests as bytes through the real gRPC stack: broken messages, invalid
UTF-8, and the pure-Python path (ATLAS_SIDECAR_PURE_PYTHON=1)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from atlas_sidecar_client.pb import events_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar._compiled import PURE_PYTHON_ENV, compiled_decoder, compiled_reason, row_builder
from sidecar.app import SidecarApp
from sidecar.ingest import NOT_AN_EVENT
from sidecar.store import append_rows, decode_log_value
from tests.conftest import feedback, inference, target_of

RECORD = "/atlas.sidecar.v1.IngestService/RecordEvents"
STREAM = "/atlas.sidecar.v1.IngestService/StreamEvents"
MARK = b"@@@@"


def stored(app: SidecarApp) -> list[bytes]:
    with app.store.read() as txn:
        return [decode_log_value(v)[1] for _k, v in txn.cursor(db=app.store.db("events"))]


def batch_with_bad_utf8() -> tuple[bytes, list[events_pb2.Event]]:
    events = [
        inference("good-1", prompt="fine"),
        inference("bad", prompt=MARK.decode()),
        feedback("good-2", rating=0.5),
    ]
    raw = events_pb2.EventBatch(events=events).SerializeToString()
    return raw.replace(MARK, b"\xff\xfe@@"), events


async def record_raw(ch: grpc.aio.Channel, raw: bytes) -> events_pb2.IngestAck:
    call = ch.unary_unary(
        RECORD, request_serializer=None, response_deserializer=events_pb2.IngestAck.FromString
    )
    ack: events_pb2.IngestAck = await call(raw)
    return ack


async def assert_serving(ch: grpc.aio.Channel) -> None:
    health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def check_bad_input(app: SidecarApp, utf8_reason: str) -> None:
    async with grpc.aio.insecure_channel(target_of(app)) as ch:
        raw, events = batch_with_bad_utf8()
        ack = await record_raw(ch, raw)
        assert (ack.accepted, ack.duplicates) == (2, 0)
        assert [(r.index, r.reason.startswith(utf8_reason)) for r in ack.rejected] == [(1, True)]
        # the stored bytes parse, and are the events that were sent
        assert [events_pb2.Event.FromString(b) for b in stored(app)] == [events[0], events[2]]

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await record_raw(ch, b"\x0a\x05ab")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "EventBatch: malformed at byte 0" in (err.value.details() or "")

        # on a stream: the batches before the broken one are acked, then the error
        call = ch.stream_stream(
            STREAM, request_serializer=None, response_deserializer=events_pb2.IngestAck.FromString
        )
        good = events_pb2.EventBatch(events=[inference("s1"), inference("s2")]).SerializeToString()
        stream = call(iter([good, b"\x0a\x7f", good]))
        acks = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for ack in stream:
                acks.append(ack)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [a.accepted for a in acks] == [2]
        await assert_serving(ch)
        assert app.status_dict()["events"] == {"accepted": 4, "duplicates": 0, "rejected": 1}


@pytest.mark.skipif(compiled_decoder() is None, reason=compiled_reason())
async def test_compiled_path_rejects_bad_events_alone_and_broken_batches(
    app: SidecarApp,
) -> None:
    assert app.status_dict()["details"]["ingest"] == {"path": "compiled"}
    assert app.writer._rows is row_builder()
    await check_bad_input(app, "inference.prompt: invalid UTF-8")


async def test_pure_python_path_when_switched_on(
    app_factory: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv(PURE_PYTHON_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="sidecar.app"):
        app = await app_factory()
    try:
        assert app.status_dict()["details"]["ingest"] == {"path": "python"}
        assert app.writer._rows is append_rows
        warnings = [r for r in caplog.records if "pure-Python path" in r.getMessage()]
        assert len(warnings) == 1
        assert PURE_PYTHON_ENV in str(getattr(warnings[0], "reason", ""))
        await check_bad_input(app, NOT_AN_EVENT)
    finally:
        await app.shutdown()
