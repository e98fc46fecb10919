"""The rollout observer remembers which arm served a request across a restart.

Real LMDB, the real ``ProcessorRunner``: the log is written, the observer
processes part of it, the store is closed and reopened with a fresh observer,
and feedback that arrives after the "restart" for requests served before it
counts for the arm that served them; bounded by count and by age in log time,
and the same whatever the batch sizes or restarts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from atlas_sidecar_client.pb import events_pb2

from sidecar.config import StoreConfig
from sidecar.rollout import StoredObservations, comparator_by_name
from sidecar.rollout._observe import ActiveView, RolloutObserver
from sidecar.store import ProcessorRunner, Store, StoreWriter, encode_log_value, encode_u64

VIEW = ActiveView("r1", candidate="v2", stable="v1")
T0 = 1_700_000_000_000

#: (ingest ms, event)
Log = list[tuple[int, events_pb2.Event]]


def inf(request_id: str, version: str) -> events_pb2.Event:
    ev = events_pb2.Event(event_id=f"i-{request_id}")
    ev.inference.request_id = request_id
    ev.inference.model_version = version
    ev.inference.role = events_pb2.PRIMARY
    ev.inference.response = "an answer"
    ev.inference.latency_ms = 100.0
    return ev


def fb(request_id: str, rating: float) -> events_pb2.Event:
    ev = events_pb2.Event(event_id=f"f-{request_id}")
    ev.feedback.request_id = request_id
    ev.feedback.rating = rating
    return ev


async def _process(
    data: Path, log: Log, *, start: int, batch: int = 2000, view: ActiveView = VIEW, **kw: Any
) -> None:
    """Appends ``log`` from sequence ``start``, then runs a fresh observer over
    it: a daemon that (re)started and caught up."""
    cfg = StoreConfig(data_dir=data, sync=False)
    store = Store(cfg)
    store.open()
    rows = [
        (encode_u64(seq), encode_log_value(ms, ev.SerializeToString()))
        for seq, (ms, ev) in enumerate(log, start=start)
    ]
    with store.env.begin(write=True) as txn, txn.cursor(db=store.db("events")) as cur:
        cur.putmulti(rows, append=True)
    writer = StoreWriter(store, cfg)
    await writer.start()
    try:
        observer = RolloutObserver(store, comparator_by_name("token_jaccard"), **kw)
        observer.view = view
        runner = ProcessorRunner(store, writer, [observer], batch_events=batch)
        while await runner.run_once():
            pass
        assert await runner.caught_up()
    finally:
        await writer.shutdown()
        store.close()


def _stored(data: Path, rollout_id: str = "r1") -> tuple[list[float], list[float], int, bytes]:
    """Candidate and stable rewards, the attribution records and the raw observations."""
    store = Store(StoreConfig(data_dir=data, sync=False))
    store.open()
    try:
        got = StoredObservations(store).collect(rollout_id, 0, T0)
        with store.read() as txn:
            rows = list(txn.cursor(db=store.db("rollouts")))
        records = sum(1 for k, _ in rows if bytes(k).startswith(b"s/"))
        obs = b"".join(bytes(k) + bytes(v) for k, v in rows if bytes(k).startswith(b"o/"))
        return (
            got.traffic.candidate.reward.tolist(),
            got.traffic.stable.reward.tolist(),
            records,
            obs,
        )
    finally:
        store.close()


def _canary_log() -> tuple[Log, Log]:
    """Requests to both arms (and to an unrelated version) before the restart,
    their feedback after it."""
    before: Log = []
    for i in range(6):
        before.append((T0 + i, inf(f"c{i}", "v2")))
        before.append((T0 + i, inf(f"s{i}", "v1")))
        before.append((T0 + i, inf(f"x{i}", "v9")))
    before.append((T0 + 10, fb("c0", 1.0)))
    after: Log = [(T0 + 20 + i, fb(f"c{i}", 0.1 * i)) for i in range(1, 6)]
    after += [(T0 + 30 + i, fb(f"s{i}", 0.5 + 0.1 * i)) for i in range(6)]
    after += [(T0 + 40, fb("x1", 1.0))]
    return before, after


async def test_rollout_feedback_after_a_restart_counts_for_the_arm_that_served_it(
    tmp_path: Path,
) -> None:
    before, after = _canary_log()
    await _process(tmp_path / "restarted", before, start=1)
    await _process(tmp_path / "restarted", after, start=len(before) + 1)
    cand, stable, records, obs = _stored(tmp_path / "restarted")
    # ratings travel as float32
    assert cand == pytest.approx([1.0, 0.1, 0.2, 0.3, 0.4, 0.5], abs=1e-6)
    assert stable == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9, 1.0], abs=1e-6)
    assert records >= 1

    # The same log without a restart, and event by event: the same observations.
    await _process(tmp_path / "straight", before + after, start=1)
    await _process(tmp_path / "one-by-one", before + after, start=1, batch=1)
    assert _stored(tmp_path / "straight")[3] == obs
    assert _stored(tmp_path / "one-by-one")[3] == obs


async def test_rollout_attribution_is_bounded_by_count_and_log_time(tmp_path: Path) -> None:
    data = tmp_path / "data"
    bounds: dict[str, Any] = {"join_capacity": 4, "feedback_window_ms": 60_000}
    served: Log = [(T0 + i, inf(f"c{i}", "v2")) for i in range(20)]
    await _process(data, served, start=1, batch=3, **bounds)
    # Only the last four requests can still be joined; records of the rest
    # were deleted as their last entry fell out.
    assert _stored(data)[2] <= 3
    late: Log = [
        (T0 + 100, fb("c0", 0.9)),  # beyond the count bound
        (T0 + 101, fb("c17", 0.8)),
        (T0 + 102, fb("c18", 0.7)),
        (T0 + 61_000, fb("c19", 0.6)),  # beyond the window (log time)
    ]
    await _process(data, late, start=len(served) + 1, **bounds)
    assert _stored(data)[0] == pytest.approx([0.8, 0.7], abs=1e-6)

    # A request is joined only within the rollout that served it.
    other = ActiveView("r2", candidate="v2", stable="v1")
    n = len(served) + len(late)
    await _process(data, [(T0 + 200, fb("c16", 0.5))], start=n + 1, view=other, **bounds)
    assert _stored(data, "r2")[0] == []
