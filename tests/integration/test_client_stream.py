"""EventStream against a real in-process daemon."""

from __future__ import annotations

import asyncio
from pathlib import Path

from atlas_sidecar_client import EventStream, Signal
from atlas_sidecar_client.pb import events_pb2

from sidecar.app import SidecarApp
from sidecar.testing import DaemonProcess, free_port
from tests.conftest import target_of


async def test_usable_from_asyncio(app: SidecarApp) -> None:
    stream = EventStream(target_of(app))
    for i in range(500):
        stream.record_inference(
            f"r{i}",
            "v1",
            prompt="p",
            response="a",
            token_logprobs=[-0.1, -2.0],
            attributes={"task_id": "t1"},
            user_id="u",
            session_id="s",
            retry_of="r0",
        )
        stream.record_feedback(
            f"r{i}",
            signal=Signal.ENGAGE,
            rating=0.0,
            dwell_ms=1200,
            correction="better",
            user_id="u",
        )
    assert await stream.aflush(20)
    assert stream.stats.accepted == 1000
    assert app.status_dict()["events"]["accepted"] == 1000
    # the fields arrive as recorded, a 0.0 rating included
    with app.store.read() as txn:
        raw = txn.get((2).to_bytes(8, "big"), db=app.store.db("events"))
    ev = events_pb2.Event()
    ev.ParseFromString(bytes(raw[8:]))
    assert ev.feedback.HasField("rating") and ev.feedback.rating == 0.0
    assert ev.feedback.signal == Signal.ENGAGE and ev.feedback.correction == "better"
    assert ev.time.seconds > 0
    assert await stream.aclose()


async def test_rejected_events_are_counted_by_the_client(app: SidecarApp) -> None:
    stream = EventStream(target_of(app))
    stream.record_feedback("r1", rating=2.0)  # out of range: rejected by the sidecar
    stream.record_feedback("r1", rating=1.0)
    assert await stream.aflush(20)
    assert (stream.stats.accepted, stream.stats.rejected) == (1, 1)
    await stream.aclose()


def test_events_recorded_before_the_daemon_starts_are_delivered(tmp_path: Path) -> None:
    port = free_port()
    stream = EventStream(f"127.0.0.1:{port}", backoff_max=0.2)
    for i in range(2000):
        stream.record_feedback(f"r{i}", signal=Signal.SHARE)
    daemon = DaemonProcess(tmp_path / "d", port=port, http_port=0)
    try:
        asyncio.run(asyncio.sleep(0.3))
        daemon.start()
        assert stream.flush(30)
        assert stream.stats.accepted == 2000
        assert stream.stats.reconnects >= 1
    finally:
        stream.close(2)
        daemon.stop()
