"""IngestService through the real gRPC stack and a real LMDB."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import grpc
import pytest
from atlas_sidecar_client.pb import admin_pb2, admin_pb2_grpc, events_pb2, ingest_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.app import SidecarApp
from sidecar.store import decode_log_value
from tests.conftest import feedback, inference, target_of


def stored_ids(app: SidecarApp) -> list[str]:
    out = []
    with app.store.read() as txn:
        for _key, value in txn.cursor(db=app.store.db("events")):
            ev = events_pb2.Event()
            ev.ParseFromString(decode_log_value(value)[1])
            out.append(ev.event_id)
    return out


async def test_record_events_stores_and_counts(app: SidecarApp, channel: grpc.aio.Channel) -> None:
    stub = ingest_pb2_grpc.IngestServiceStub(channel)
    batch = events_pb2.EventBatch(
        events=[inference("e1", prompt="p", response="r"), feedback("e2", signal=events_pb2.COPY)]
    )
    ack = await stub.RecordEvents(batch)
    assert (ack.accepted, ack.duplicates, list(ack.rejected)) == (2, 0, [])
    assert stored_ids(app) == ["e1", "e2"]
    again = await stub.RecordEvents(batch)
    assert (again.accepted, again.duplicates) == (0, 2)
    assert stored_ids(app) == ["e1", "e2"]
    status = await admin_pb2_grpc.AdminServiceStub(channel).GetStatus(admin_pb2.GetStatusRequest())
    assert (status.events.accepted, status.events.duplicates, status.events.rejected) == (2, 2, 0)
    assert status.store.log_events == 2


async def test_duplicate_inside_one_batch_is_stored_once(
    app: SidecarApp, channel: grpc.aio.Channel
) -> None:
    stub = ingest_pb2_grpc.IngestServiceStub(channel)
    ack = await stub.RecordEvents(events_pb2.EventBatch(events=[inference("x"), inference("x")]))
    assert (ack.accepted, ack.duplicates) == (1, 1)
    assert stored_ids(app) == ["x"]


BAD_EVENTS = [
    (
        events_pb2.Event(inference=events_pb2.Inference(request_id="r", model_version="v")),
        "event_id: required",
    ),
    (events_pb2.Event(event_id="a"), "payload: one of inference or feedback is required"),
    (inference("b", request_id=""), "inference.request_id: required"),
    (inference("c", model_version=""), "inference.model_version: required"),
    (inference("d", role=42), "inference.role: unknown enum value 42"),
    (inference("e", latency_ms=-1.0), "inference.latency_ms"),
    (inference("f", latency_ms=math.nan), "inference.latency_ms"),
    (inference("g", token_logprobs=[-0.5, 0.25]), "inference.token_logprobs[1]"),
    (inference("h", prompt="x" * 300_000), "inference.prompt: longer than"),
    (
        inference("i", attributes={f"k{i}": "v" for i in range(65)}),
        "inference.attributes: more than 64",
    ),
    (inference("j", attributes={"k": "v" * 5000}), "inference.attributes['k']: value longer"),
    (feedback("k", request_id=""), "feedback.request_id: required"),
    (feedback("l", rating=math.nan), "feedback.rating: must be within [0, 1], got nan"),
    (feedback("m", rating=1.5), "feedback.rating: must be within [0, 1]"),
    (feedback("n", rating=-0.1), "feedback.rating: must be within [0, 1]"),
    (feedback("o", signal=99), "feedback.signal: unknown enum value 99"),
    (
        events_pb2.Event(event_id="p" * 300, feedback=events_pb2.Feedback(request_id="r")),
        "event_id: longer than 256",
    ),
]


@pytest.mark.parametrize(
    ("bad", "reason"),
    BAD_EVENTS,
    ids=[r.split(":")[0] + str(i) for i, (_, r) in enumerate(BAD_EVENTS)],
)
async def test_malformed_event_is_rejected_with_index_and_reason(
    app: SidecarApp, channel: grpc.aio.Channel, bad: events_pb2.Event, reason: str
) -> None:
    stub = ingest_pb2_grpc.IngestServiceStub(channel)
    batch = events_pb2.EventBatch(events=[inference("good-1"), bad, feedback("good-2", rating=0.0)])
    ack = await stub.RecordEvents(batch)
    assert ack.accepted == 2
    assert len(ack.rejected) == 1
    assert ack.rejected[0].index == 1
    assert reason in ack.rejected[0].reason
    assert stored_ids(app) == ["good-1", "good-2"]
    status = app.status_dict()
    assert status["events"] == {"accepted": 2, "duplicates": 0, "rejected": 1}


async def test_rating_zero_is_accepted_and_kept_as_a_rating(
    app: SidecarApp, channel: grpc.aio.Channel
) -> None:
    stub = ingest_pb2_grpc.IngestServiceStub(channel)
    await stub.RecordEvents(events_pb2.EventBatch(events=[feedback("z", rating=0.0)]))
    with app.store.read() as txn:
        _, raw = decode_log_value(txn.get((1).to_bytes(8, "big"), db=app.store.db("events")))
    ev = events_pb2.Event()
    ev.ParseFromString(raw)
    assert ev.feedback.HasField("rating") and ev.feedback.rating == 0.0


async def test_stream_acks_every_batch_in_order(app: SidecarApp, channel: grpc.aio.Channel) -> None:
    stub = ingest_pb2_grpc.IngestServiceStub(channel)
    batches = [
        events_pb2.EventBatch(events=[inference(f"s{b}-{i}") for i in range(b + 1)])
        for b in range(30)
    ]
    # batch 7 repeats batch 3, batch 9 has one bad event
    batches[7] = batches[3]
    batches[9].events[0].event_id = ""

    async def gen():  # type: ignore[no-untyped-def]
        for b in batches:
            yield b

    acks = [ack async for ack in stub.StreamEvents(gen())]
    assert len(acks) == 30
    for i, ack in enumerate(acks):
        n = len(batches[i].events)
        assert ack.accepted + ack.duplicates + len(ack.rejected) == n
    assert acks[7].duplicates == 4 and acks[7].accepted == 0
    assert [r.index for r in acks[9].rejected] == [0]
    assert len(stored_ids(app)) == sum(len(b.events) for b in batches) - 4 - 1


async def test_oversized_message_is_resource_exhausted_and_daemon_stays_up(
    app_factory,
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    app = await app_factory(server={"max_message_bytes": 64 * 1024})
    try:
        async with grpc.aio.insecure_channel(target_of(app)) as ch:
            stub = ingest_pb2_grpc.IngestServiceStub(ch)
            big = events_pb2.EventBatch(
                events=[inference(f"big{i}", prompt="x" * 1000) for i in range(100)]
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.RecordEvents(big)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            ack = await stub.RecordEvents(events_pb2.EventBatch(events=[inference("small")]))
            assert ack.accepted == 1
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await app.shutdown()


async def test_stream_cap_answers_resource_exhausted(app_factory) -> None:  # type: ignore[no-untyped-def]
    app = await app_factory(server={"max_concurrent_streams": 1})
    try:
        async with grpc.aio.insecure_channel(target_of(app)) as ch:
            stub = ingest_pb2_grpc.IngestServiceStub(ch)
            first = stub.StreamEvents()
            await first.write(events_pb2.EventBatch(events=[inference("a")]))
            assert (await first.read()).accepted == 1
            second = stub.StreamEvents()
            await second.write(events_pb2.EventBatch(events=[inference("b")]))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await second.read()
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_concurrent_streams" in (err.value.details() or "")
            await first.done_writing()
            assert await first.read() == grpc.aio.EOF
            # the slot is free again
            third = stub.StreamEvents()
            await third.write(events_pb2.EventBatch(events=[inference("c")]))
            assert (await third.read()).accepted == 1
            await third.done_writing()
    finally:
        await app.shutdown()


async def test_full_map_answers_resource_exhausted_and_keeps_serving(app_factory) -> None:  # type: ignore[no-untyped-def]
    app = await app_factory(store={"map_size_bytes": 1 << 20, "map_size_max_bytes": 2 << 20})
    try:
        async with grpc.aio.insecure_channel(target_of(app)) as ch:
            stub = ingest_pb2_grpc.IngestServiceStub(ch)
            admin = admin_pb2_grpc.AdminServiceStub(ch)
            stored = 0
            code = None
            for b in range(200):
                batch = events_pb2.EventBatch(
                    events=[inference(f"f{b}-{i}", prompt="y" * 2000) for i in range(20)]
                )
                try:
                    ack = await stub.RecordEvents(batch)
                    stored += ack.accepted
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                    assert "map_size_max_bytes" in (exc.details() or "")
                    break
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert app.writer.stats.map_grows >= 1
            # nothing half-written: the log holds exactly the acked events
            assert len(stored_ids(app)) == stored
            status = await admin.GetStatus(admin_pb2.GetStatusRequest())
            assert status.events.accepted == stored
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await app.shutdown()


async def test_drain_commits_and_acks_inflight_batches(
    app: SidecarApp, channel: grpc.aio.Channel
) -> None:
    stub = ingest_pb2_grpc.IngestServiceStub(channel)
    call = stub.StreamEvents()
    for b in range(5):
        await call.write(events_pb2.EventBatch(events=[inference(f"d{b}-{i}") for i in range(50)]))
    acks = [await call.read() for _ in range(5)]
    assert sum(a.accepted for a in acks) == 250
    app.ingest.drain()
    # the server ends the stream cleanly; everything acked is stored
    assert await call.read() == grpc.aio.EOF
    assert len(stored_ids(app)) == 250


async def test_health_and_reflection_are_served(app_factory: Any) -> None:

    app = await app_factory(server={"reflection": True})  # off by default
    try:
        async with grpc.aio.insecure_channel(target_of(app)) as channel:
            await _health_and_reflection(channel)
    finally:
        await app.shutdown()


async def test_reflection_is_off_by_default(channel: grpc.aio.Channel) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async def req():  # type: ignore[no-untyped-def]
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            req()
        ):
            pass
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def _health_and_reflection(channel: grpc.aio.Channel) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    health = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="atlas.sidecar.v1.IngestService")
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def req():  # type: ignore[no-untyped-def]
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names = set()
    async for resp in stub.ServerReflectionInfo(req()):
        names = {s.name for s in resp.list_services_response.service}
    assert {
        "atlas.sidecar.v1.IngestService",
        "atlas.sidecar.v1.AdminService",
        "grpc.health.v1.Health",
    } <= names


async def test_unbuilt_admin_rpcs_answer_unimplemented_naming_what_is_missing(
    app: SidecarApp, channel: grpc.aio.Channel
) -> None:
    app.handlers.report = None  # a build without the learning monitor
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin_pb2_grpc.AdminServiceStub(channel).GetReport(admin_pb2.GetReportRequest())
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "learning monitor" in (err.value.details() or "")


async def test_concurrent_streams_are_group_committed(
    app: SidecarApp, channel: grpc.aio.Channel
) -> None:
    stub = ingest_pb2_grpc.IngestServiceStub(channel)

    async def one(s: int) -> int:
        async def gen():  # type: ignore[no-untyped-def]
            for b in range(20):
                yield events_pb2.EventBatch(events=[inference(f"c{s}-{b}-{i}") for i in range(25)])

        return sum([a.accepted async for a in stub.StreamEvents(gen())])

    totals = await asyncio.gather(*(one(s) for s in range(4)))
    assert totals == [500] * 4
    assert len(set(stored_ids(app))) == 2000
