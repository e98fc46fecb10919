"""The writer thread: the only owner of LMDB write transactions.

Work arrives as jobs (ingest batches, or functions of a transaction from
other stages). The thread takes every queued job, up to a size, into one
transaction (group commit), commits it with fsync, and only then resolves the
jobs' futures: a future that resolves means the data is durable.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import lmdb

from sidecar._compiled import RowBuilder, row_builder
from sidecar.config import StoreConfig
from sidecar.errors import StoreError, StoreFullError
from sidecar.store._codec import CURSOR_PREFIX, decode_u64, encode_u64
from sidecar.store._env import CORRUPTION_ERRORS, Store

__all__ = ["IngestResult", "StoreWriter", "WriterStats", "append_rows"]

log = logging.getLogger(__name__)

T = TypeVar("T")

COUNTER_ACCEPTED = b"counter/events_accepted"
COUNTER_DUPLICATES = b"counter/events_duplicates"
COUNTER_REJECTED = b"counter/events_rejected"


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What one ingest batch did, once durable."""

    accepted: int
    duplicates: int
    first_seq: int
    last_seq: int


@dataclass(slots=True)
class WriterStats:
    commits: int = 0
    events: int = 0
    last_commit_seconds: float = 0.0
    failed_commits: int = 0
    #: commits that failed because the disk or the map was full
    full_commits: int = 0
    map_grows: int = 0
    counters: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _IngestJob:
    """An ingest batch. When its future is an asyncio future, the writer hands
    every such result of one commit to that future's loop in a single
    ``call_soon_threadsafe`` (one wake-up per commit, not one per batch)."""

    items: Sequence[tuple[bytes, bytes]]
    rejected: int
    future: concurrent.futures.Future[IngestResult] | asyncio.Future[IngestResult]
    on_commit: Callable[[IngestResult], None] | None = None

    @property
    def weight(self) -> int:
        return max(1, len(self.items))


@dataclass(slots=True)
class _FnJob:
    fn: Callable[[lmdb.Transaction], Any]
    future: concurrent.futures.Future[Any]
    weight: int = 1


_Job = _IngestJob | _FnJob


def _deliver(pairs: list[tuple[asyncio.Future[Any], Any]]) -> None:
    """On the event loop: resolves the futures of one commit (or failure)."""
    for fut, value in pairs:
        if fut.done():  # the caller gave up (cancelled)
            continue
        if isinstance(value, BaseException):
            fut.set_exception(value)
        else:
            fut.set_result(value)


def _claim(job: _Job) -> bool:
    """Whether a job is still wanted; a concurrent future can then no longer
    be cancelled. An asyncio future cancelled off this thread may still be
    written: its events are stored, unacked, and a resend is deduplicated."""
    fut = job.future
    if isinstance(fut, concurrent.futures.Future):
        return fut.set_running_or_notify_cancel()
    return not fut.cancelled()


class StoreWriter:
    """Serializes every write of the process through one thread.

    ``submit_events`` and ``submit`` never block the caller; await the result
    (``asyncio``) or call ``.result()`` (threads). Results resolve only after
    the transaction holding them is committed. A job that fails (disk full, a
    map that cannot grow) fails alone with :class:`StoreFullError`; nothing of
    it is written.
    """

    def __init__(self, store: Store, config: StoreConfig) -> None:
        self._store = store
        self._config = config
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._next_seq = 1
        self._listeners: list[Callable[[int], None]] = []
        self._stopping = False
        self._rows: RowBuilder = row_builder() or append_rows
        self._loop: asyncio.AbstractEventLoop | None = None
        self._full_event: asyncio.Event | None = None
        #: the last "store full" failure, until :meth:`clear_full`
        self.full: StoreFullError | None = None
        self.stats = WriterStats()

    # -- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        if self._thread is not None:
            return
        with self._store.read() as txn:
            cur = txn.cursor(db=self._store.db("events"))
            self._next_seq = decode_u64(cur.key()) + 1 if cur.last() else 1
            meta = self._store.db("meta")
            # Retention may have trimmed the whole log up to the processors'
            # cursors; numbering again from 1 would put new events behind
            # them, unread.
            with txn.cursor(db=meta) as mcur:
                if mcur.set_range(CURSOR_PREFIX):
                    for key, value in mcur:
                        if not bytes(key).startswith(CURSOR_PREFIX):
                            break
                        if len(value) == 8:
                            self._next_seq = max(self._next_seq, decode_u64(value))
            for name, key in (
                ("accepted", COUNTER_ACCEPTED),
                ("duplicates", COUNTER_DUPLICATES),
                ("rejected", COUNTER_REJECTED),
            ):
                raw = txn.get(key, db=meta)
                self.stats.counters[name] = decode_u64(raw) if raw else 0
        self._stopping = False
        self._loop = asyncio.get_running_loop()
        self._full_event = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Commits everything queued so far, then stops. Safe before start and twice."""
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._queue.put(None)
        await asyncio.get_running_loop().run_in_executor(None, thread.join)
        self._thread = None

    @property
    def queue_depth(self) -> int:
        """Jobs waiting for the writer thread (a gauge for telemetry)."""
        return self._queue.qsize()

    @property
    def next_seq(self) -> int:
        """Sequence number the next stored event will get."""
        return self._next_seq

    async def wait_full(self) -> StoreFullError:
        """Returns once a commit has failed for a full disk or map (at once
        when one has since the last :meth:`clear_full`). Call after start."""
        if self._full_event is None:
            raise StoreError("store writer is not running")
        await self._full_event.wait()
        return self.full or StoreFullError("store is full")

    def clear_full(self) -> None:
        """Forgets the last "full" failure; the next one is reported anew."""
        self.full = None
        if self._full_event is not None:
            self._full_event.clear()

    def _set_full(self, exc: StoreFullError) -> None:
        """On the writer thread: records the failure and wakes ``wait_full``."""
        self.stats.full_commits += 1
        self.full = exc
        if self._loop is not None and self._full_event is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self._loop.call_soon_threadsafe(self._full_event.set)

    def add_commit_listener(self, listener: Callable[[int], None]) -> None:
        """Calls ``listener(last_seq)`` on the writer thread after each commit that
        stored events. It must be quick and must not raise (use
        ``loop.call_soon_threadsafe`` to hand over to asyncio)."""
        self._listeners.append(listener)

    # -- submission ------------------------------------------------------

    def submit_events(
        self,
        items: Sequence[tuple[bytes, bytes]],
        rejected: int = 0,
        on_commit: Callable[[IngestResult], None] | None = None,
    ) -> concurrent.futures.Future[IngestResult]:
        """Queues (event_id, serialized Event) pairs for dedupe and append.

        ``on_commit(result)`` runs on the writer thread right after the commit,
        before any later job can see the events (telemetry records which trace
        wrote which sequence numbers there). It must be quick and not raise.
        """
        fut: concurrent.futures.Future[IngestResult] = concurrent.futures.Future()
        self._put(_IngestJob(items, rejected, fut, on_commit))
        return fut

    def submit_events_async(
        self,
        items: Sequence[tuple[bytes, bytes]],
        rejected: int = 0,
        on_commit: Callable[[IngestResult], None] | None = None,
    ) -> asyncio.Future[IngestResult]:
        """``submit_events`` for a caller on the running event loop: the result
        comes back as an asyncio future, resolved together with the other
        batches of its commit in one hand-over to the loop."""
        fut: asyncio.Future[IngestResult] = asyncio.get_running_loop().create_future()
        self._put(_IngestJob(items, rejected, fut, on_commit))
        return fut

    def submit(self, fn: Callable[[lmdb.Transaction], T]) -> concurrent.futures.Future[T]:
        """Runs ``fn(txn)`` on the writer thread in a nested transaction.

        If ``fn`` raises, only its own changes are discarded and the future
        carries the exception; other jobs in the same group commit are kept.
        """
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._put(_FnJob(fn, fut))
        return fut

    async def run(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """``submit`` for asyncio callers."""
        return await asyncio.wrap_future(self.submit(fn))

    def _put(self, job: _Job) -> None:
        if self._thread is None or self._stopping:
            job.future.set_exception(StoreError("store writer is not running"))
            return
        self._queue.put(job)

    # -- the thread ------------------------------------------------------

    def _run(self) -> None:
        max_events = self._config.commit_max_events
        window = self._config.commit_window_ms / 1000.0
        carry: _Job | None = None
        stop = False
        while not stop:
            job = carry if carry is not None else self._queue.get()
            carry = None
            if job is None:
                break
            jobs: list[_Job] = [job]
            weight = job.weight
            deadline = time.monotonic() + window
            while weight < max_events:
                try:
                    remaining = deadline - time.monotonic()
                    nxt = (
                        self._queue.get(timeout=remaining)
                        if remaining > 0
                        else self._queue.get_nowait()
                    )
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                if weight + nxt.weight > max_events and weight > 0:
                    carry = nxt
                    break
                jobs.append(nxt)
                weight += nxt.weight
            try:
                self._commit(jobs)
            except BaseException as exc:  # never let the only writer thread die
                log.exception("store writer: commit failed unexpectedly")
                self._fail(jobs, StoreError(f"store write failed: {exc}"))
        # Drain whatever was queued before the stop marker.
        leftover: list[_Job] = []
        if carry is not None:
            leftover.append(carry)
        while True:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is not None:
                leftover.append(nxt)
        if leftover:
            self._commit(leftover)

    def _commit(self, jobs: list[_Job]) -> None:
        # A caller that gave up (its asyncio task was cancelled) cancels the
        # future; claim the others so they can no longer be cancelled.
        jobs = [job for job in jobs if _claim(job)]
        if not jobs:
            return
        started = time.perf_counter()
        while True:
            try:
                results, next_seq, counts = self._apply(jobs)
                break
            except lmdb.MapFullError:
                if self._store.grow():
                    self.stats.map_grows += 1
                    continue
                self._fail(
                    jobs,
                    StoreFullError(
                        "store map is full and cannot grow past "
                        f"store.map_size_max_bytes={self._config.map_size_max_bytes}"
                    ),
                )
                return
            except lmdb.Error as exc:
                self._fail(jobs, self._translate(exc, jobs))
                return
            except StoreError as exc:  # the store found a damaged page
                self._fail(jobs, exc)
                return
            except Exception as exc:  # a bug: fail the jobs, keep the thread alive
                log.exception("store writer: unexpected error")
                self._fail(jobs, StoreError(f"store write failed: {exc}"))
                return
        stored = next_seq - self._next_seq
        self._next_seq = next_seq
        st = self.stats
        st.commits += 1
        st.events += stored
        st.last_commit_seconds = time.perf_counter() - started
        for name, value in counts.items():
            st.counters[name] = st.counters.get(name, 0) + value
        for job, result in zip(jobs, results, strict=True):
            if isinstance(job, _IngestJob) and job.on_commit is not None:
                try:
                    job.on_commit(result)
                except Exception:
                    log.exception("store writer: on_commit hook failed")
        self._resolve(jobs, results)
        if stored:
            for listener in self._listeners:
                try:
                    listener(next_seq - 1)
                except Exception:
                    log.exception("store writer: commit listener failed")

    def _fail(self, jobs: list[_Job], exc: Exception) -> None:
        self.stats.failed_commits += 1
        if isinstance(exc, StoreFullError):
            self._set_full(exc)
        self._resolve(jobs, [exc] * len(jobs))

    def _translate(self, exc: lmdb.Error, jobs: list[_Job]) -> StoreError:
        """The store's error for a failed commit. A failed commit is aborted
        whole and leaves the environment usable, unless LMDB could not
        update its meta page: it then refuses every later transaction
        (MDB_PANIC), and that, like a damaged page, is fatal."""
        if isinstance(exc, CORRUPTION_ERRORS):
            return self._store.fatal(exc, "commit")
        code = getattr(exc, "code", None)
        text = str(exc)
        if isinstance(exc, lmdb.DiskError) or code in (errno.ENOSPC, errno.EDQUOT):
            return StoreFullError(f"disk full while committing to the store: {text}")
        if isinstance(exc, lmdb.MapFullError):
            return StoreFullError(f"store map is full: {text}")
        if code == errno.EIO:
            # LMDB turns a short write into EIO: the file system took part
            # of the pages, then ran out (mdb.c, mdb_page_flush). So EIO on a
            # nearly full disk is a full disk; on a roomy one, a real I/O error.
            free = _free_bytes(self._store.data_dir)
            need = self._config.min_free_bytes + sum(
                sum(len(k) + len(v) for k, v in job.items)
                for job in jobs
                if isinstance(job, _IngestJob)
            )
            if free is not None and free < need:
                return StoreFullError(
                    f"disk full while committing to the store: {free} bytes free "
                    f"(under store.min_free_bytes={self._config.min_free_bytes} plus the "
                    f"batch): {text}"
                )
        return StoreError(f"store commit failed: {text}")

    def _resolve(self, jobs: list[_Job], results: list[Any]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
        for job, result in zip(jobs, results, strict=True):
            fut = job.future
            if isinstance(fut, asyncio.Future):
                by_loop.setdefault(fut.get_loop(), []).append((fut, result))
            elif not fut.done():
                with contextlib.suppress(Exception):  # cancelled or resolved meanwhile
                    if isinstance(result, BaseException):
                        fut.set_exception(result)
                    else:
                        fut.set_result(result)
        for loop, pairs in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_deliver, pairs)

    def _apply(self, jobs: list[_Job]) -> tuple[list[Any], int, dict[str, int]]:
        store = self._store
        events_db = store.db("events")
        ids_db = store.db("event_ids")
        meta = store.db("meta")
        seq = self._next_seq
        now_ms = time.time_ns() // 1_000_000
        results: list[Any] = []
        accepted_total = dup_total = rejected_total = 0
        with store.write_txn() as txn:
            for job in jobs:
                if isinstance(job, _IngestJob):
                    first = seq
                    seq, dups = _append_events(
                        txn, ids_db, events_db, job.items, seq, now_ms, self._rows
                    )
                    accepted = seq - first
                    accepted_total += accepted
                    dup_total += dups
                    rejected_total += job.rejected
                    results.append(IngestResult(accepted, dups, first, seq - 1))
                else:
                    child = store.env.begin(write=True, parent=txn)
                    try:
                        value = job.fn(child)
                    except lmdb.MapFullError:
                        child.abort()
                        raise
                    except Exception as exc:
                        child.abort()
                        results.append(exc)
                    else:
                        child.commit()
                        results.append(value)
            counts = {
                "accepted": accepted_total,
                "duplicates": dup_total,
                "rejected": rejected_total,
            }
            if accepted_total or dup_total or rejected_total:
                for key, name in (
                    (COUNTER_ACCEPTED, "accepted"),
                    (COUNTER_DUPLICATES, "duplicates"),
                    (COUNTER_REJECTED, "rejected"),
                ):
                    if counts[name]:
                        raw = txn.get(key, db=meta)
                        old = decode_u64(raw) if raw else 0
                        txn.put(key, encode_u64(old + counts[name]), db=meta)
        return results, seq, counts


def append_rows(
    items: Sequence[tuple[bytes, bytes]], seq: int, now_ms: int
) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
    """The dedupe rows (event_id -> seq + ingest ms) and the log rows
    (seq -> ingest ms + event) of ``items`` numbered from ``seq``. The
    compiled builder (``sidecar/_fastpath.c``) gives the same rows."""
    now = encode_u64(now_ms)
    id_rows = [(eid, encode_u64(seq + i) + now) for i, (eid, _) in enumerate(items)]
    log_rows = [(encode_u64(seq + i), now + payload) for i, (_, payload) in enumerate(items)]
    return id_rows, log_rows


def _append_events(
    txn: lmdb.Transaction,
    ids_db: Any,
    events_db: Any,
    items: Sequence[tuple[bytes, bytes]],
    seq: int,
    now_ms: int,
    rows: RowBuilder = append_rows,
) -> tuple[int, int]:
    """Dedupes ``items`` by event id and appends the new ones to the log.

    Returns (next seq, duplicates). The common case, no duplicate, costs one
    ``putmulti`` per database. When some id already existed, ``putmulti``
    still added every new one; those are told apart by the value just
    written (it names the tentative seq), renumbered without gaps, and only
    then appended.
    """
    if not items:
        return seq, 0
    try:
        id_rows, log_rows = rows(items, seq, now_ms)
    except TypeError:  # the compiled builder takes (bytes, bytes) tuples only
        id_rows, log_rows = append_rows(items, seq, now_ms)
    with txn.cursor(db=ids_db) as cur:
        _consumed, added = cur.putmulti(id_rows, overwrite=False)
    if added == len(items):
        with txn.cursor(db=events_db) as cur:
            cur.putmulti(log_rows, append=True)
        return seq + len(items), 0
    now = encode_u64(now_ms)
    log_rows = []
    seen: set[bytes] = set()
    next_seq = seq
    for (eid, payload), (_, tentative) in zip(items, id_rows, strict=True):
        if eid in seen or txn.get(eid, db=ids_db) != tentative:
            continue  # stored before this batch, or earlier in this batch
        seen.add(eid)
        if tentative[:8] != encode_u64(next_seq):  # a duplicate before it shifted its seq
            txn.put(eid, encode_u64(next_seq) + now, db=ids_db)
        log_rows.append((encode_u64(next_seq), now + payload))
        next_seq += 1
    if log_rows:
        with txn.cursor(db=events_db) as cur:
            cur.putmulti(log_rows, append=True)
    return next_seq, len(items) - len(log_rows)


def _free_bytes(path: Any) -> int | None:
    """Free bytes for unprivileged writers on ``path``'s file system."""
    try:
        return int(shutil.disk_usage(path).free)
    except OSError:
        return None
