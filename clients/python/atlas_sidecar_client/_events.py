"""EventStream: fire-and-forget event delivery to the sidecar."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import grpc

from atlas_sidecar_client._channel import TOKEN_ENV, ChannelSecurity, open_channel
from atlas_sidecar_client._ids import uuid7
from atlas_sidecar_client._proto.atlas.sidecar.v1 import events_pb2, ingest_pb2_grpc

__all__ = ["DropPolicy", "EventStream", "EventStreamStats"]

log = logging.getLogger(__name__)

DropPolicy = Literal["drop_newest", "drop_oldest"]

#: The sidecar's default ``ingest.max_events_per_batch``: a larger batch is
#: refused whole, so batches are never cut larger than this.
MAX_EVENTS_PER_BATCH = 10_000

#: gRPC codes after which the sender reconnects and resends; anything else but
#: INVALID_ARGUMENT is also retried (the sidecar dedupes), but logged as
#: unexpected. INVALID_ARGUMENT refuses the batch itself, for good: it is
#: counted in ``rejected`` and ``rejected_batches`` and dropped, never resent.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)

#: Codes that mean this client may not send: logged once, retried slowly.
REFUSED = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})

_INF = 0
_FB = 1
_RAW = 2
_END = object()


@dataclass
class EventStreamStats:
    """Counters since the stream was created. Read them at any time."""

    recorded: int = 0
    dropped: int = 0
    sent_batches: int = 0
    acked_events: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    #: Batches the sidecar refused whole (INVALID_ARGUMENT); their events are
    #: counted in ``rejected`` and were not resent.
    rejected_batches: int = 0
    reconnects: int = 0
    last_error: str = ""


def _attrs(target: Mapping[str, str], source: Mapping[str, str] | None) -> None:
    if source:
        target.update(source)  # type: ignore[attr-defined]


class EventStream:
    """Sends events to the sidecar without ever blocking the caller.

    ``record_inference`` and ``record_feedback`` put the event on a bounded
    in-memory queue and return its event id at once (a few microseconds).
    A background thread batches by size and linger time and streams batches
    over ``IngestService.StreamEvents``; batches stay in memory until the
    sidecar acks them as durable and are resent after a reconnect with the
    same event ids, so the sidecar stores each exactly once. When the queue is
    full the drop policy applies and ``stats.dropped`` counts it.

    A batch holds at most ``max_events_per_batch`` events (keep it at or below
    the sidecar's ``ingest.max_events_per_batch``). Rejections are permanent:
    rejected events and batches the sidecar refuses whole (INVALID_ARGUMENT)
    are counted in ``stats`` and never resent; transient failures
    (UNAVAILABLE, RESOURCE_EXHAUSTED, ...) are retried with backoff. The
    stream is opened when there is something to send, and opened again after
    the sidecar closes it for being idle.

    Works from plain threads and from asyncio (``await stream.aflush()``)::

        stream = EventStream("127.0.0.1:50051")
        stream.record_inference("req-1", "v1", prompt="hi", response="hello")
        stream.record_feedback("req-1", signal=Signal.COPY)
        stream.close()
    """

    def __init__(
        self,
        target: str,
        *,
        max_queue: int = 100_000,
        batch_size: int = 100,
        linger_ms: float = 5.0,
        max_inflight_batches: int = 256,
        max_events_per_batch: int = MAX_EVENTS_PER_BATCH,
        drop_policy: DropPolicy = "drop_newest",
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
        channel_options: Sequence[tuple[str, object]] = (),
        on_ack: Callable[[events_pb2.EventBatch, events_pb2.IngestAck], None] | None = None,
        token: str | None = None,
        security: ChannelSecurity | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if max_events_per_batch < 1:
            raise ValueError("max_events_per_batch must be >= 1")
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        if drop_policy not in ("drop_newest", "drop_oldest"):
            raise ValueError("drop_policy must be 'drop_newest' or 'drop_oldest'")
        self.target = target
        self.stats = EventStreamStats()
        self._max_queue = max_queue
        self._batch_size = min(batch_size, max_events_per_batch)
        self._linger = linger_ms / 1000.0
        self._max_inflight = max_inflight_batches
        self._drop_oldest = drop_policy == "drop_oldest"
        self._backoff = (backoff_initial, backoff_max)
        self._on_ack = on_ack
        self._queue: collections.deque[tuple[object, ...]] = collections.deque()
        self._unacked: collections.deque[events_pb2.EventBatch] = collections.deque()
        self._lock = threading.Lock()
        self._progress = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._outbox: _Outbox | None = None
        sec = security if security is not None else ChannelSecurity()
        if token is not None:
            sec = dataclasses.replace(sec, token=token)
        self._channel = open_channel(target, sec, options=list(channel_options))
        self._refused_logged = False
        self._stub = ingest_pb2_grpc.IngestServiceStub(self._channel)
        self._call: grpc.Future | None = None
        self._sender = threading.Thread(
            target=self._send_loop, name="atlas-events-batcher", daemon=True
        )
        self._conn = threading.Thread(
            target=self._conn_loop, name="atlas-events-stream", daemon=True
        )
        self._sender.start()
        self._conn.start()

    # -- the caller's side (hot path) -------------------------------------

    def _enqueue(self, item: tuple[object, ...]) -> None:
        q = self._queue
        self.stats.recorded += 1
        if len(q) >= self._max_queue:
            self.stats.dropped += 1
            if not self._drop_oldest:
                return
            with contextlib.suppress(IndexError):
                q.popleft()
        q.append(item)
        if len(q) % self._batch_size == 0:
            self._wake.set()

    def record_inference(
        self,
        request_id: str,
        model_version: str,
        prompt: str = "",
        response: str = "",
        *,
        latency_ms: float = 0.0,
        role: int = events_pb2.PRIMARY,
        error: bool = False,
        error_code: str = "",
        token_logprobs: Sequence[float] = (),
        session_id: str = "",
        user_id: str = "",
        retry_of: str = "",
        attributes: Mapping[str, str] | None = None,
    ) -> str:
        """Queues an Inference event; returns its event id. Never blocks."""
        event_id = uuid7()
        self._enqueue(
            (
                _INF,
                event_id,
                time.time_ns(),
                request_id,
                model_version,
                prompt,
                response,
                latency_ms,
                role,
                error,
                error_code,
                token_logprobs,
                session_id,
                user_id,
                retry_of,
                attributes,
            )
        )
        return event_id

    def record_feedback(
        self,
        request_id: str,
        *,
        signal: int = events_pb2.SIGNAL_UNSPECIFIED,
        rating: float | None = None,
        dwell_ms: int = 0,
        correction: str = "",
        user_id: str = "",
        session_id: str = "",
        attributes: Mapping[str, str] | None = None,
    ) -> str:
        """Queues a Feedback event; returns its event id. Never blocks."""
        event_id = uuid7()
        self._enqueue(
            (
                _FB,
                event_id,
                time.time_ns(),
                request_id,
                signal,
                rating,
                dwell_ms,
                correction,
                user_id,
                session_id,
                attributes,
            )
        )
        return event_id

    def record(self, event: events_pb2.Event) -> str:
        """Queues a ready-made Event (an event id is assigned when empty)."""
        if not event.event_id:
            event.event_id = uuid7()
        self._enqueue((_RAW, event.event_id, 0, event))
        return event.event_id

    # -- flushing and closing ---------------------------------------------

    @property
    def pending(self) -> int:
        """Events not yet acked as durable (queued or in flight)."""
        with self._lock:
            inflight = sum(len(b.events) for b in self._unacked)
        return len(self._queue) + inflight

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until every event recorded so far is acked. Returns False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._wake.set()
        with self._progress:
            while self._queue or self._unacked:
                if self._closed.is_set() and not self._conn.is_alive():
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._wake.set()
                self._progress.wait(0.05 if remaining is None else min(remaining, 0.05))
        return True

    def close(self, timeout: float | None = 10.0) -> bool:
        """Flushes (up to ``timeout``), then stops the background threads.

        Returns False when some events could not be delivered in time; they
        are counted in ``stats.dropped``. Safe to call twice.
        """
        if self._closed.is_set():
            return True
        ok = self.flush(timeout)
        self._closed.set()
        self._wake.set()
        with self._lock:
            lost = len(self._queue) + sum(len(b.events) for b in self._unacked)
            self._queue.clear()
            if self._outbox is not None:
                self._outbox.end()
        self.stats.dropped += lost
        call = self._call
        if call is not None:
            call.cancel()
        self._sender.join(5)
        self._conn.join(5)
        self._channel.close()
        return ok and lost == 0

    async def aflush(self, timeout: float | None = None) -> bool:
        """``flush`` for asyncio callers (runs in a worker thread)."""
        return await asyncio.to_thread(self.flush, timeout)

    async def aclose(self, timeout: float | None = 10.0) -> bool:
        return await asyncio.to_thread(self.close, timeout)

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- background: batching ----------------------------------------------

    def _build(self, item: tuple[object, ...]) -> events_pb2.Event:
        kind = item[0]
        if kind == _RAW:
            ev = item[3]
            assert isinstance(ev, events_pb2.Event)
            return ev
        ev = events_pb2.Event(event_id=item[1])  # type: ignore[arg-type]
        ev.time.FromNanoseconds(item[2])  # type: ignore[arg-type]
        if kind == _INF:
            (
                _,
                _,
                _,
                request_id,
                version,
                prompt,
                response,
                latency,
                role,
                error,
                code,
                lps,
                session,
                user,
                retry_of,
                attrs,
            ) = item
            inf = ev.inference
            inf.request_id = request_id  # type: ignore[assignment]
            inf.model_version = version  # type: ignore[assignment]
            inf.role = role  # type: ignore[assignment]
            if prompt:
                inf.prompt = prompt  # type: ignore[assignment]
            if response:
                inf.response = response  # type: ignore[assignment]
            inf.latency_ms = latency  # type: ignore[assignment]
            if error:
                inf.error = True
                inf.error_code = code  # type: ignore[assignment]
            if lps:
                inf.token_logprobs.extend(lps)  # type: ignore[arg-type]
            if session:
                inf.session_id = session  # type: ignore[assignment]
            if user:
                inf.user_id = user  # type: ignore[assignment]
            if retry_of:
                inf.retry_of = retry_of  # type: ignore[assignment]
            _attrs(inf.attributes, attrs)  # type: ignore[arg-type]
        else:
            (_, _, _, request_id, signal, rating, dwell, correction, user, session, attrs) = item
            fb = ev.feedback
            fb.request_id = request_id  # type: ignore[assignment]
            if signal:
                fb.signal = signal  # type: ignore[assignment]
            if rating is not None:
                fb.rating = rating  # type: ignore[assignment]
            if dwell:
                fb.dwell_ms = dwell  # type: ignore[assignment]
            if correction:
                fb.correction = correction  # type: ignore[assignment]
            if user:
                fb.user_id = user  # type: ignore[assignment]
            if session:
                fb.session_id = session  # type: ignore[assignment]
            _attrs(fb.attributes, attrs)  # type: ignore[arg-type]
        return ev

    def _send_loop(self) -> None:
        q = self._queue
        while True:
            self._wake.wait(self._linger)
            self._wake.clear()
            if self._closed.is_set():
                return
            while q:
                with self._lock:
                    if len(self._unacked) >= self._max_inflight:
                        break
                events: list[events_pb2.Event] = []
                while q and len(events) < self._batch_size:
                    try:
                        item = q.popleft()
                    except IndexError:
                        break
                    try:
                        events.append(self._build(item))
                    except Exception as exc:  # a bad value from the caller: drop that one
                        self.stats.dropped += 1
                        self.stats.last_error = f"cannot build event: {exc}"
                if not events:
                    continue
                batch = events_pb2.EventBatch(events=events)
                with self._progress:
                    self._unacked.append(batch)
                    if self._outbox is not None:
                        self._outbox.put(batch)
                    self._progress.notify_all()
                self.stats.sent_batches += 1

    # -- background: the stream ------------------------------------------

    def _wait_for_work(self) -> bool:
        """Waits until a batch is waiting to be sent; False once closed."""
        with self._progress:
            while not self._unacked:
                if self._closed.is_set():
                    return False
                self._progress.wait(0.5)
        return not self._closed.is_set()

    def _conn_loop(self) -> None:
        delay = self._backoff[0]
        while self._wait_for_work():
            outbox = _Outbox()
            with self._lock:
                for batch in self._unacked:
                    outbox.put(batch)
                self._outbox = outbox
            call = self._stub.StreamEvents(iter(outbox))
            self._call = call
            try:
                for ack in call:
                    delay = self._backoff[0]
                    self._refused_logged = False
                    self._handle_ack(ack)
                # the server ended the stream (it is shutting down): reconnect
                self.stats.last_error = "stream ended by the sidecar"
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
                if self._closed.is_set():
                    break
                self.stats.last_error = (
                    f"{code.name}: {exc.details() if hasattr(exc, 'details') else exc}"
                )
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    # The oldest unacked batch is the refused one (acks come in
                    # order); resending it would be refused again.
                    self._drop_refused()
                    delay = self._backoff[0]
                elif code in REFUSED:
                    # Wrong or missing token: say so once, keep the events
                    # queued, and retry at the slowest pace until it is fixed.
                    if not self._refused_logged:
                        self._refused_logged = True
                        log.error(
                            "the sidecar refused this client (%s); events stay queued. "
                            "Check the token (token= or %s)",
                            self.stats.last_error,
                            TOKEN_ENV,
                        )
                    delay = self._backoff[1]
                elif code not in RETRYABLE:
                    log.warning("event stream failed (%s); retrying", self.stats.last_error)
            finally:
                with self._lock:
                    outbox.end()
                    if self._outbox is outbox:
                        self._outbox = None
            if self._closed.is_set():
                break
            self.stats.reconnects += 1
            self._closed.wait(random.uniform(0, delay))
            delay = min(delay * 2, self._backoff[1])

    def _drop_refused(self) -> None:
        with self._progress:
            if not self._unacked:
                return
            batch = self._unacked.popleft()
            self.stats.rejected += len(batch.events)
            self.stats.rejected_batches += 1
            self._progress.notify_all()

    def _handle_ack(self, ack: events_pb2.IngestAck) -> None:
        with self._progress:
            batch = self._unacked.popleft() if self._unacked else None
            st = self.stats
            rejected = len(ack.rejected) + ack.rejected_unlisted
            st.accepted += ack.accepted
            st.duplicates += ack.duplicates
            st.rejected += rejected
            st.acked_events += ack.accepted + ack.duplicates + rejected
            self._progress.notify_all()
        if batch is not None and self._on_ack is not None:
            try:
                self._on_ack(batch, ack)
            except Exception:
                log.exception("on_ack callback failed")


class _Outbox:
    """The request side of one StreamEvents call."""

    def __init__(self) -> None:
        self._items: collections.deque[object] = collections.deque()
        self._cond = threading.Condition()

    def put(self, batch: events_pb2.EventBatch) -> None:
        with self._cond:
            self._items.append(batch)
            self._cond.notify()

    def end(self) -> None:
        with self._cond:
            self._items.append(_END)
            self._cond.notify()

    def __iter__(self) -> Iterator[events_pb2.EventBatch]:
        while True:
            with self._cond:
                while not self._items:
                    self._cond.wait()
                item = self._items.popleft()
            if item is _END:
                return
            assert isinstance(item, events_pb2.EventBatch)
            yield item
