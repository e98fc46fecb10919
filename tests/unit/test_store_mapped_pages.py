"""Releasing the mapped store pages: RSS of data.mdb drops, data stays intact."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from sidecar.config import StoreConfig
from sidecar.store import MappedPages, PageRelease, Store, encode_u64

N = 20_000
VALUE = b"x" * 1000  # about 20 MB of log: far more pages than a B-tree's hot set


@pytest.fixture
def store_config(tmp_path: Path) -> StoreConfig:
    return StoreConfig(data_dir=tmp_path / "data", map_size_bytes=1 << 26, sync=False)


def _fill(store: Store, first: int = 0) -> None:
    with store.env.begin(write=True) as txn, txn.cursor(db=store.db("events")) as cur:
        cur.putmulti(
            [(encode_u64(i), VALUE + encode_u64(i)) for i in range(first, first + N)], append=True
        )


def _read_all(store: Store) -> int:
    n = 0
    with store.read() as txn, txn.cursor(db=store.db("events")) as cur:
        for key, value in cur:
            assert bytes(value) == VALUE + bytes(key)
            n += 1
    return n


def _mapped_kb(store: Store) -> int:
    """Resident kB of this process's mappings of data.mdb (from smaps)."""
    path = os.path.realpath(store.data_dir / "lmdb" / "data.mdb")
    total, inside = 0, False
    with open("/proc/self/smaps", encoding="utf-8") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:
                inside = len(head) == 6 and head[5].rstrip("\n") == path
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


def test_release_unmaps_read_pages_and_keeps_the_data(store: Store) -> None:
    pages = MappedPages(store)
    assert pages.supported
    _fill(store)
    assert _read_all(store) == N
    regions = pages.regions()
    assert len(regions) == 1 and regions[0][1] == store.env.info()["map_size"]
    before = _mapped_kb(store)
    assert before > 15_000, before  # every log page was touched by the read

    assert pages.release() == regions[0][1]
    after = _mapped_kb(store)
    assert after < before / 10, (before, after)
    assert pages.stats.releases == 1 and pages.stats.errors == 0

    # reading maps the pages again, from the page cache, unchanged
    assert _read_all(store) == N
    assert _mapped_kb(store) > 15_000


def test_release_follows_the_map_when_it_grows(store: Store) -> None:
    pages = MappedPages(store)
    _fill(store)
    old = pages.regions()
    assert store.grow()
    new = pages.regions()
    assert len(new) == 1 and new[0][1] == 2 * old[0][1]
    _fill(store, first=N)
    assert _read_all(store) == 2 * N
    assert pages.release() == new[0][1]
    assert _read_all(store) == 2 * N


def test_release_of_a_closed_store_does_nothing(store_config: StoreConfig) -> None:
    s = Store(store_config)
    pages = MappedPages(s)
    assert pages.release() == 0
    s.open()
    s.close()
    assert pages.release() == 0
    assert pages.stats.releases == 0


async def test_page_release_runs_on_its_interval_and_reports_memory(store: Store) -> None:
    release = PageRelease(store, interval_seconds=0.05)
    _fill(store)
    assert _read_all(store) == N
    await release.start()
    try:
        for _ in range(200):
            if release.pages.stats.releases >= 2:
                break
            await asyncio.sleep(0.05)
        st = release.status()
    finally:
        await release.shutdown()
    assert st["store_page_releases"] >= 2
    assert st["release_mapped_pages_seconds"] == 0.05
    assert st["rss_bytes"] >= st["rss_anon_bytes"] > 0 and st["rss_file_bytes"] > 0
    assert _mapped_kb(store) < 15_000  # the pages read above were given back


async def test_page_release_interval_zero_never_releases(store: Store) -> None:
    release = PageRelease(store, interval_seconds=0)
    await release.start()
    await asyncio.sleep(0.1)
    await release.shutdown()
    assert release.pages.stats.releases == 0
