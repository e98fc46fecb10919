"""IngestService: validate, dedupe, commit, then ack."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from atlas_sidecar_client.pb import events_pb2, ingest_pb2, ingest_pb2_grpc

from sidecar._aio import spawn
from sidecar.config import IngestConfig
from sidecar.errors import StoreError, StoreFullError
from sidecar.ingest._decode import BatchDecodeError, BatchDecoder, DecodedBatch
from sidecar.store import IngestResult, StoreWriter

__all__ = ["BatchInfo", "BatchObserver", "BatchStart", "IngestServicer"]

log = logging.getLogger(__name__)

SERVICE_NAME = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name

#: A request as the handlers receive it: the message's bytes as they came
#: off the wire, or an EventBatch from an in-process caller.
Request = bytes | events_pb2.EventBatch


@dataclass(eq=False, slots=True)
class BatchInfo:
    """What the telemetry hooks see of a batch: its identity and its size,
    never its events (the batch is not parsed into objects)."""

    size: int


#: Called once per committed batch with (batch, ack, commit seconds, the
#: writer's result with the batch's sequence range); the telemetry stage hooks
#: in here. Never per event.
BatchObserver = Callable[[BatchInfo, events_pb2.IngestAck, float, IngestResult], None]
#: Called when a batch is submitted; may return a callback for the commit.
BatchStart = Callable[[BatchInfo], Callable[[IngestResult], None] | None]


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    """Implements ``atlas.sidecar.v1.IngestService``.

    Each batch is validated event by event; valid events go to the writer and
    the ack is sent once the writer's transaction is committed. Acks of one
    stream go out in order, but several batches may be committing at once
    (``ingest.max_inflight_batches``), so reading is never stalled by fsync.

    Register it with :meth:`add_to_server`: the handlers take the requests'
    bytes undecoded, and :class:`BatchDecoder` splits and checks them (the
    compiled path stores each event's bytes as the client sent them). A
    message that is not an EventBatch answers ``INVALID_ARGUMENT`` naming
    the byte offset, and so does a batch over ``ingest.max_events_per_batch``
    (before it is decoded). An ack lists at most
    ``ingest.max_rejections_per_ack`` rejections and counts the rest in
    ``rejected_unlisted``. A stream that sends nothing for
    ``ingest.stream_idle_seconds`` while no batch awaits its ack is closed
    with ``UNAVAILABLE``. How many calls may be open at once is not decided
    here but by :class:`sidecar._admission.CallAdmission`.
    """

    def __init__(
        self,
        writer: StoreWriter,
        ingest: IngestConfig,
        *,
        decoder: BatchDecoder | None = None,
    ) -> None:
        self._writer = writer
        self.decoder = decoder or BatchDecoder(ingest)
        self._max_inflight = ingest.max_inflight_batches
        self._max_listed = ingest.max_rejections_per_ack
        self._idle_seconds = ingest.stream_idle_seconds
        self._observers: list[BatchObserver] = []
        self._batch_start: BatchStart | None = None
        self._draining = asyncio.Event()
        self.open_streams = 0

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Registers both RPCs, taking their requests as bytes (no deserializer)."""
        ack = events_pb2.IngestAck.SerializeToString
        handlers = {
            "StreamEvents": grpc.stream_stream_rpc_method_handler(
                self.StreamEvents, request_deserializer=None, response_serializer=ack
            ),
            "RecordEvents": grpc.unary_unary_rpc_method_handler(
                self.RecordEvents, request_deserializer=None, response_serializer=ack
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )
        server.add_registered_method_handlers(SERVICE_NAME, handlers)

    def status(self) -> dict[str, Any]:
        """``path``: ``compiled`` or ``python``, which path decodes batches."""
        return {"path": self.decoder.path}

    def add_observer(self, observer: BatchObserver) -> None:
        self._observers.append(observer)

    def set_batch_start(self, start: BatchStart | None) -> None:
        """``start(batch)`` runs when a batch is submitted, in the caller's context;
        the callback it returns runs on the writer thread once the batch is
        committed, before any other stage can read it (see ``submit_events``)."""
        self._batch_start = start

    def drain(self) -> None:
        """Stops reading new batches; in-flight batches are committed and acked."""
        self._draining.set()

    # -- core ------------------------------------------------------------

    def _decode(self, request: Request) -> DecodedBatch:
        if isinstance(request, bytes):
            return self.decoder.decode(request)
        return self.decoder.decode_message(request)

    def _submit(self, request: Request) -> Callable[[], Awaitable[events_pb2.IngestAck]]:
        """Decodes and queues one batch; the callable awaits its ack.
        Raises BatchDecodeError (nothing is queued then)."""
        decoded = self._decode(request)
        info = BatchInfo(decoded.size)
        loop = asyncio.get_running_loop()
        started = loop.time()
        on_commit = self._batch_start(info) if self._batch_start is not None else None
        fut = self._writer.submit_events_async(decoded.items, len(decoded.rejected), on_commit)
        rejected = decoded.rejected
        listed = rejected[: self._max_listed]
        unlisted = len(rejected) - len(listed)

        async def finish() -> events_pb2.IngestAck:
            result: IngestResult = await fut
            ack = events_pb2.IngestAck(
                accepted=result.accepted,
                duplicates=result.duplicates,
                rejected=[events_pb2.Rejection(index=i, reason=r) for i, r in listed]
                if listed
                else None,
                rejected_unlisted=unlisted,
            )
            if self._observers:
                elapsed = loop.time() - started
                for observer in self._observers:
                    try:
                        observer(info, ack, elapsed, result)
                    except Exception:
                        log.exception("ingest observer failed")
            return ack

        return finish

    async def _abort_for(self, context: grpc.aio.ServicerContext, exc: StoreError) -> None:
        code = (
            grpc.StatusCode.RESOURCE_EXHAUSTED
            if isinstance(exc, StoreFullError)
            else grpc.StatusCode.UNAVAILABLE
        )
        await context.abort(code, str(exc))

    async def record(self, batch: events_pb2.EventBatch) -> events_pb2.IngestAck:
        """Stores ``batch`` from inside the daemon (the HTTP feedback route), as RecordEvents.

        Raises:
            BatchDecodeError: the batch is over the caps.
            StoreError: the store cannot take it (StoreFullError when full).
        """
        if self._draining.is_set():
            raise StoreError("the sidecar is shutting down")
        return await self._submit(batch)()

    # -- RPCs ------------------------------------------------------------

    async def RecordEvents(
        self, request: Request, context: grpc.aio.ServicerContext
    ) -> events_pb2.IngestAck:
        if self._draining.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "sidecar is shutting down")
        try:
            return await self._submit(request)()
        except BatchDecodeError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # unreachable: abort raises
        except StoreError as exc:
            await self._abort_for(context, exc)
            raise  # unreachable: abort raises

    async def StreamEvents(
        self,
        request_iterator: AsyncIterator[Request],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[events_pb2.IngestAck]:
        if self._draining.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "sidecar is shutting down")
        self.open_streams += 1
        pending: asyncio.Queue[Callable[[], Awaitable[events_pb2.IngestAck]] | None] = (
            asyncio.Queue(self._max_inflight)
        )
        loop = asyncio.get_running_loop()
        # Batches read and not yet acked; the stream is idle only at zero.
        unacked = 0
        last_active = loop.time()
        idle = False

        async def read() -> None:
            nonlocal unacked, last_active
            try:
                async for request in request_iterator:
                    unacked += 1
                    last_active = loop.time()
                    try:
                        submitted = self._submit(request)
                    except BatchDecodeError as exc:
                        await pending.put(_failed(exc))
                        return  # the stream ends with INVALID_ARGUMENT after the earlier acks
                    await pending.put(submitted)
            finally:
                await pending.put(None)

        async def watch_idle() -> None:
            # Ends the read side of a stream that went quiet, the same way
            # drain does; the handler then closes it with UNAVAILABLE.
            nonlocal idle
            while True:
                quiet_for = loop.time() - last_active
                if unacked == 0 and quiet_for >= self._idle_seconds:
                    idle = True
                    reader.cancel()
                    return
                await asyncio.sleep(max(self._idle_seconds - quiet_for, self._idle_seconds / 10))

        reader = spawn(read(), stage="ingest", name="read", awaited=True)
        drain_wait = spawn(self._draining.wait(), stage="ingest", name="drain", awaited=True)
        idle_wait = spawn(watch_idle(), stage="ingest", name="idle", awaited=True)
        reader.add_done_callback(lambda _t: drain_wait.cancel())
        reader.add_done_callback(lambda _t: idle_wait.cancel())
        drain_wait.add_done_callback(lambda t: None if t.cancelled() else reader.cancel())
        try:
            while True:
                nxt = await pending.get()
                if nxt is None:
                    break
                try:
                    ack = await nxt()
                except BatchDecodeError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                except StoreError as exc:
                    await self._abort_for(context, exc)
                unacked -= 1
                last_active = loop.time()
                yield ack
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            if idle:
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"ingest stream closed after {self._idle_seconds:g} s without a batch"
                    " (ingest.stream_idle_seconds); open a new one to send more",
                )
        finally:
            self.open_streams -= 1
            drain_wait.cancel()
            idle_wait.cancel()
            if not reader.done():
                reader.cancel()


def _failed(exc: BatchDecodeError) -> Callable[[], Awaitable[events_pb2.IngestAck]]:
    async def fail() -> events_pb2.IngestAck:
        raise exc

    return fail
