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
import bisect
import functools
import gc
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import lmdb
from atlas_sidecar_client.pb import events_pb2
from google.protobuf.message import DecodeError

from sidecar import instruments as ins
from sidecar._aio import cancel_and_wait, set_threadsafe, spawn, wait_event
from sidecar.errors import StoreFullError
from sidecar.store._codec import decode_log_value, decode_u64, encode_u64
from sidecar.store._env import Store
from sidecar.store._retention import CURSOR_PREFIX
from sidecar.store._writer import StoreWriter

__all__ = [
    "BatchingLogProcessor",
    "LogProcessor",
    "ProcessorRunner",
    "ProcessorStats",
    "read_cursor",
]

#: (seq, ingest_ms, parsed Event) of one log entry; None when it does not parse
_Row = tuple[int, int, events_pb2.Event | None]

#: Per-event cost assumed for a processor before its first round is measured.
_FIRST_COST_SECONDS = 100e-6
#: Fewest events a round offers (unless fewer wait): a round's fixed cost
#: (its transaction, a processor's end_batch) is spread over at least these.
#: Also how often a processor checks its time limit.
_MIN_ROUND = 64

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
    #: seconds in this processor's rounds: its ``process`` and ``end_batch``
    #: calls and their nested transaction (not reading the log)
    busy_seconds: float = 0.0


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
        # Processors whose cursors are at most this far apart advance in
        # lockstep (the ones ahead wait), so each event is read and parsed once
        # for all of them; one further behind (added later, replaying the
        # retained log) catches up on its own without holding the others.
        self._max_lead = batch_events
        #: measured seconds per event of each processor (moving average)
        self._cost: dict[str, float] = {}
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
        self._full_logged = False

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
        self._task = spawn(self._run(), stage="store", name="processors")

    async def shutdown(self) -> None:
        task, self._task = self._task, None
        self._stopping = True
        await cancel_and_wait(task)

    def _on_commit(self, last_seq: int) -> None:
        set_threadsafe(self._loop, self._wakeup)

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
            except StoreFullError as exc:
                # Expected until space returns (StoreHealth reports it): one
                # line per full spell, not a traceback every retry.
                if not self._full_logged:
                    log.warning("processors wait: the store is full", extra={"reason": str(exc)})
                    self._full_logged = True
                more = False
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("processor batch failed; retrying")
                more = False
                await asyncio.sleep(0.5)
            else:
                self._full_logged = False
            if not more:
                await wait_event(self._wakeup, self._tick)
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
            except StoreFullError:
                pass  # reported once by the round that met it (see _run)
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
        job: Callable[[lmdb.Transaction], tuple[bool, dict[str, tuple[int, int]]]] = self._round
        more, done = await self._writer.run(ins.carry(job))
        elapsed = time.perf_counter() - started
        self._last_round_seconds = elapsed
        for name, (_start, n) in done.items():
            self.stats[name].last_batch_seconds = elapsed
            ins.processor_batch(name, n, elapsed)
        return more

    def _round(self, txn: lmdb.Transaction) -> tuple[bool, dict[str, tuple[int, int]]]:
        # The cyclic garbage collector is paused for the round (at most a few
        # budgets long): processors allocate and free many small documents, all
        # freed by reference counting, and the collections they would set off
        # walk every young object for nothing. Measured: about 10% of the
        # processing time. Collection resumes, and catches up, after the round.
        if not gc.isenabled():
            return self._apply_all(txn)
        gc.disable()
        try:
            return self._apply_all(txn)
        finally:
            gc.enable()

    def _apply_all(self, txn: lmdb.Transaction) -> tuple[bool, dict[str, tuple[int, int]]]:
        """On the writer thread: one round of every processor within the budget.

        Processors whose cursors are close advance together: the round reads
        and parses the events once, sized from the processors' measured cost
        per event to fit the budget, and each processor takes the part it has
        not seen. Returns (more waiting, processor name -> (first seq, events
        processed)).
        """
        last = self._writer.next_seq - 1
        budget = self._budget if self._ingest_active else self._idle_budget
        deadline = time.perf_counter() + budget
        store = self._store
        cursors = {p.name: read_cursor(txn, store, p.name) for p in self._processors}
        waiting = [p for p in self._processors if cursors[p.name] <= last]
        report: dict[str, tuple[int, int]] = {}
        for st in self.stats.values():
            st.lag = 0
        groups = self._groups(waiting, cursors)
        for i, group in enumerate(groups):
            # split what is left of the budget among the groups still to run
            share = max((deadline - time.perf_counter()) / (len(groups) - i), 0.001)
            costs = [self._cost.get(p.name, _FIRST_COST_SECONDS) for p in group]
            first = min(cursors[p.name] for p in group)
            n = max(min(_MIN_ROUND, self._batch), min(self._batch, int(share / sum(costs))))
            rows = self._read(txn, first, last, n)
            for proc, cost in zip(group, costs, strict=True):
                start = cursors[proc.name]
                todo = rows[bisect.bisect_left(rows, (start,)) :] if start > first else rows
                if not todo:
                    continue  # ahead of the others: waits for them to catch up
                # A wrong estimate is cut short past twice its expected time,
                # and the round past twice its budget.
                now = time.perf_counter()
                limit = min(now + max(2.0 * cost * len(todo), 0.001), deadline + budget)
                # One span per processor and round, continuing the trace of the
                # ingest batch that wrote its first event; spans the processor
                # opens (a trigger) are its children.
                with ins.log_batch_span("process.batch", start, start, processor=proc.name) as span:
                    began = time.perf_counter()
                    done = self._apply(txn, proc, todo, limit)
                    spent = time.perf_counter() - began
                    span.set_attribute("events", done)
                    end = todo[done - 1][0] if done else start - 1
                    ins.link_ingests(span, start, end)
                if done >= 8:
                    per_event = spent / done
                    old = self._cost.get(proc.name)
                    self._cost[proc.name] = per_event if old is None else (old + per_event) / 2
                cursors[proc.name] = end + 1
                st = self.stats[proc.name]
                st.batches += 1
                st.busy_seconds += spent
                report[proc.name] = (start, done)
        more = False
        for p in waiting:
            lag = max(0, last - cursors[p.name] + 1)
            self.stats[p.name].lag = lag
            more = more or lag > 0
        return more, report

    def _groups(
        self, waiting: list[LogProcessor], cursors: dict[str, int]
    ) -> list[list[LogProcessor]]:
        """Waiting processors in groups of close cursors (each in the given order)."""
        groups: list[list[LogProcessor]] = []
        lo = 0
        for proc in sorted(waiting, key=lambda p: cursors[p.name]):
            c = cursors[proc.name]
            if groups and c - lo <= self._max_lead:
                groups[-1].append(proc)
            else:
                groups.append([proc])
                lo = c
        order = {p.name: i for i, p in enumerate(self._processors)}
        for g in groups:
            g.sort(key=lambda p: order[p.name])
        return groups

    def _read(self, txn: lmdb.Transaction, first: int, last: int, n: int) -> list[_Row]:
        """Up to ``n`` log entries from ``first`` on, not past ``last`` (the last
        committed one), parsed."""
        rows: list[_Row] = []
        append = rows.append
        with txn.cursor(db=self._store.db("events")) as cur:
            if not cur.set_range(encode_u64(first)):
                return rows
            for key, value in cur:
                seq = decode_u64(key)
                if seq > last:
                    break
                ingest_ms, payload = decode_log_value(value)
                append((seq, ingest_ms, _parse(payload)))
                if len(rows) >= n:
                    break
        return rows

    def _apply(
        self, txn: lmdb.Transaction, proc: LogProcessor, rows: list[_Row], deadline: float
    ) -> int:
        """Processes ``rows`` (from the processor's cursor on) until they end or
        ``deadline`` passes, then advances the cursor in the same transaction.
        Returns how many were processed (or dead-lettered).

        Only committed events are in ``rows``: this job may share a group commit
        with an ingest batch that is not durable, nor acked, yet.
        """
        st = self.stats[proc.name]
        end_batch: Callable[[lmdb.Transaction], None] | None = getattr(proc, "end_batch", None)
        env = self._store.env
        clock = time.perf_counter
        process = proc.process
        done = 0
        child = env.begin(write=True, parent=txn)
        try:
            for seq, ingest_ms, event in rows:
                process(child, seq, ingest_ms, event or _unparsed(seq))
                done += 1
                if done % _MIN_ROUND == 0 and clock() > deadline:
                    break
            if end_batch is not None:
                end_batch(child)
            child.commit()
            st.processed += done
        except lmdb.MapFullError:
            child.abort()
            raise
        except Exception:
            child.abort()
            # isolate the bad event(s): one nested transaction per event
            batch = rows[: done + 1]
            done = 0
            for seq, ingest_ms, event in batch:
                one = env.begin(write=True, parent=txn)
                try:
                    process(one, seq, ingest_ms, event or _unparsed(seq))
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
                if done % _MIN_ROUND == 0 and clock() > deadline:
                    break
            # the events after the bad one are left to the next round
        last_done = rows[done - 1][0]
        txn.put(
            CURSOR_PREFIX + proc.name.encode(), encode_u64(last_done + 1), db=self._store.db("meta")
        )
        return done

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
                name: {
                    "processed": st.processed,
                    "dead_lettered": st.dead_lettered,
                    "lag": st.lag,
                    "busy_seconds": round(st.busy_seconds, 3),
                }
                for name, st in self.stats.items()
            },
        }


def _tick(proc: LogProcessor, txn: lmdb.Transaction, now_ms: int) -> None:
    proc.tick(txn, now_ms)


def _parse(payload: bytes) -> events_pb2.Event | None:
    ev = events_pb2.Event()
    try:
        ev.ParseFromString(payload)
    except DecodeError:
        return None  # dead-lettered by every processor
    return ev


def _unparsed(seq: int) -> events_pb2.Event:
    raise ValueError(f"log entry {seq} is not a valid Event")
