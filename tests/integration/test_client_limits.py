"""The Python EventStream against the daemon's ingest limits: batches cut at
the cap, permanent rejections dropped, idle streams reopened on demand."""

from __future__ import annotations

from typing import Any

from atlas_sidecar_client import EventStream
from atlas_sidecar_client.pb import events_pb2

from sidecar.app import SidecarApp
from tests._helpers import wait_until
from tests.conftest import target_of


async def test_batches_are_cut_at_the_cap(app_factory: Any) -> None:
    app: SidecarApp = await app_factory(ingest={"max_events_per_batch": 50})
    sizes: list[int] = []
    stream = EventStream(
        target_of(app),
        batch_size=1000,
        max_events_per_batch=50,
        on_ack=lambda batch, _ack: sizes.append(len(batch.events)),
    )
    try:
        for i in range(120):
            stream.record_feedback(f"r{i}", rating=1.0)
        assert await stream.aflush(20)
        assert stream.stats.accepted == 120
        assert stream.stats.rejected_batches == 0
        assert sum(sizes) == 120 and max(sizes) <= 50
        assert app.status_dict()["events"]["accepted"] == 120
    finally:
        await stream.aclose()
        await app.shutdown()


async def test_a_batch_refused_whole_is_counted_and_not_resent(app_factory: Any) -> None:
    app: SidecarApp = await app_factory(ingest={"max_events_per_batch": 5})
    # A client set above the daemon's cap: its 10-event batch is refused.
    stream = EventStream(target_of(app), batch_size=10, max_events_per_batch=10, linger_ms=60_000)
    try:
        for i in range(10):
            stream.record_feedback(f"big{i}", rating=1.0)
        assert await stream.aflush(10)  # resending it forever would never flush
        assert (stream.stats.rejected, stream.stats.rejected_batches) == (10, 1)
        assert "ingest.max_events_per_batch" in stream.stats.last_error
        for i in range(3):
            stream.record_feedback(f"small{i}", rating=1.0)
        assert await stream.aflush(10)
        assert stream.stats.accepted == 3
        assert app.status_dict()["events"]["accepted"] == 3
    finally:
        await stream.aclose()
        await app.shutdown()


async def test_unlisted_rejections_are_counted_too(app_factory: Any) -> None:
    app: SidecarApp = await app_factory(ingest={"max_rejections_per_ack": 2})
    acks: list[events_pb2.IngestAck] = []
    stream = EventStream(target_of(app), on_ack=lambda _b, ack: acks.append(ack))
    try:
        for i in range(5):
            stream.record_feedback(f"bad{i}", rating=2.0)  # out of range: rejected
        stream.record_feedback("good", rating=1.0)
        assert await stream.aflush(20)
        assert (stream.stats.accepted, stream.stats.rejected) == (1, 5)
        assert stream.stats.acked_events == 6
        assert sum(len(a.rejected) for a in acks) < 5  # some were only counted
    finally:
        await stream.aclose()
        await app.shutdown()


async def test_stream_closed_for_idleness_is_reopened_when_there_is_more(
    app_factory: Any,
) -> None:
    app: SidecarApp = await app_factory(ingest={"stream_idle_seconds": 0.2})
    stream = EventStream(target_of(app), backoff_max=0.2)
    try:
        stream.record_feedback("first", rating=1.0)
        assert await stream.aflush(20)
        await wait_until(
            lambda: "ingest.stream_idle_seconds" in stream.stats.last_error,
            what="the daemon to close the idle stream",
        )
        await wait_until(lambda: app.ingest.open_streams == 0, what="the stream to be gone")
        stream.record_feedback("second", rating=1.0)
        assert await stream.aflush(20)
        assert (stream.stats.accepted, stream.stats.rejected) == (2, 0)
        assert app.status_dict()["events"]["accepted"] == 2
    finally:
        await stream.aclose()
        await app.shutdown()
