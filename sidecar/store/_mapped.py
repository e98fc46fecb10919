"""Gives back the process's mapping of LMDB pages it has read.

LMDB reads through a shared, read-only memory map of ``data.mdb``. Every page
a reader touches (the processors read the whole event log once) stays mapped
into the daemon, so its RSS grows with the log although those pages are
clean page cache that the process will not read again. ``madvise`` with
``MADV_DONTNEED`` unmaps them: the data stays in the OS page cache (nothing
is written or lost; the map is shared and LMDB never writes through it here,
``writemap=False``), and a later read maps a page again with a minor fault.

Linux only (``/proc/self/maps``); elsewhere :meth:`MappedPages.release` does
nothing. It holds the store's resize lock on the shared side, so the map
cannot be moved by ``set_mapsize`` between finding it and advising it (an
address that had been handed to another mapping must never be advised).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from sidecar._aio import cancel_and_wait, spawn
from sidecar.store._env import Store

log = logging.getLogger(__name__)

__all__ = ["MappedPages", "PageRelease"]

_MADV_DONTNEED = 4  # Linux, every architecture
_PROC_FIELDS = {"VmRSS": "rss_bytes", "RssAnon": "rss_anon_bytes", "RssFile": "rss_file_bytes"}


def _madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return cast(Callable[[int, int, int], int], fn)


@dataclass
class ReleaseStats:
    #: times the mapping was released
    releases: int = 0
    #: failed madvise calls (the first one's errno is logged)
    errors: int = 0


class MappedPages:
    """The mapping of one store's ``data.mdb`` in this process."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._madvise = _madvise()
        self.stats = ReleaseStats()

    @property
    def supported(self) -> bool:
        return self._madvise is not None

    def _data_file(self) -> str:
        return os.path.realpath(self._store.data_dir / "lmdb" / "data.mdb")

    def regions(self) -> list[tuple[int, int]]:
        """(start, length) of every mapping of ``data.mdb`` in this process."""
        path = self._data_file()
        out: list[tuple[int, int]] = []
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n") == path:
                    lo, _, hi = parts[0].partition("-")
                    start = int(lo, 16)
                    out.append((start, int(hi, 16) - start))
        return out

    def release(self) -> int:
        """Unmaps the pages of ``data.mdb`` this process has touched; returns
        the length of the mapping advised (0 when unsupported or not open)."""
        madvise = self._madvise
        if madvise is None:
            return 0
        total = 0
        with self._store.map_pinned() as is_open:
            if not is_open:
                return 0
            for start, length in self.regions():
                if madvise(start, length, _MADV_DONTNEED) != 0:
                    self.stats.errors += 1
                    if self.stats.errors == 1:
                        err = ctypes.get_errno()
                        log.warning(
                            "cannot release mapped store pages",
                            extra={"errno": err, "error": os.strerror(err)},
                        )
                    continue
                total += length
        self.stats.releases += 1
        return total


class PageRelease:
    """Releases the mapped store pages every ``interval_seconds`` (0: never)."""

    def __init__(self, store: Store, interval_seconds: float) -> None:
        self.pages = MappedPages(store)
        self._interval = interval_seconds
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None and self._interval > 0 and self.pages.supported:
            self._task = spawn(self._loop(), stage="store", name="page-release")

    async def shutdown(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    def status(self) -> dict[str, Any]:
        """The daemon's memory (from /proc/self/status, Linux) and the releases:
        ``rss_bytes``, ``rss_anon_bytes``, ``rss_file_bytes`` (the mapped store
        pages are part of this), ``store_page_releases``,
        ``release_mapped_pages_seconds``."""
        out: dict[str, Any] = {
            "store_page_releases": self.pages.stats.releases,
            "release_mapped_pages_seconds": self._interval if self.pages.supported else 0,
        }
        with (
            contextlib.suppress(OSError, ValueError),
            open("/proc/self/status", encoding="ascii", errors="replace") as f,
        ):
            for line in f:
                key, _, value = line.partition(":")
                name = _PROC_FIELDS.get(key)
                if name is not None:
                    out[name] = int(value.split()[0]) * 1024
        return out

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                # off the event loop: unmapping a few hundred MB takes milliseconds
                await asyncio.to_thread(self.pages.release)
            except Exception:
                log.exception("releasing mapped store pages failed; will retry")
