"""Whether the store takes writes: a full disk turns ingest off until space returns."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from typing import Any

import lmdb

from sidecar._aio import cancel_and_wait
from sidecar.config import StoreConfig
from sidecar.errors import StoreError
from sidecar.store._codec import encode_u64
from sidecar.store._env import Store
from sidecar.store._writer import StoreWriter

__all__ = ["StoreHealth"]

log = logging.getLogger(__name__)

_PROBE_KEY = b"health/space_probe_ms"


class StoreHealth:
    """Reports the store as not serving from the first commit that fails for
    a full disk or map, and as serving again once ``store.min_free_bytes``
    are free and a small commit goes through, checked every
    ``store.full_recheck_seconds``. Nothing needs a restart.

    ``set_serving(bool)`` is called on each change (the app turns the
    ingest service's ``grpc.health.v1`` status with it).
    """

    def __init__(
        self,
        store: Store,
        writer: StoreWriter,
        config: StoreConfig,
        set_serving: Callable[[bool], Awaitable[None]],
    ) -> None:
        self._store = store
        self._writer = writer
        self._config = config
        self._set_serving = set_serving
        self._task: asyncio.Task[None] | None = None
        self.serving = True
        self.full_since_ms = 0
        self.reason = ""

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._watch(), name="store-health")

    async def shutdown(self) -> None:
        """Stops watching. Safe before start and twice."""
        task, self._task = self._task, None
        await cancel_and_wait(task)

    def status(self) -> dict[str, Any]:
        """``serving``; when not, since when and why."""
        return {
            "serving": self.serving,
            "full_since_ms": self.full_since_ms,
            "reason": self.reason,
            "full_commits": self._writer.stats.full_commits,
        }

    async def _watch(self) -> None:
        while True:
            exc = await self._writer.wait_full()
            self.serving = False
            self.full_since_ms = time.time_ns() // 1_000_000
            self.reason = str(exc)
            log.warning(
                "store is full: ingest answers RESOURCE_EXHAUSTED until space returns",
                extra={"reason": self.reason, "data_dir": str(self._store.data_dir)},
            )
            await self._set_serving(False)
            # polled: nothing announces that an operator freed some disk
            while True:
                await asyncio.sleep(self._config.full_recheck_seconds)
                if await self._space_returned():
                    break
            self.serving = True
            self.reason = ""
            log.warning("store has space again: ingest is serving")
            await self._set_serving(True)

    async def _space_returned(self) -> bool:
        try:
            free = shutil.disk_usage(self._store.data_dir).free + self._reusable_bytes()
        except OSError:
            return False
        if free < self._config.min_free_bytes:
            return False
        # A failure from here on sets "full" again and the next round waits.
        self._writer.clear_full()
        try:
            await self._writer.run(self._probe)
        except StoreError:
            return False
        return self._writer.full is None

    def _reusable_bytes(self) -> int:
        """Disk the store's file holds past its last used page.

        A commit that failed for want of space leaves the pages it managed to
        write allocated in data.mdb; the file system counts them as used, but
        the next commit reuses them. Without this, a burst of writes that
        refilled the disk the moment it was freed would keep ingest
        NOT_SERVING for ever though the store has room.
        """
        try:
            st = os.stat(self._store.data_file)
            info = self._store.env.info()
            psize = int(self._store.env.stat()["psize"])
        except (OSError, lmdb.Error):
            return 0
        used = (int(info["last_pgno"]) + 1) * psize
        return max(0, st.st_blocks * 512 - used)

    def _probe(self, txn: lmdb.Transaction) -> None:
        txn.put(_PROBE_KEY, encode_u64(time.time_ns() // 1_000_000), db=self._store.db("meta"))
