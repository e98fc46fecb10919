"""The traffic view credits feedback to the version that served the request,
remembering the newest ``telemetry.request_versions_kept`` requests."""

from __future__ import annotations

from pathlib import Path

from atlas_sidecar_client.pb import events_pb2

from sidecar.config import StoreConfig, TelemetryConfig
from sidecar.store import Store, StoreWriter, encode_log_value, encode_u64
from sidecar.telemetry._traffic import TrafficView, read_perf

KEPT = 1000
T0 = 1_700_000_000_000


def _log(store: Store, events: list[events_pb2.Event]) -> None:
    rows = [
        (encode_u64(seq), encode_log_value(T0 + seq, ev.SerializeToString()))
        for seq, ev in enumerate(events, start=1)
    ]
    with store.env.begin(write=True) as txn, txn.cursor(db=store.db("events")) as cur:
        cur.putmulti(rows, append=True)


def _inference(i: int, version: str) -> events_pb2.Event:
    return events_pb2.Event(
        event_id=f"i{i}",
        inference=events_pb2.Inference(request_id=f"req-{i}", model_version=version),
    )


def _rating(i: int) -> events_pb2.Event:
    return events_pb2.Event(
        event_id=f"f{i}", feedback=events_pb2.Feedback(request_id=f"req-{i}", rating=1.0)
    )


async def test_feedback_goes_to_the_serving_version_of_the_newest_requests(
    tmp_path: Path,
) -> None:
    cfg = StoreConfig(data_dir=tmp_path / "data", map_size_bytes=1 << 26, sync=False)
    store = Store(cfg)
    store.open()
    # 1,200 answers: 0-599 by v1, 600-1199 by v2 (one resent), so requests
    # 0-199 are forgotten; then feedback on a forgotten one and two kept ones.
    events = [_inference(i, "v1" if i < 600 else "v2") for i in range(1200)]
    events.append(_inference(1100, "v2"))
    events += [_rating(0), _rating(500), _rating(1100), _rating(5000)]
    _log(store, events)
    writer = StoreWriter(store, cfg)
    await writer.start()
    try:
        view = TrafficView(
            store,
            writer,
            TelemetryConfig(request_versions_kept=KEPT, report_bucket_seconds=3600),
            batch_events=300,  # several batches: forgetting runs between them
        )
        while await view.run_once():
            pass
        with store.read() as txn:
            perf = read_perf(txn, store)
    finally:
        await writer.shutdown()
        store.close()
    totals: dict[str, list[float]] = {}
    for _bucket, rows in perf:
        for version, row in rows.items():
            acc = totals.setdefault(version, [0.0] * len(row))
            for k, x in enumerate(row):
                acc[k] += x
    # [requests, errors, latency_ms_sum, feedback, reward_sum]
    assert totals["v1"][0] == 600 and totals["v2"][0] == 601
    assert totals["v1"][3] == 1  # req-500: still remembered
    assert totals["v2"][3] == 1  # req-1100
    assert totals["unknown"][3] == 2  # req-0 was forgotten; req-5000 never seen
    assert len(view._versions) == len(view._version_order) == KEPT
