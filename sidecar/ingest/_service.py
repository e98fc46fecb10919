"""IngestService: validate, dedupe, commit, then ack."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from atlas_sidecar_client.pb import events_pb2, ingest_pb2_grpc

from sidecar.config import IngestConfig, ServerConfig
from sidecar.errors import StoreError, StoreFullError
from sidecar.ingest._validate import EventValidator
from sidecar.store import IngestResult, StoreWriter

__all__ = ["BatchObserver", "BatchStart", "IngestServicer"]

log = logging.getLogger(__name__)

#: Called once per committed batch with (batch, ack, commit seconds, the
#: writer's result with the batch's sequence range); the telemetry stage hooks
#: in here. Never per event.
BatchObserver = Callable[[events_pb2.EventBatch, events_pb2.IngestAck, float, IngestResult], None]
#: Called when a batch is submitted; may return a callback for the commit.
BatchStart = Callable[[events_pb2.EventBatch], Callable[[IngestResult], None] | None]


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    """Implements ``atlas.sidecar.v1.IngestService``.

    Each batch is validated event by event; valid events go to the writer and
    the ack is sent once the writer's transaction is committed. Acks of one
    stream go out in order, but several batches may be committing at once
    (``ingest.max_inflight_batches``), so reading is never stalled by fsync.
    """

    def __init__(self, writer: StoreWriter, ingest: IngestConfig, server: ServerConfig) -> None:
        self._writer = writer
        self._validator = EventValidator(ingest)
        self._max_inflight = ingest.max_inflight_batches
        self._max_streams = server.max_concurrent_streams
        self._observers: list[BatchObserver] = []
        self._batch_start: BatchStart | None = None
        self._draining = asyncio.Event()
        self.open_streams = 0

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

    def _submit(
        self, batch: events_pb2.EventBatch
    ) -> Callable[[], Awaitable[events_pb2.IngestAck]]:
        check = self._validator.check
        items: list[tuple[bytes, bytes]] = []
        rejections: list[events_pb2.Rejection] = []
        for index, event in enumerate(batch.events):
            reason = check(event)
            if reason is None:
                items.append((event.event_id.encode(), event.SerializeToString()))
            else:
                rejections.append(events_pb2.Rejection(index=index, reason=reason))
        loop = asyncio.get_running_loop()
        started = loop.time()
        on_commit = self._batch_start(batch) if self._batch_start is not None else None
        fut = asyncio.wrap_future(self._writer.submit_events(items, len(rejections), on_commit))

        async def finish() -> events_pb2.IngestAck:
            result: IngestResult = await fut
            ack = events_pb2.IngestAck(
                accepted=result.accepted, duplicates=result.duplicates, rejected=rejections
            )
            if self._observers:
                elapsed = loop.time() - started
                for observer in self._observers:
                    try:
                        observer(batch, ack, elapsed, result)
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

    # -- RPCs ------------------------------------------------------------

    async def RecordEvents(
        self, request: events_pb2.EventBatch, context: grpc.aio.ServicerContext
    ) -> events_pb2.IngestAck:
        if self._draining.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "sidecar is shutting down")
        try:
            return await self._submit(request)()
        except StoreError as exc:
            await self._abort_for(context, exc)
            raise  # unreachable: abort raises

    async def StreamEvents(
        self,
        request_iterator: AsyncIterator[events_pb2.EventBatch],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[events_pb2.IngestAck]:
        if self._draining.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "sidecar is shutting down")
        if self.open_streams >= self._max_streams:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many open ingest streams (server.max_concurrent_streams={self._max_streams})",
            )
        self.open_streams += 1
        pending: asyncio.Queue[Callable[[], Awaitable[events_pb2.IngestAck]] | None] = (
            asyncio.Queue(self._max_inflight)
        )

        async def read() -> None:
            try:
                async for batch in request_iterator:
                    await pending.put(self._submit(batch))
            finally:
                await pending.put(None)

        reader = asyncio.create_task(read(), name="ingest-read")
        drain_wait = asyncio.create_task(self._draining.wait(), name="ingest-drain")
        reader.add_done_callback(lambda _t: drain_wait.cancel())
        drain_wait.add_done_callback(lambda t: None if t.cancelled() else reader.cancel())
        try:
            while True:
                nxt = await pending.get()
                if nxt is None:
                    break
                try:
                    ack = await nxt()
                except StoreError as exc:
                    await self._abort_for(context, exc)
                yield ack
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        finally:
            self.open_streams -= 1
            drain_wait.cancel()
            if not reader.done():
                reader.cancel()
