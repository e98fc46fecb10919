"""EventStream on its own: never blocks, bounded, ordered ids."""

from __future__ import annotations

import re
import time
import uuid

import pytest
from atlas_sidecar_client import EventStream, Signal, uuid7

from sidecar.testing import free_port


def test_uuid7_is_valid_and_strictly_increasing() -> None:
    ids = [uuid7() for _ in range(20_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    for s in ids[:100]:
        u = uuid.UUID(s)
        assert u.version == 7
        assert u.variant == uuid.RFC_4122
        assert re.fullmatch(
            r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", s
        )
    ms = uuid.UUID(ids[0]).int >> 80
    assert abs(ms - time.time() * 1000) < 60_000


def test_records_without_a_daemon_never_block_and_drop_newest_by_count() -> None:
    stream = EventStream(f"127.0.0.1:{free_port()}", max_queue=1000, max_inflight_batches=2)
    try:
        ids = [stream.record_feedback(f"r{i}", signal=Signal.COPY) for i in range(5000)]
        assert len(set(ids)) == 5000
        # at most max_queue queued plus what the batcher took into flight
        assert stream.stats.dropped >= 5000 - 1000 - 2 * 100
        assert stream.pending <= 1000 + 2 * 100
        assert stream.flush(0.2) is False
    finally:
        assert stream.close(0.1) is False
    assert stream.stats.dropped == 5000  # nothing was ever delivered


def test_drop_oldest_keeps_the_newest_events() -> None:
    stream = EventStream(
        f"127.0.0.1:{free_port()}",
        max_queue=10,
        drop_policy="drop_oldest",
        linger_ms=10_000,
        batch_size=10_000,
    )
    try:
        for i in range(100):
            stream.record_feedback(f"r{i}", rating=0.5)
        assert stream.stats.dropped == 90
        assert [item[3] for item in stream._queue] == [f"r{i}" for i in range(90, 100)]
    finally:
        stream.close(0.1)


@pytest.mark.parametrize("bad", [{"batch_size": 0}, {"max_queue": 0}, {"drop_policy": "drop_all"}])
def test_bad_options_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        EventStream("127.0.0.1:1", **bad)  # type: ignore[arg-type]
