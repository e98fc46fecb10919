"""Processors: stages that read the event log through a durable cursor.

A processor's ``process`` runs on the writer thread inside the same
transaction that advances its cursor (``meta`` key ``cursor/<name>``), so a
crash at any point replays to the same state: either the event's effects and
the cursor move are both committed, or neither is.

An event that makes ``process`` raise is dead-lettered (stored in
``dead_letters`` with the processor name and the reason, counted) and the
processor goes on with the next event.

A processor may also define ``end_batch(txn)`` (:class:`BatchingLogProcessor`):
the runner calls it after the last ``process`` of a batch, in the same
transaction, before that transaction commits. A processor that keeps running
totals in memory during a batch writes them there, once per batch instead of
once per event. When a batch fails, its transaction is aborted without
``end_batch`` and the events are retried one by one, each in a transaction
of its own that ends with ``end_batch``; so a processor must discard any
state it accumulated for a transaction that never reached ``end_batch``
(keying that state to the transaction object does it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import lmdb
from atlas_sidecar_client.pb import events_pb2

from sidecar._aio import cancel_and_wait
from sidecar.store._codec import decode_log_value, decode_u64, encode_u64
from sidecar.store._env import Store
from sidecar.store._retention import CURSOR_PREFIX
from sidecar.store._writer import StoreWriter
from sidecar.telemetry import instruments as ins

__all__ = [
    "BatchingLogProcessor",
    "LogProcessor",
    "ProcessorRunner",
    "ProcessorStats",
    "read_cursor",
]

#: (seq, ingest_ms, serialized Event) of one log entry
_Row = tuple[int, int, bytes]

log = logging.getLogger(__name__)


class LogProcessor(Protocol):
    """One consumer of the event log.

    ``name`` keys its cursor; keep it stable. ``process`` gets the event's
    sequence number, ingest time and the parsed Event; the Event object is
    shared with the other processors, so it must not be modified. ``tick``
    runs periodically (for time-based work such as reward windows) in its own
    transaction. Both run on the writer thread: no blocking I/O.
    """

    name: str

    def process(
        self, txn: lmdb.Transaction, seq: int, ingest_ms: int, event: events_pb2.Event
    ) -> None: ...

    def tick(self, txn: lmdb.Transaction, now_ms: int) -> None: ...


class BatchingLogProcessor(LogProcessor, Protocol):
    """A processor that writes what it accumulated in memory once per batch.

    ``end_batch(txn)`` runs after the batch's last ``process``, in the same
    transaction, before it commits (see the module docstring for the failure
    path). ``tick`` must flush its own writes before it returns.
    """

    def end_batch(self, txn: lmdb.Transaction) -> None: ...


@dataclass(slots=True)
class ProcessorStats:
    processed: int = 0
    dead_lettered: int = 0
    batches: int = 0
    lag: int = 0
    last_batch_seconds: float = 0.0


def read_cursor(txn: lmdb.Transaction, store: Store, name: str) -> int:
    """Next sequence number ``name`` will read (1 when it never ran)."""
    raw = txn.get(CURSOR_PREFIX + name.encode(), db=store.db("meta"))
    return decode_u64(raw) if raw else 1


class ProcessorRunner:
    """Feeds the log to processors in batches, after each commit and on a timer.

    Processors run in the order given; each has its own cursor, so a
    processor added later starts from the beginning of the retained log.
    """

    def __init__(
        self,
        store: Store,
        writer: StoreWriter,
        processors: Sequence[LogProcessor],
        *,
        batch_events: int = 2000,
        tick_seconds: float = 1.0,
        job_budget_seconds: float = 0.005,
        idle_budget_seconds: float = 0.05,
        min_interval_seconds: float = 0.05,
        max_duty: float = 0.25,
    ) -> None:
        self._store = store
        self._writer = writer
        self._processors = list(processors)
        self._batch = batch_events
        self._tick = tick_seconds
        # One writer job holds the writer (and every ingest ack behind it) for
        # at most this long; a backlog is worked off in several such jobs.
        # Measured at 10,000 events/s: 20 ms gave an ack p99 of 74 ms, 5 ms of
        # 37 ms, for about 15% less processing throughput. Acks come first.
        self._budget = job_budget_seconds
        # With no ingest to hold up, a round may run longer: fewer rounds, less
        # fixed cost per round, a backlog drained sooner.
        self._idle_budget = max(job_budget_seconds, idle_budget_seconds)
        # After catching up, wait at least this long before the next round so
        # that many small commits are processed in one job, not one job each.
        self._min_interval = min_interval_seconds
        # While behind and events are arriving, processors use at most this
        # share of the writer's time, so ingest is acked first and learning
        # catches up after. Measured at 10,000 events/s: 0.5 gave an ack p99
        # of 37 ms, 0.25 of 26 ms. With no ingest they run at full speed.
        self._max_duty = max_duty
        self._last_round_seconds = 0.0
        # Whether events were stored since the previous round (ingest active).
        self._ingest_active = False
        self._events_at_last_round = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stats = {p.name: ProcessorStats() for p in self._processors}
        self._stopping = False

    def add(self, processor: LogProcessor) -> None:
        if self._task is not None:
            raise RuntimeError("add processors before start()")
        self._processors.append(processor)
        self.stats[processor.name] = ProcessorStats()

    async def start(self) -> None:
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._writer.add_commit_listener(self._on_commit)
        self._task = asyncio.create_task(self._run(), name="processors")

    async def shutdown(self) -> None:
        task, self._task = self._task, None
        self._stopping = True
        await cancel_and_wait(task)

    def _on_commit(self, last_seq: int) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wakeup.set)

    async def wait_idle(self, timeout: float = 30.0) -> None:
        """Waits until every processor has caught up with the log (tests, demo)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.caught_up():
                return
            self._wakeup.set()
            await asyncio.sleep(0.02)
        raise TimeoutError("processors did not catch up")

    async def caught_up(self) -> bool:
        last = self._writer.next_seq - 1
        with self._store.read() as txn:
            return all(read_cursor(txn, self._store, p.name) > last for p in self._processors)

    async def _run(self) -> None:
        next_tick = time.monotonic()
        while not self._stopping:
            try:
                more = await self.run_once()
                if time.monotonic() >= next_tick:
                    await self.tick_all()
                    next_tick = time.monotonic() + self._tick
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("processor batch failed; retrying")
                more = False
                await asyncio.sleep(0.5)
            if not more:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                # cancellation that races with the wakeup, and shutdown would hang.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._tick):
                        await self._wakeup.wait()
                self._wakeup.clear()
                await asyncio.sleep(self._min_interval)
            else:
                # Behind. While events are arriving, leave the writer to ingest
                # for a while (duty cycle); when ingest is quiet, catch up at
                # full speed.
                if self._ingest_active:
                    await asyncio.sleep(self._last_round_seconds * (1.0 / self._max_duty - 1.0))
                else:
                    await asyncio.sleep(0)

    async def tick_all(self, now_ms: int | None = None) -> None:
        """Runs every processor's ``tick`` (each in its own nested transaction)."""
        now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        for proc in self._processors:
            try:
                await self._writer.run(functools.partial(_tick, proc, now_ms=now))
            except Exception:
                log.exception("processor tick failed", extra={"processor": proc.name})

    async def run_once(self) -> bool:
        """Runs one time-boxed round of every processor in a single writer job.

        Returns True when events are still waiting (the round ran out of its
        batch size or its time budget).
        """
        last = self._writer.next_seq - 1
        with self._store.read() as txn:
            first = min(
                (read_cursor(txn, self._store, p.name) for p in self._processors), default=last + 1
            )
        if first > last:
            for st in self.stats.values():
                st.lag = 0
            return False
        events = self._writer.stats.events
        self._ingest_active = events != self._events_at_last_round
        self._events_at_last_round = events
        started = time.perf_counter()
        job: Callable[[lmdb.Transaction], tuple[bool, dict[str, tuple[int, int]]]] = self._apply_all
        more, done = await self._writer.run(ins.carry(job))
        elapsed = time.perf_counter() - started
        self._last_round_seconds = elapsed
        for name, (_start, n) in done.items():
            self.stats[name].last_batch_seconds = elapsed
            ins.processor_batch(name, n, elapsed)
        return more

    def _apply_all(self, txn: lmdb.Transaction) -> tuple[bool, dict[str, tuple[int, int]]]:
        """On the writer thread: each processor takes its share of the budget.

        Returns (more waiting, processor name -> (first seq, events processed)).
        """
        last = self._writer.next_seq - 1
        budget = self._budget if self._ingest_active else self._idle_budget
        deadline = time.perf_counter() + budget
        more = False
        waiting = [p for p in self._processors if read_cursor(txn, self._store, p.name) <= last]
        report: dict[str, tuple[int, int]] = {}
        for st in self.stats.values():
            st.lag = 0
        # Processors usually sit at the same cursor: the events they read are
        # parsed once and shared for this round (seq -> Event).
        parsed: dict[int, events_pb2.Event] = {}
        for i, proc in enumerate(waiting):
            # split what is left of the budget among the processors still to run
            share = (deadline - time.perf_counter()) / (len(waiting) - i)
            start = read_cursor(txn, self._store, proc.name)
            # One span per processor and round, continuing the trace of the
            # ingest batch that wrote its first event; spans the processor
            # opens (a trigger) are its children.
            with ins.log_batch_span("process.batch", start, start, processor=proc.name) as span:
                done, exhausted = self._apply(
                    txn, proc, start, time.perf_counter() + max(share, 0.001), parsed, last
                )
                span.set_attribute("events", done)
                ins.link_ingests(span, start, start + done - 1)
            st = self.stats[proc.name]
            st.batches += 1
            st.lag = max(0, last - (start + done) + 1)
            more = more or exhausted
            report[proc.name] = (start, done)
        return more, report

    def _apply(
        self,
        txn: lmdb.Transaction,
        proc: LogProcessor,
        start: int,
        deadline: float,
        parsed: dict[int, events_pb2.Event] | None = None,
        last: int | None = None,
    ) -> tuple[int, bool]:
        """Processes events from ``start`` until the batch size or ``deadline``, then
        advances the cursor in the same transaction. Returns (processed, cut short).

        Only committed events (``seq <= last``) are processed: this job may share
        a group commit with an ingest batch that is not durable, nor acked, yet.
        """
        st = self.stats[proc.name]
        end_batch: Callable[[lmdb.Transaction], None] | None = getattr(proc, "end_batch", None)
        env = self._store.env
        clock = time.perf_counter
        limit = self._batch
        # The log is read as it is processed, not a batch ahead: a round's
        # time budget often ends the batch after a few dozen events.
        rows: list[_Row] = []
        more = False
        child = env.begin(write=True, parent=txn)
        try:
            with child.cursor(db=self._store.db("events")) as cur:
                more = cur.set_range(encode_u64(start))
                while more and len(rows) < limit:
                    key, value = cur.item()
                    seq = decode_u64(key)
                    if last is not None and seq > last:
                        more = False
                        break
                    ingest_ms, payload = decode_log_value(value)
                    rows.append((seq, ingest_ms, payload))
                    proc.process(child, seq, ingest_ms, _event(parsed, seq, payload))
                    more = cur.next()
                    if len(rows) % 64 == 0 and clock() > deadline:
                        break
            if not rows:
                child.abort()
                return 0, False
            if end_batch is not None:
                end_batch(child)
            child.commit()
            done = len(rows)
            st.processed += done
        except lmdb.MapFullError:
            child.abort()
            raise
        except Exception:
            child.abort()
            # isolate the bad event(s): one nested transaction per event
            done = 0
            for seq, ingest_ms, payload in rows:
                one = env.begin(write=True, parent=txn)
                try:
                    proc.process(one, seq, ingest_ms, _event(parsed, seq, payload))
                    if end_batch is not None:
                        end_batch(one)
                    one.commit()
                    st.processed += 1
                except lmdb.MapFullError:
                    one.abort()
                    raise
                except Exception as exc:
                    one.abort()
                    self._dead_letter(txn, proc.name, seq, exc)
                    st.dead_lettered += 1
                done += 1
                if done % 64 == 0 and clock() > deadline:
                    break
            # the events after the bad one are left to the next round
            more = True
        last_done = rows[done - 1][0]
        txn.put(
            CURSOR_PREFIX + proc.name.encode(), encode_u64(last_done + 1), db=self._store.db("meta")
        )
        return done, more or done < len(rows)

    def _dead_letter(self, txn: lmdb.Transaction, name: str, seq: int, exc: Exception) -> None:
        key = name.encode() + b"/" + encode_u64(seq)
        doc = {
            "processor": name,
            "seq": seq,
            "error": f"{type(exc).__name__}: {exc}",
            "at_ms": time.time_ns() // 1_000_000,
        }
        txn.put(key, json.dumps(doc).encode(), db=self._store.db("dead_letters"))
        log.warning("event dead-lettered", extra={"processor": name, "seq": seq, "error": str(exc)})

    def status(self) -> dict[str, object]:
        with self._store.read() as txn:
            dead = int(txn.stat(self._store.db("dead_letters"))["entries"])
        return {
            "dead_letters": dead,
            "processors": {
                name: {"processed": st.processed, "dead_lettered": st.dead_lettered, "lag": st.lag}
                for name, st in self.stats.items()
            },
        }


def _tick(proc: LogProcessor, txn: lmdb.Transaction, now_ms: int) -> None:
    proc.tick(txn, now_ms)


def _event(
    parsed: dict[int, events_pb2.Event] | None, seq: int, payload: bytes
) -> events_pb2.Event:
    """The parsed event, parsed once per round for all processors."""
    if parsed is None:
        return _parse(payload)
    ev = parsed.get(seq)
    if ev is None:
        ev = parsed[seq] = _parse(payload)
    return ev


def _parse(payload: bytes) -> events_pb2.Event:
    ev = events_pb2.Event()
    ev.ParseFromString(payload)
    return ev
