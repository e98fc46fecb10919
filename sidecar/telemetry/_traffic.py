"""The per-version traffic view: model metrics and the report's time series.

It reads the event log through its own durable cursor (``meta`` key
``cursor/telemetry.traffic``, so retention waits for it), a batch at a time,
and for each batch:

- records the model metrics once per version (requests, errors, latency,
  feedback reward) and the feedback signal counts;
- adds the batch's totals to time buckets (``meta`` keys
  ``telemetry/perf/<bucket start ms>``) and to the feedback distribution
  (``telemetry/feedback``) in the same transaction that moves the cursor, so
  a crash replays to the same numbers.

Feedback is attributed to the version that answered its request through a
bounded in-memory map of recent requests; feedback whose request is not in
it (very late, or from before a restart) counts under version ``unknown``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from sys import intern
from typing import Any

import lmdb
from atlas_sidecar_client.pb import events_pb2

from sidecar import instruments as ins
from sidecar._aio import cancel_and_wait, set_threadsafe, spawn, wait_event
from sidecar.config import TelemetryConfig
from sidecar.scoring import WeightTable, score_feedback
from sidecar.store import (
    CURSOR_PREFIX,
    Store,
    StoreWriter,
    decode_log_value,
    decode_u64,
    encode_u64,
    read_cursor,
)
from sidecar.telemetry._cardinality import VersionLabels

__all__ = ["FEEDBACK_KEY", "PERF_PREFIX", "TrafficView", "read_feedback", "read_perf"]

log = logging.getLogger(__name__)

NAME = "telemetry.traffic"
CURSOR_KEY = CURSOR_PREFIX + NAME.encode()
PERF_PREFIX = b"telemetry/perf/"
FEEDBACK_KEY = b"telemetry/feedback"
#: Reward histogram bins: [0, 0.1), [0.1, 0.2), ... [0.9, 1.0].
BINS = 10

#: Ingest counts as quiet after this long without a commit.
_QUIET_S = 0.5
#: Most view time banked while idle, spent at the start of a burst.
_BURST_S = 0.01
#: Events per batch while ingest is busy (small, so the budget is kept finely).
_BUSY_BATCH = 500

_ROLE = {v: k for k, v in events_pb2.Role.items()}
_SIGNAL = {v: k for k, v in events_pb2.Signal.items()}
_PRIMARY = events_pb2.PRIMARY
_UNSPEC_ROLE = events_pb2.ROLE_UNSPECIFIED


@dataclass
class _VersionAgg:
    requests: int = 0
    errors: int = 0
    latency_ms_sum: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    feedback: int = 0
    reward_sum: float = 0.0
    rewards: list[float] = field(default_factory=list)


@dataclass
class _Batch:
    #: (version, role) -> aggregate; role PRIMARY also feeds the buckets.
    traffic: dict[tuple[str, str], _VersionAgg] = field(
        default_factory=lambda: defaultdict(_VersionAgg)
    )
    #: bucket start ms -> version -> [requests, errors, latency_ms_sum, feedback, reward_sum]
    buckets: dict[int, dict[str, list[float]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(lambda: [0, 0, 0.0, 0, 0.0]))
    )
    signals: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bins: list[int] = field(default_factory=lambda: [0] * BINS)
    last_seq: int = 0
    events: int = 0
    skipped: int = 0


class TrafficView:
    """A stage: ``start()`` begins following the log; ``shutdown()`` stops it."""

    def __init__(
        self,
        store: Store,
        writer: StoreWriter,
        config: TelemetryConfig,
        *,
        batch_events: int = 5000,
        min_interval_s: float = 0.25,
        table: WeightTable | None = None,
        labels: VersionLabels | None = None,
    ) -> None:
        #: Versions past telemetry.max_versions are counted as ``other`` in
        #: the metrics and the stored buckets (see _cardinality).
        self.labels = labels or VersionLabels(config.max_versions)
        self._share = config.view_cpu_share
        self._last_commit = 0.0
        self._budget = _BURST_S
        self._refill_at = time.monotonic()
        self._max_lag = config.view_max_lag_events
        self.skipped = 0
        self._store = store
        self._writer = writer
        self._bucket_ms = int(config.report_bucket_seconds * 1000)
        self._kept = config.report_buckets_kept
        self._max_requests = config.request_versions_kept
        self._batch = batch_events
        self._interval = min_interval_s
        self._table = table or WeightTable()
        # The version that served each recent request, to credit its feedback.
        # Keyed by the hash of the request id, with the version string
        # interned (one per version) and the order of arrival kept apart (for
        # the oldest to go first): about 80 bytes a request instead of 270
        # with the ids and an OrderedDict (27 MB at the default 100,000). Two
        # ids of equal 64-bit hash would credit one feedback to the other's
        # version.
        self._versions: dict[int, str] = {}
        self._version_order: deque[int] = deque()
        #: Reward of feedback carrying only a signal, by signal (no rating).
        self._rewards = {
            sig: score_feedback((sig,), None, self._table).reward
            for sig in events_pb2.Signal.values()
            if sig != events_pb2.SIGNAL_UNSPECIFIED
        }
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.processed = 0

    async def start(self) -> None:
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._writer.add_commit_listener(self._on_commit)
        self._task = spawn(self._run(), stage="telemetry", name="traffic")

    async def shutdown(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    def _on_commit(self, last_seq: int) -> None:
        self._last_commit = time.monotonic()
        set_threadsafe(self._loop, self._wakeup)

    async def _run(self) -> None:
        while True:
            # While events are arriving the view works from a budget that
            # refills at ``view_cpu_share`` of wall time (holding at most
            # _BURST_S), in small batches, so it never takes more than that
            # share of a core from ingest. Under a burst it falls behind (the
            # lag is in the status) and catches up at full speed once ingest
            # has been quiet for _QUIET_S.
            busy = time.monotonic() - self._last_commit < _QUIET_S
            if busy:
                now = time.monotonic()
                self._budget = min(self._budget + (now - self._refill_at) * self._share, _BURST_S)
                self._refill_at = now
                if self._budget < 0:
                    await asyncio.sleep(max(self._interval, -self._budget / self._share))
                    continue
            started = time.perf_counter()
            try:
                more = await self.run_once(limit=_BUSY_BATCH if busy else self._batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("traffic view batch failed; retrying")
                more = False
                await asyncio.sleep(1.0)
            if busy:
                self._budget -= time.perf_counter() - started
            if more:
                await asyncio.sleep(0)
                continue
            await wait_event(self._wakeup, 1.0)
            self._wakeup.clear()

    async def run_once(self, limit: int | None = None) -> bool:
        """Folds one batch of the log into the view. True when more is waiting."""
        n = limit or self._batch
        batch = await asyncio.to_thread(self._read, n)
        if batch is None:
            return False
        await self._writer.run(lambda txn: self._commit(txn, batch))
        self._record(batch)
        self.processed += batch.events
        self.skipped += batch.skipped
        return batch.events >= n

    def status(self) -> dict[str, int]:
        """The view's part of the daemon status."""
        with self._store.read() as txn:
            cursor = read_cursor(txn, self._store, NAME)
        return {
            "view_lag_events": max(0, self._writer.next_seq - cursor),
            "view_processed": self.processed,
            "view_skipped": self.skipped,
            "versions_labelled": self.labels.labelled,
        }

    async def wait_idle(self, within_s: float = 30.0) -> None:
        """Waits until the view has caught up with the log (tests, demo)."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            with self._store.read() as txn:
                if read_cursor(txn, self._store, NAME) >= self._writer.next_seq:
                    return
            self._wakeup.set()
            await asyncio.sleep(0.02)
        raise TimeoutError("traffic view did not catch up")

    # -- one batch -------------------------------------------------------

    def _read(self, limit: int) -> _Batch | None:
        store = self._store
        b = _Batch()
        bucket_ms = self._bucket_ms
        versions = self._versions
        order = self._version_order
        parse = events_pb2.Event.FromString
        rewards = self._rewards
        labels = self.labels
        labels.refresh()
        label = labels.label
        with store.read() as txn:
            start = read_cursor(txn, store, NAME)
            behind = self._writer.next_seq - start
            if behind > self._max_lag:
                # Far behind (a long burst): skip rather than hold retention back.
                b.skipped = behind - self._max_lag
                start += b.skipped
            with txn.cursor(db=store.db("events")) as cur:
                if not cur.set_range(encode_u64(start)):
                    return None
                for key, value in cur:
                    ingest_ms, payload = decode_log_value(value)
                    ev = parse(payload)
                    b.last_seq = decode_u64(bytes(key))
                    b.events += 1
                    bucket = ingest_ms - ingest_ms % bucket_ms
                    kind = ev.WhichOneof("payload")
                    if kind == "inference":
                        inf = ev.inference
                        version = label(inf.model_version)
                        role_n = inf.role or _PRIMARY
                        agg = b.traffic[(version, _ROLE.get(role_n, "PRIMARY"))]
                        agg.requests += 1
                        agg.latencies_s.append(inf.latency_ms / 1000.0)
                        if inf.error:
                            agg.errors += 1
                        if role_n == _PRIMARY:
                            row = b.buckets[bucket][version]
                            row[0] += 1
                            row[1] += inf.error
                            row[2] += inf.latency_ms
                            rkey = hash(inf.request_id)
                            if rkey not in versions:
                                order.append(rkey)
                            versions[rkey] = intern(version)
                    elif kind == "feedback":
                        fb = ev.feedback
                        version = versions.get(hash(fb.request_id), "unknown")
                        if fb.HasField("rating"):
                            score = score_feedback((fb.signal,), fb.rating, self._table)
                            reward = score.reward
                        else:
                            reward = rewards.get(fb.signal, -1.0)
                            if reward < 0:
                                continue
                        agg = b.traffic[(version, "PRIMARY")]
                        agg.feedback += 1
                        agg.rewards.append(reward)
                        row = b.buckets[bucket][version]
                        row[3] += 1
                        row[4] += reward
                        b.signals[_SIGNAL.get(fb.signal, "UNKNOWN")] += 1
                        b.bins[min(BINS - 1, int(reward * BINS))] += 1
                    if b.events >= limit:
                        break
        if b.events == 0 and not b.skipped:
            return None
        while len(order) > self._max_requests:
            del versions[order.popleft()]
        return b

    def _commit(self, txn: lmdb.Transaction, b: _Batch) -> None:
        """Writer thread: buckets, distribution and cursor in one transaction."""
        meta = self._store.db("meta")
        # A concurrent replay (never expected) must not double count.
        if read_cursor(txn, self._store, NAME) > b.last_seq:
            return
        for bucket, rows in b.buckets.items():
            key = PERF_PREFIX + encode_u64(bucket)
            raw = txn.get(key, db=meta)
            doc: dict[str, list[float]] = json.loads(bytes(raw)) if raw else {}
            for version, row in rows.items():
                old = doc.get(version, [0, 0, 0.0, 0, 0.0])
                doc[version] = [round(a + c, 6) for a, c in zip(old, row, strict=True)]
            txn.put(key, json.dumps(doc, separators=(",", ":")).encode(), db=meta)
        if b.signals or any(b.bins):
            raw = txn.get(FEEDBACK_KEY, db=meta)
            dist: dict[str, Any] = (
                json.loads(bytes(raw)) if raw else {"bins": [0] * BINS, "signals": {}}
            )
            dist["bins"] = [a + c for a, c in zip(dist["bins"], b.bins, strict=True)]
            for name, n in b.signals.items():
                dist["signals"][name] = dist["signals"].get(name, 0) + n
            txn.put(FEEDBACK_KEY, json.dumps(dist, sort_keys=True).encode(), db=meta)
        self._trim(txn, meta)
        txn.put(CURSOR_KEY, encode_u64(b.last_seq + 1), db=meta)

    def _trim(self, txn: lmdb.Transaction, meta: Any) -> None:
        keys: list[bytes] = []
        with txn.cursor(db=meta) as cur:
            if cur.set_range(PERF_PREFIX):
                for key in cur.iternext(values=False):
                    if not bytes(key).startswith(PERF_PREFIX):
                        break
                    keys.append(bytes(key))
        for key in keys[: max(0, len(keys) - self._kept)]:
            txn.delete(key, db=meta)

    def _record(self, b: _Batch) -> None:
        ins.view_batch(b.events, b.skipped)
        for (version, role), agg in b.traffic.items():
            if agg.requests:
                ins.model_traffic(version, role, agg.requests, agg.errors, agg.latencies_s)
            if agg.feedback:
                ins.feedback(version, agg.rewards)
        if b.signals:
            ins.feedback_signals(b.signals)


def read_perf(txn: lmdb.Transaction, store: Store) -> list[tuple[int, dict[str, list[float]]]]:
    """Every kept bucket, oldest first: (start ms, version -> [requests,
    errors, latency_ms_sum, feedback, reward_sum])."""
    meta = store.db("meta")
    out: list[tuple[int, dict[str, list[float]]]] = []
    with txn.cursor(db=meta) as cur:
        if cur.set_range(PERF_PREFIX):
            for key, value in cur:
                k = bytes(key)
                if not k.startswith(PERF_PREFIX):
                    break
                out.append((decode_u64(k[len(PERF_PREFIX) :]), json.loads(bytes(value))))
    return out


def read_feedback(txn: lmdb.Transaction, store: Store) -> dict[str, Any]:
    """``{"bins": [10 counts of reward], "signals": {name: count}}``."""
    raw = txn.get(FEEDBACK_KEY, db=store.db("meta"))
    return json.loads(bytes(raw)) if raw else {"bins": [0] * BINS, "signals": {}}


def forget_cursor(txn: lmdb.Transaction, store: Store) -> None:
    """Removes the view's cursor so a disabled view does not hold retention back."""
    txn.delete(CURSOR_KEY, db=store.db("meta"))
