"""Keeps the learning history bounded, as retention keeps the event log bounded.

Every ``interval`` seconds the oldest history entries older than
``learning.history_retention_seconds`` or beyond
``learning.history_max_entries`` are deleted through the writer, at most
``batch`` per transaction so the writer is never held long.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

from sidecar._aio import cancel_and_wait
from sidecar.config import LearningConfig
from sidecar.store import Store, StoreWriter, trim_history

__all__ = ["HistoryRetention"]

log = logging.getLogger(__name__)


class HistoryRetention:
    """A stage: ``start()`` trims on a timer; ``shutdown()`` stops (safe before start, twice)."""

    def __init__(
        self,
        store: Store,
        writer: StoreWriter,
        config: LearningConfig,
        *,
        interval_seconds: float,
        batch: int,
    ) -> None:
        self._store = store
        self._writer = writer
        self._config = config
        self._interval = interval_seconds
        self._batch = batch
        self._task: asyncio.Task[None] | None = None
        #: Entries deleted since start.
        self.deleted = 0

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="history-retention")

    async def shutdown(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def run_once(self) -> int:
        """Trims until nothing is left to trim; returns the entries deleted."""
        cfg = self._config
        if not cfg.history_retention_seconds and not cfg.history_max_entries:
            return 0
        total = 0
        while True:
            deleted, more = await self._writer.run(
                functools.partial(
                    trim_history,
                    store=self._store,
                    now_ms=time.time_ns() // 1_000_000,
                    max_age_seconds=cfg.history_retention_seconds,
                    max_entries=cfg.history_max_entries,
                    budget=self._batch,
                )
            )
            total += deleted
            if not more:
                break
        self.deleted += total
        return total

    def status(self) -> dict[str, int]:
        return {"history_deleted": self.deleted}

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.run_once()
            except Exception:
                log.exception("learning history retention failed; will retry")
