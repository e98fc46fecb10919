"""kill -9 the daemon mid-stream, again and again: nothing acked is lost or doubled."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from atlas_sidecar_client import EventStream, Signal
from atlas_sidecar_client.pb import events_pb2

from sidecar.config import StoreConfig
from sidecar.store import Store, decode_log_value
from sidecar.testing import DaemonProcess


def read_log(data_dir: Path) -> list[str]:
    store = Store(StoreConfig(data_dir=data_dir))
    store.open()
    try:
        ids = []
        with store.read() as txn:
            for _k, v in txn.cursor(db=store.db("events")):
                ev = events_pb2.Event()
                ev.ParseFromString(decode_log_value(v)[1])
                ids.append(ev.event_id)
        return ids
    finally:
        store.close()


def test_kill_9_mid_stream_loses_and_doubles_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    # Auth on, as in production: the client's token must survive every restart.
    daemon = DaemonProcess(data, http_port=0, auth=True).start()
    acked: set[str] = set()
    acked_lock = threading.Lock()

    def on_ack(batch: events_pb2.EventBatch, ack: events_pb2.IngestAck) -> None:
        rejected = {r.index for r in ack.rejected}
        with acked_lock:
            acked.update(e.event_id for i, e in enumerate(batch.events) if i not in rejected)

    stream = EventStream(
        daemon.target,
        batch_size=50,
        linger_ms=2,
        backoff_max=0.3,
        on_ack=on_ack,
        token=daemon.tokens["ingest"],
    )
    recorded: list[str] = []
    stop = threading.Event()

    def produce() -> None:
        n = 0
        while not stop.is_set() and n < 30_000:
            rid = f"r{n}"
            recorded.append(
                stream.record_inference(rid, "v1", prompt="p" * 100, response="a" * 100)
            )
            recorded.append(stream.record_feedback(rid, signal=Signal.COPY))
            n += 1
            if n % 200 == 0:
                time.sleep(0.01)  # about 20-40k events/s: a busy server, not a flood

    producer = threading.Thread(target=produce)
    producer.start()
    kills = 0
    try:
        for _ in range(4):
            time.sleep(0.6)
            daemon.kill()
            kills += 1
            time.sleep(0.3)  # the client keeps recording while the daemon is down
            daemon = daemon.relaunch().start()
        producer.join(60)
        stop.set()
        assert stream.flush(60), f"client could not deliver: {stream.stats}"
        stats = stream.stats
    finally:
        stop.set()
        stream.close(5)
        daemon.stop()
    assert kills == 4
    assert stats.reconnects >= 4
    assert stats.dropped == 0
    stored = read_log(data)
    # exactly once: no id twice in the log ...
    assert len(stored) == len(set(stored))
    # ... every acked event is there, and the client delivered everything it queued
    assert acked <= set(stored)
    assert set(recorded) == set(stored)
    assert len(stored) == len(recorded)
    # resends after a kill were answered as duplicates, not stored twice
    assert stats.duplicates > 0 or stats.accepted == len(recorded)
