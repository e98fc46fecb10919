"""Ingest limits through the real gRPC stack: events per batch, rejections per
ack, idle streams, and the call slots (in all and per peer)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from atlas_sidecar_client.pb import (
    active_learning_pb2,
    active_learning_pb2_grpc,
    admin_pb2,
    admin_pb2_grpc,
    control_pb2,
    control_pb2_grpc,
    events_pb2,
    ingest_pb2_grpc,
)

from sidecar._admission import peer_key
from sidecar._compiled import PURE_PYTHON_ENV
from tests._helpers import wait_until
from tests.conftest import inference, target_of

RECORD = "/atlas.sidecar.v1.IngestService/RecordEvents"
STREAM = "/atlas.sidecar.v1.IngestService/StreamEvents"

#: A read that must end well within this, or the test fails (not a timing assertion:
#: it only keeps a broken build from hanging the suite).
SAFETY = 30.0


def _raw_record(ch: grpc.aio.Channel) -> Any:
    return ch.unary_unary(
        RECORD, request_serializer=None, response_deserializer=events_pb2.IngestAck.FromString
    )


@pytest.fixture(params=["compiled", "python"])
def decode_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "python":
        monkeypatch.setenv(PURE_PYTHON_ENV, "1")
    return str(request.param)


async def test_over_cap_batch_is_refused_before_it_is_decoded(
    app_factory: Any, decode_path: str
) -> None:
    app = await app_factory(ingest={"max_events_per_batch": 100})
    assert app.ingest.decoder.path == decode_path
    try:
        async with grpc.aio.insecure_channel(target_of(app)) as ch:
            record = _raw_record(ch)
            # 101 empty events, then bytes that break the framing: decoding the
            # whole batch would answer "malformed at byte 202"; counting first
            # stops at the 101st event and never reaches them.
            raw = b"\x0a\x00" * 101 + b"\x0a\x7f"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await record(raw)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            details = err.value.details() or ""
            assert "ingest.max_events_per_batch=100" in details
            assert "malformed" not in details
            # the same on a stream, after the acks of the batches before it
            stub = ingest_pb2_grpc.IngestServiceStub(ch)
            call = stub.StreamEvents()
            await call.write(
                events_pb2.EventBatch(events=[inference(f"ok{i}") for i in range(100)])
            )
            assert (await call.read()).accepted == 100
            await call.write(
                events_pb2.EventBatch(events=[inference(f"no{i}") for i in range(101)])
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(call.read(), SAFETY)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "ingest.max_events_per_batch" in (err.value.details() or "")
            # a batch at the cap is fine, and nothing of the refused ones was stored
            ack = await stub.RecordEvents(
                events_pb2.EventBatch(events=[inference(f"cap{i}") for i in range(100)])
            )
            assert ack.accepted == 100
            assert app.status_dict()["events"]["accepted"] == 200
    finally:
        await app.shutdown()


async def test_ack_lists_at_most_the_configured_rejections(
    app_factory: Any, decode_path: str
) -> None:
    app = await app_factory(ingest={"max_rejections_per_ack": 3})
    try:
        async with grpc.aio.insecure_channel(target_of(app)) as ch:
            stub = ingest_pb2_grpc.IngestServiceStub(ch)
            bad = [inference(f"bad{i}", request_id="") for i in range(10)]
            batch = events_pb2.EventBatch(events=[inference("good-1"), *bad, inference("good-2")])
            ack = await stub.RecordEvents(batch)
            assert ack.accepted == 2
            assert [r.index for r in ack.rejected] == [1, 2, 3]
            assert all("inference.request_id" in r.reason for r in ack.rejected)
            assert ack.rejected_unlisted == 7
            assert ack.accepted + ack.duplicates + len(ack.rejected) + ack.rejected_unlisted == 12
            # every rejection is still counted by the daemon
            assert app.status_dict()["events"]["rejected"] == 10
    finally:
        await app.shutdown()


async def test_idle_stream_is_closed_with_unavailable_naming_the_key(app_factory: Any) -> None:
    app = await app_factory(ingest={"stream_idle_seconds": 0.2})
    try:
        async with grpc.aio.insecure_channel(target_of(app)) as ch:
            stub = ingest_pb2_grpc.IngestServiceStub(ch)
            call = stub.StreamEvents()
            await call.write(events_pb2.EventBatch(events=[inference("before-idle")]))
            assert (await call.read()).accepted == 1
            # then nothing: the daemon closes the stream
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(call.read(), SAFETY)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "ingest.stream_idle_seconds" in (err.value.details() or "")
            await wait_until(lambda: app.ingest.open_streams == 0, what="the stream to be gone")
            assert app.admission.in_progress == 0
            # a new stream works at once
            again = stub.StreamEvents()
            await again.write(events_pb2.EventBatch(events=[inference("after-idle")]))
            assert (await again.read()).accepted == 1
            await again.done_writing()
    finally:
        await app.shutdown()


async def _held_stream(stub: ingest_pb2_grpc.IngestServiceStub, event_id: str) -> Any:
    """A StreamEvents call that is in its handler (one batch acked), left open."""
    call = stub.StreamEvents()
    await call.write(events_pb2.EventBatch(events=[inference(event_id)]))
    assert (await call.read()).accepted == 1
    return call


async def test_unary_calls_and_connect_take_slots_of_the_cap(app_factory: Any) -> None:
    app = await app_factory(server={"max_concurrent_streams": 1})
    try:
        async with grpc.aio.insecure_channel(target_of(app)) as ch:
            stub = ingest_pb2_grpc.IngestServiceStub(ch)
            held = await _held_stream(stub, "holder")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.RecordEvents(events_pb2.EventBatch(events=[inference("u")]))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "server.max_concurrent_streams=1" in (err.value.details() or "")

            active = active_learning_pb2_grpc.ActiveLearningServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await active.ShouldRequestFeedback(
                    active_learning_pb2.ShouldRequestFeedbackRequest(request_id="r")
                )
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            control = control_pb2_grpc.ControlServiceStub(ch)
            connect = control.Connect()
            await connect.write(
                control_pb2.ServerMessage(hello=control_pb2.Hello(server_id="replica-1"))
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(connect.read(), SAFETY)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "server.max_concurrent_streams" in (err.value.details() or "")

            # admin calls are not producer calls: they still answer
            admin = admin_pb2_grpc.AdminServiceStub(ch)
            await admin.GetStatus(admin_pb2.GetStatusRequest())

            # once the stream ends, a Connect gets the slot and holds it
            await held.done_writing()
            assert await held.read() == grpc.aio.EOF
            await wait_until(lambda: app.admission.in_progress == 0, what="the slot to be free")
            connect = control.Connect()
            await connect.write(
                control_pb2.ServerMessage(hello=control_pb2.Hello(server_id="replica-1"))
            )
            await wait_until(lambda: app.admission.in_progress == 1, what="Connect to hold it")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.RecordEvents(events_pb2.EventBatch(events=[inference("v")]))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            connect.cancel()
    finally:
        await app.shutdown()


async def test_one_peer_cannot_hold_every_slot(app_factory: Any, tmp_path: Path) -> None:
    sock = tmp_path / "ingest.sock"
    app = await app_factory(
        server={
            "listen": ["127.0.0.1:0", f"unix:{sock}"],
            "max_concurrent_streams": 10,
            "max_streams_per_peer": 2,
        }
    )
    try:
        async with grpc.aio.insecure_channel(target_of(app)) as ch:
            stub = ingest_pb2_grpc.IngestServiceStub(ch)
            held = [await _held_stream(stub, f"h{i}") for i in range(2)]
            third = stub.StreamEvents()
            await third.write(events_pb2.EventBatch(events=[inference("h2")]))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(third.read(), SAFETY)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            details = err.value.details() or ""
            assert "server.max_streams_per_peer=2" in details
            assert "ipv4:127.0.0.1" in details
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.RecordEvents(events_pb2.EventBatch(events=[inference("h3")]))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            # another peer (the Unix socket) still gets a slot
            async with grpc.aio.insecure_channel(f"unix:{sock}") as other:
                other_stub = ingest_pb2_grpc.IngestServiceStub(other)
                ack = await other_stub.RecordEvents(
                    events_pb2.EventBatch(events=[inference("from-the-socket")])
                )
                assert ack.accepted == 1
            for call in held:
                await call.done_writing()
                assert await call.read() == grpc.aio.EOF
            # the peer's slots are back
            await wait_until(lambda: app.admission.in_progress == 0, what="the slots to be free")
            ack = await stub.RecordEvents(events_pb2.EventBatch(events=[inference("h4")]))
            assert ack.accepted == 1
    finally:
        await app.shutdown()


@pytest.mark.parametrize(
    ("peer", "key"),
    [
        ("ipv4:127.0.0.1:54321", "ipv4:127.0.0.1"),
        ("ipv6:[::1]:54321", "ipv6:[::1]"),
        ("ipv6:[2001:db8::7]:443", "ipv6:[2001:db8::7]"),
        ("unix:/run/atlas/ingest.sock", "unix:/run/atlas/ingest.sock"),
        ("unix:", "unix:"),
    ],
)
def test_peer_key_drops_only_the_port(peer: str, key: str) -> None:
    assert peer_key(peer) == key
