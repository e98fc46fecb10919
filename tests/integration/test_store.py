"""The store on a real LMDB: schema, locking, retention, processors, disk full."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import lmdb
import pytest
from atlas_sidecar_client.pb import events_pb2

from sidecar.config import StoreConfig
from sidecar.errors import DataDirLockedError, SchemaVersionError, StoreError, StoreFullError
from sidecar.store import (
    Retention,
    Store,
    StoreHealth,
    StoreWriter,
    append_history,
    encode_u64,
    read_cursor,
    read_history,
)
from sidecar.store._processor import ProcessorRunner
from tests._helpers import running_store as running
from tests.conftest import inference


def cfg(path: Path, **kw: object) -> StoreConfig:
    return StoreConfig(data_dir=path, **kw)  # type: ignore[arg-type]


def items(prefix: str, n: int) -> list[tuple[bytes, bytes]]:
    return [
        (f"{prefix}{i}".encode(), inference(f"{prefix}{i}").SerializeToString()) for i in range(n)
    ]


def test_newer_schema_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    store = Store(cfg(tmp_path))
    store.open()
    with store.env.begin(write=True) as txn:
        txn.put(b"schema_version", encode_u64(99), db=store.db("meta"))
    store.close()
    again = Store(cfg(tmp_path))
    with pytest.raises(SchemaVersionError, match="schema version 99, newer than"):
        again.open()
    again.close()


def test_data_dir_held_by_another_process_is_refused(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            "python3",
            "-c",
            "import fcntl,os,sys,time; fd=os.open(sys.argv[1], os.O_RDWR|os.O_CREAT);"
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'4242'); print('held', flush=True); time.sleep(60)",
            str(tmp_path / "LOCK"),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        with pytest.raises(DataDirLockedError, match="held by another sidecar"):
            Store(cfg(tmp_path)).open()
    finally:
        holder.kill()
        holder.wait()
    store = Store(cfg(tmp_path))
    store.open()  # free again once the holder is gone
    store.close()


async def test_writer_fn_job_failure_is_isolated(tmp_path: Path) -> None:
    store = Store(cfg(tmp_path))
    store.open()
    writer = StoreWriter(store, cfg(tmp_path))
    await writer.start()
    try:

        def bad(txn: lmdb.Transaction) -> None:
            txn.put(b"bad", b"1", db=store.db("meta"))
            raise ValueError("boom")

        def good(txn: lmdb.Transaction) -> str:
            txn.put(b"good", b"1", db=store.db("meta"))
            return "ok"

        f1, f2 = writer.submit(bad), writer.submit(good)
        f3 = writer.submit_events(items("e", 3))
        assert f2.result(5) == "ok"
        with pytest.raises(ValueError, match="boom"):
            f1.result(5)
        assert f3.result(5).accepted == 3
        with store.read() as txn:
            assert txn.get(b"bad", db=store.db("meta")) is None
            assert txn.get(b"good", db=store.db("meta")) == b"1"
    finally:
        await writer.shutdown()
        await writer.shutdown()  # idempotent
        store.close()


async def test_shutdown_before_start_is_safe(tmp_path: Path) -> None:
    store = Store(cfg(tmp_path))
    writer = StoreWriter(store, cfg(tmp_path))
    await writer.shutdown()
    retention = Retention(store, writer, cfg(tmp_path))
    await retention.shutdown()
    store.close()
    store.close()


async def test_retention_trims_by_size_and_age_but_never_past_a_cursor(tmp_path: Path) -> None:
    c = cfg(tmp_path, retention_max_events=100, retention_seconds=3600, dedupe_window_seconds=3600)
    store = Store(c)
    store.open()
    writer = StoreWriter(store, c)
    await writer.start()
    try:
        writer.submit_events(items("a", 250)).result(5)
        # a processor that has read up to seq 120
        await writer.run(lambda txn: txn.put(b"cursor/test", encode_u64(121), db=store.db("meta")))
        res = await Retention(store, writer, c).run_once()
        assert res.events_deleted == 120  # size says 150, the cursor says 120
        with store.read() as txn:
            assert txn.stat(store.db("events"))["entries"] == 130
            assert txn.get(b"a0", db=store.db("event_ids")) is None
            assert txn.get(b"a120", db=store.db("event_ids")) is not None
        await writer.run(lambda txn: txn.put(b"cursor/test", encode_u64(251), db=store.db("meta")))
        res = await Retention(store, writer, c).run_once()
        assert res.events_deleted == 30
        # a trimmed id is forgotten: resending stores it again
        assert writer.submit_events(items("a", 1)).result(5).accepted == 1
        # an id still in the log is a duplicate
        assert writer.submit_events([(b"a200", b"x")]).result(5).duplicates == 1
    finally:
        await writer.shutdown()
        store.close()


async def test_dedupe_window_forgets_old_ids_but_keeps_events(tmp_path: Path) -> None:
    c = cfg(tmp_path, dedupe_window_seconds=0.2, retention_seconds=3600)
    store = Store(c)
    store.open()
    writer = StoreWriter(store, c)
    await writer.start()
    try:
        writer.submit_events(items("d", 10)).result(5)
        await asyncio.sleep(0.3)
        res = await Retention(store, writer, c).run_once()
        assert (res.events_deleted, res.ids_deleted) == (0, 10)
        assert writer.submit_events(items("d", 10)).result(5).accepted == 10
    finally:
        await writer.shutdown()
        store.close()


class _Recorder:
    name = "recorder"

    def __init__(self, store: Store, poison: str = "") -> None:
        self.store = store
        self.poison = poison
        self.ticks = 0

    def process(
        self, txn: lmdb.Transaction, seq: int, ingest_ms: int, event: events_pb2.Event
    ) -> None:
        if event.event_id == self.poison:
            raise ValueError("poisoned event")
        txn.put(event.event_id.encode(), encode_u64(seq), db=self.store.db("requests"))

    def tick(self, txn: lmdb.Transaction, now_ms: int) -> None:
        self.ticks += 1


async def test_processor_dead_letters_a_bad_event_and_goes_on(tmp_path: Path) -> None:
    store = Store(cfg(tmp_path))
    store.open()
    writer = StoreWriter(store, cfg(tmp_path))
    await writer.start()
    proc = _Recorder(store, poison="p3")
    runner = ProcessorRunner(store, writer, [proc], batch_events=4)
    await runner.start()
    try:
        writer.submit_events(items("p", 10)).result(5)
        await runner.wait_idle(10)
        with store.read() as txn:
            seen = sorted(bytes(k).decode() for k, _ in txn.cursor(db=store.db("requests")))
            assert read_cursor(txn, store, "recorder") == 11
            dead = [bytes(v) for _, v in txn.cursor(db=store.db("dead_letters"))]
        assert seen == sorted(f"p{i}" for i in range(10) if i != 3)
        assert len(dead) == 1 and b"poisoned event" in dead[0]
        assert runner.status()["dead_letters"] == 1
    finally:
        await runner.shutdown()
        await writer.shutdown()
        store.close()


class _Named(_Recorder):
    """A recorder with its own name, writing ``name/event_id`` keys."""

    def __init__(self, store: Store, name: str) -> None:
        super().__init__(store)
        self.name = name
        self.rounds: list[tuple[int, int]] = []
        self._batch: tuple[Any, int, int] | None = None

    def process(
        self, txn: lmdb.Transaction, seq: int, ingest_ms: int, event: events_pb2.Event
    ) -> None:
        b = self._batch
        self._batch = (txn, b[1] if b and b[0] is txn else seq, seq)
        txn.put(f"{self.name}/{event.event_id}".encode(), b"", db=self.store.db("requests"))

    def end_batch(self, txn: lmdb.Transaction) -> None:
        if self._batch is not None and self._batch[0] is txn:
            self.rounds.append(self._batch[1:])
        self._batch = None


async def test_unparsable_log_entries_are_dead_lettered_by_every_processor(
    tmp_path: Path,
) -> None:
    store = Store(cfg(tmp_path))
    store.open()
    writer = StoreWriter(store, cfg(tmp_path))
    await writer.start()
    procs = [_Named(store, "a"), _Named(store, "b")]
    runner = ProcessorRunner(store, writer, procs)
    try:
        batch = [*items("x", 2), (b"junk", b"\xff\xff\xff"), *items("y", 2)]
        writer.submit_events(batch).result(5)
        while await runner.run_once():
            pass
        with store.read() as txn:
            keys = sorted(bytes(k).decode() for k, _ in txn.cursor(db=store.db("requests")))
            assert [read_cursor(txn, store, n) for n in "ab"] == [6, 6]
        assert keys == sorted(f"{n}/{e}" for n in "ab" for e in ("x0", "x1", "y0", "y1"))
        status = runner.status()
        assert status["dead_letters"] == 2
        assert {n: s["dead_lettered"] for n, s in status["processors"].items()} == {"a": 1, "b": 1}
    finally:
        await writer.shutdown()
        store.close()


async def test_status_shows_the_time_each_processor_spent(tmp_path: Path) -> None:
    async with running(cfg(tmp_path)) as (store, writer):
        runner = ProcessorRunner(store, writer, [_Named(store, "quick"), _Slow(store)])
        writer.submit_events(items("x", 40)).result(5)
        while await runner.run_once():
            pass
        status = runner.status()["processors"]
        assert {n: s["processed"] for n, s in status.items()} == {"quick": 40, "slow": 40}
        # sleep never returns early: the slow one spent at least 40 x 0.5 ms
        assert status["slow"]["busy_seconds"] >= 0.02


async def test_processors_close_together_read_each_event_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sidecar.store._processor as runner_module

    parsed: list[bytes] = []
    parse = runner_module._parse

    def counting(payload: bytes) -> events_pb2.Event | None:
        parsed.append(payload)
        return parse(payload)

    monkeypatch.setattr(runner_module, "_parse", counting)
    store = Store(cfg(tmp_path))
    store.open()
    writer = StoreWriter(store, cfg(tmp_path))
    await writer.start()
    writer.submit_events(items("e", 600)).result(5)
    with store.env.begin(write=True) as txn:
        # "b" ran a little ahead of "a"; "late" is far behind both
        txn.put(b"cursor/a", encode_u64(101), db=store.db("meta"))
        txn.put(b"cursor/b", encode_u64(111), db=store.db("meta"))
    a, b, late = _Named(store, "a"), _Named(store, "b"), _Named(store, "late")
    runner = ProcessorRunner(store, writer, [a, b, late], batch_events=40)
    try:
        while await runner.run_once():
            pass
        with store.read() as txn:
            assert [read_cursor(txn, store, n) for n in ("a", "b", "late")] == [601] * 3
        # "b" waited for "a" to catch up; "late" did not hold either back
        assert a.rounds[0][0] == 101 and b.rounds[0][0] == 111
        assert late.rounds[0][0] == 1
        # each event was parsed once for "a" and "b" together, once for "late"
        assert len(parsed) <= 500 + 600 + 40
        assert len(parsed) < 2 * 500 + 600
    finally:
        await writer.shutdown()
        store.close()


async def test_processor_resumes_from_its_cursor_after_restart(tmp_path: Path) -> None:
    for round_ in range(2):
        store = Store(cfg(tmp_path))
        store.open()
        writer = StoreWriter(store, cfg(tmp_path))
        await writer.start()
        proc = _Recorder(store)
        runner = ProcessorRunner(store, writer, [proc])
        await runner.start()
        writer.submit_events(items(f"r{round_}-", 5)).result(5)
        await runner.wait_idle(10)
        with store.read() as txn:
            n = txn.stat(store.db("requests"))["entries"]
            cursor = read_cursor(txn, store, "recorder")
        assert (n, cursor) == (5 * (round_ + 1), 5 * (round_ + 1) + 1)
        await runner.shutdown()
        await writer.shutdown()
        store.close()


async def test_history_appends_in_order(tmp_path: Path) -> None:
    store = Store(cfg(tmp_path))
    store.open()
    writer = StoreWriter(store, cfg(tmp_path))
    await writer.start()
    try:
        for i in range(3):
            await writer.run(lambda txn, i=i: append_history(txn, store, "trigger", reason=f"r{i}"))
        with store.read() as txn:
            docs = list(read_history(txn, store))
            newest = list(read_history(txn, store, newest_first=True, limit=1))
        assert [d["reason"] for d in docs] == ["r0", "r1", "r2"]
        assert [d["seq"] for d in docs] == [1, 2, 3]
        assert newest[0]["reason"] == "r2"
    finally:
        await writer.shutdown()
        store.close()


@pytest.fixture
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    mnt = tmp_path / "small"
    mnt.mkdir()
    rc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True
    )
    if rc.returncode != 0:
        pytest.fail(f"this test mounts a 3 MiB tmpfs and needs root: {rc.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_full_disk_fails_the_write_cleanly_and_store_stays_usable(small_disk: Path) -> None:
    async with running(cfg(small_disk / "data", map_size_bytes=64 << 20)) as (store, writer):
        acked = 0
        error = None
        for b in range(400):
            batch = [(f"k{b}-{i}".encode(), b"z" * 4000) for i in range(10)]
            try:
                acked += writer.submit_events(batch).result(10).accepted
            except StoreFullError as exc:
                error = exc
                break
        assert error is not None and "disk full" in str(error)
        with store.read() as txn:
            assert txn.stat(store.db("events"))["entries"] == acked

        # the control plane keeps working: small metadata writes still go through
        # once a little space is freed
        def forget(txn: lmdb.Transaction) -> int:
            cur = txn.cursor(db=store.db("events"))
            n = 0
            while cur.first() and n < 50:
                cur.delete()
                n += 1
            return n

        assert await writer.run(forget) == 50
        assert writer.submit_events([(b"after", b"small")]).result(10).accepted == 1


async def test_duplicates_mixed_into_a_batch_keep_the_log_dense(tmp_path: Path) -> None:
    store = Store(cfg(tmp_path))
    store.open()
    writer = StoreWriter(store, cfg(tmp_path))
    await writer.start()
    try:
        writer.submit_events(items("m", 5)).result(5)  # m0..m4 -> seq 1..5
        mixed = [
            *items("m", 2),
            *items("n", 2),
            (b"n0", b"again"),
            *items("m", 5)[4:],
            (b"o", b"x"),
        ]
        res = writer.submit_events(mixed).result(5)
        assert (res.accepted, res.duplicates, res.first_seq, res.last_seq) == (3, 4, 6, 8)
        with store.read() as txn:
            keys = [int.from_bytes(k, "big") for k, _ in txn.cursor(db=store.db("events"))]
            assert keys == list(range(1, 9))
            # every id points at its own event
            for eid, want in ((b"n0", 6), (b"n1", 7), (b"o", 8), (b"m0", 1)):
                raw = txn.get(eid, db=store.db("event_ids"))
                assert int.from_bytes(raw[:8], "big") == want
    finally:
        await writer.shutdown()
        store.close()


class _Slow(_Recorder):
    name = "slow"

    def process(
        self, txn: lmdb.Transaction, seq: int, ingest_ms: int, event: events_pb2.Event
    ) -> None:
        time.sleep(0.0005)
        super().process(txn, seq, ingest_ms, event)


async def test_processor_rounds_are_time_boxed_and_resume_exactly(tmp_path: Path) -> None:
    store = Store(cfg(tmp_path))
    store.open()
    writer = StoreWriter(store, cfg(tmp_path))
    await writer.start()
    proc = _Slow(store)
    # not started: rounds are driven by hand
    runner = ProcessorRunner(store, writer, [proc], batch_events=5000, job_budget_seconds=0.01)
    try:
        writer.submit_events(items("t", 600)).result(5)
        more = await runner.run_once()
        with store.read() as txn:
            first = read_cursor(txn, store, "slow") - 1
            stored = txn.stat(store.db("requests"))["entries"]
        assert more is True
        assert 0 < first < 600  # cut short by the budget, not by the batch size
        assert stored == first  # the cursor says exactly what the view holds
        rounds = 1
        while await runner.run_once():
            rounds += 1
        with store.read() as txn:
            assert read_cursor(txn, store, "slow") == 601
            assert txn.stat(store.db("requests"))["entries"] == 600
        assert rounds >= 2
    finally:
        await writer.shutdown()
        store.close()


async def test_a_caller_that_gives_up_does_not_stop_the_writer(tmp_path: Path) -> None:
    store = Store(cfg(tmp_path))
    store.open()
    writer = StoreWriter(store, cfg(tmp_path))
    await writer.start()
    try:
        gate = asyncio.Event()
        loop = asyncio.get_running_loop()

        def slow(txn: lmdb.Transaction) -> str:
            asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(5)
            return "slow"

        blocker = writer.submit(slow)
        # queued behind the blocker; their callers give up before they run
        abandoned = [asyncio.ensure_future(writer.run(lambda txn: "x")) for _ in range(5)]
        await asyncio.sleep(0.05)
        for task in abandoned:
            task.cancel()
        gate.set()
        assert await asyncio.wait_for(asyncio.wrap_future(blocker), 5) == "slow"
        # the writer keeps serving
        assert await writer.run(lambda txn: "after") == "after"
        assert writer.submit_events(items("c", 3)).result(5).accepted == 3
    finally:
        await writer.shutdown()
        store.close()


async def test_async_ingest_results_come_back_per_batch_in_one_commit(tmp_path: Path) -> None:
    store = Store(cfg(tmp_path))
    store.open()
    writer = StoreWriter(store, cfg(tmp_path))
    not_running = writer.submit_events_async(items("n", 1))
    with pytest.raises(StoreError, match="not running"):
        await not_running
    await writer.start()
    try:
        gate = asyncio.Event()
        loop = asyncio.get_running_loop()

        holding = threading.Event()

        def hold(txn: lmdb.Transaction) -> None:
            holding.set()
            asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(5)

        commits = writer.stats.commits
        blocker = writer.submit(hold)
        assert await asyncio.to_thread(holding.wait, 5)
        # queued while the writer is held: all of them go into the next commit
        futs = [writer.submit_events_async(items(f"b{k}-", k + 1)) for k in range(6)]
        futs.append(writer.submit_events_async(items("b0-", 1)))  # a resend: duplicate
        gone = writer.submit_events_async(items("gone", 2))
        gone.cancel()  # its caller gave up before the commit
        gate.set()
        await asyncio.wrap_future(blocker)
        results = await asyncio.gather(*futs)
        assert writer.stats.commits == commits + 2
        assert [r.accepted for r in results] == [1, 2, 3, 4, 5, 6, 0]
        assert results[-1].duplicates == 1
        # numbered in submission order, back to back
        for prev, cur in itertools.pairwise(results[:-1]):
            assert cur.first_seq == prev.last_seq + 1
        assert gone.cancelled()
        with store.read() as txn:
            assert txn.stat(store.db("events"))["entries"] == 21
    finally:
        await writer.shutdown()
        store.close()


async def test_async_ingest_failure_reaches_the_caller(small_disk: Path) -> None:
    async with running(cfg(small_disk / "data", map_size_bytes=64 << 20)) as (_store, writer):
        with pytest.raises(StoreFullError, match="disk full"):
            for b in range(400):
                await writer.submit_events_async(
                    [(f"k{b}-{i}".encode(), b"z" * 4000) for i in range(10)]
                )
        # the writer and the loop keep serving
        assert await writer.run(lambda txn: "ok") == "ok"


async def test_numbering_continues_past_the_cursors_when_retention_emptied_the_log(
    tmp_path: Path,
) -> None:
    config = cfg(tmp_path, sync=False)
    async with running(config) as (store, writer):
        assert writer.submit_events(items("a", 5)).result(10).last_seq == 5

        def processed_then_trimmed(txn: lmdb.Transaction) -> None:
            txn.put(b"cursor/scoring", encode_u64(6), db=store.db("meta"))
            cur = txn.cursor(db=store.db("events"))
            while cur.first():
                cur.delete()

        await writer.run(processed_then_trimmed)
    async with running(config) as (store, writer):
        # numbered from 1 again, these would sit behind the cursor and never be read
        result = writer.submit_events(items("b", 2)).result(10)
        assert (result.first_seq, result.last_seq) == (6, 7)
        with store.read() as txn:
            assert read_cursor(txn, store, "scoring") == 6


async def test_store_health_lifecycle(tmp_path: Path) -> None:
    changes: list[bool] = []

    async def set_serving(serving: bool) -> None:
        changes.append(serving)

    config = cfg(tmp_path, sync=False)
    async with running(config) as (store, writer):
        health = StoreHealth(store, writer, config, set_serving)
        await health.shutdown()  # before start: nothing to stop
        await health.start()
        await health.shutdown()
        await health.shutdown()  # twice
    assert changes == [] and health.status()["serving"] is True
