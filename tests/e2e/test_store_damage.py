"""A damaged data dir: `serve` refuses it by name, `check` says what is wrong.

Each test writes a real store, damages its file the way a disk or an
operator would (cut to zero, cut in half, bytes flipped in a page), then
runs the real `atlas-sidecar serve` and `atlas-sidecar check` subprocesses.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
import subprocess
import sys
from pathlib import Path

import grpc
import lmdb
import pytest
from atlas_sidecar_client.pb import admin_pb2

from sidecar.config import StoreConfig
from sidecar.store import MARKER_FILE, Store, encode_u64, read_meta
from sidecar.testing import DaemonProcess
from tests._helpers import running_store
from tests.conftest import inference
from tests.integration.test_learning_daemon import Client, traffic, write_config

EVENTS = 3000
_P_LEAF = 0x02


def make_store(data_dir: Path, events: int = EVENTS) -> Path:
    """A store with ``events`` inference events; returns its data.mdb."""

    async def write() -> None:
        async with running_store(StoreConfig(data_dir=data_dir, sync=False)) as (_s, writer):
            for start in range(0, events, 500):
                batch = [
                    (
                        f"e{i}".encode(),
                        inference(f"e{i}", f"req-{i:06d}", prompt="p" * 40).SerializeToString(),
                    )
                    for i in range(start, min(start + 500, events))
                ]
                await writer.submit_events_async(batch)

    asyncio.run(write())
    return data_dir / "lmdb" / "data.mdb"


def serve(data_dir: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Runs `serve` on ``data_dir``; expects it to exit by itself."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar.cli",
            "serve",
            "--data-dir",
            str(data_dir),
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "",
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "check", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def events_leaf_page(data_file: Path, seq: int) -> int:
    """The number of the events leaf page that holds ``seq``."""
    data = data_file.read_bytes()
    psize = read_meta(data_file).page_size
    key = encode_u64(seq)
    for no in range(2, len(data) // psize):
        page = data[no * psize : (no + 1) * psize]
        (flags,) = struct.unpack_from("<H", page, 10)
        # an events leaf page holds 8-byte seq keys next to the events' own bytes
        if flags == _P_LEAF and key in page and b"req-" in page:
            return no
    raise AssertionError(f"no events leaf page holds seq {seq}")


def flip_page_header(data_file: Path, page_no: int) -> None:
    """Inverts the 16-byte header of one page (page number, flags, bounds)."""
    psize = read_meta(data_file).page_size
    with open(data_file, "r+b") as f:
        f.seek(page_no * psize)
        header = f.read(16)
        f.seek(page_no * psize)
        f.write(bytes(b ^ 0xFF for b in header))


def assert_refused(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode not in (0, -7), (proc.returncode, proc.stderr[-2000:])  # -7: SIGBUS
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-2000:])


def test_a_healthy_store_checks_clean(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_store(data)
    proc = check(data)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"database 'events': {EVENTS} entries read end to end" in proc.stdout
    assert f"database 'event_ids': {EVENTS} entries read end to end" in proc.stdout
    assert "ok (" in proc.stdout


def test_data_file_cut_to_zero_is_refused_not_opened_empty(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data_file = make_store(data)
    assert (data / MARKER_FILE).exists()
    os.truncate(data_file, 0)

    proc = serve(data)
    assert_refused(proc, str(data_file), "empty (0 bytes)", "data is lost")
    assert data_file.stat().st_size == 0  # not silently made into a new store
    proc = check(data)
    assert proc.returncode == 3
    assert str(data_file) in proc.stderr and "Traceback" not in proc.stderr

    data_file.unlink()  # a deleted file is the same loss
    assert_refused(serve(data), str(data_file), "is missing")


def test_a_fresh_data_dir_still_starts_empty(tmp_path: Path) -> None:
    data = tmp_path / "fresh"
    store = Store(StoreConfig(data_dir=data))
    store.open()
    store.close()
    assert (data / MARKER_FILE).exists()
    store = Store(StoreConfig(data_dir=data))
    store.open()  # and opens again
    store.close()


def test_an_environment_without_a_commit_starts_as_a_new_store(tmp_path: Path) -> None:
    # a crash at the very first start, after LMDB made the file, before the
    # first commit: the next start is still a first start
    data = tmp_path / "data"
    (data / "lmdb").mkdir(parents=True)
    lmdb.open(str(data / "lmdb"), max_dbs=4).close()
    assert read_meta(data / "lmdb" / "data.mdb").txnid == 0
    store = Store(StoreConfig(data_dir=data))
    store.open()
    assert store.schema_version == 1
    store.close()


def test_an_lmdb_file_without_the_schema_marker_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "lmdb").mkdir(parents=True)
    env = lmdb.open(str(data / "lmdb"), max_dbs=4)
    with env.begin(write=True) as txn:
        txn.put(b"someone", b"else's data")
    env.close()
    assert_refused(serve(data), str(data / "lmdb" / "data.mdb"), "without atlas-sidecar's schema")


def test_data_file_cut_in_half_is_refused_with_both_sizes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data_file = make_store(data)
    full = data_file.stat().st_size
    needed = read_meta(data_file).needed_bytes
    assert needed == full
    half = (full // 2) & ~4095
    os.truncate(data_file, half)

    proc = serve(data)
    assert_refused(proc, str(data_file), "truncated", f"{half} bytes", f"needs {needed} bytes")
    proc = check(data)
    assert proc.returncode == 3
    assert "truncated" in proc.stderr and f"{half} bytes" in proc.stderr


def test_a_damaged_page_on_the_way_to_the_first_event_stops_the_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data_file = make_store(data)
    flip_page_header(data_file, events_leaf_page(data_file, 1))

    proc = serve(data)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert_refused(proc, str(data_file), "is damaged", "atlas-sidecar check --data-dir")
    proc = check(data)
    assert proc.returncode == 3
    assert "database 'events': unreadable" in proc.stderr, proc.stdout + proc.stderr
    # the databases that are intact are still read and reported
    assert "database 'event_ids': 3000 entries read end to end" in proc.stdout


def test_a_damaged_page_found_while_serving_stops_the_daemon_clearly(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data_file = make_store(data)
    # a page in the middle of the log: the start reads both ends and passes;
    # the processors then read the whole log (their cursors are at 1) and meet it
    flip_page_header(data_file, events_leaf_page(data_file, EVENTS // 2))

    proc = serve(data)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert_refused(proc, str(data_file), "is damaged")
    assert "database 'events': unreadable" in check(data).stderr


def test_check_names_inconsistent_databases(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_store(data, events=100)
    env = lmdb.open(str(data / "lmdb"), max_dbs=32)
    with env.begin(write=True) as txn:
        events = env.open_db(b"events", txn=txn)
        meta = env.open_db(b"meta", txn=txn)
        assert txn.delete(encode_u64(50), db=events)  # the id e49 still points at it
        txn.put(b"cursor/scoring", encode_u64(10_000), db=meta)
    env.close()

    proc = check(data)
    assert proc.returncode == 3
    assert "event_ids: 1 ids point at events that are not in the log" in proc.stderr
    assert "cursor 'scoring' is at seq 10000, beyond the log's end (next seq 101)" in proc.stderr


def test_check_refuses_a_data_dir_in_use(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_store(data, events=10)
    store = Store(StoreConfig(data_dir=data))
    store.open()
    try:
        proc = check(data)
    finally:
        store.close()
    assert proc.returncode == 1
    assert "held by another sidecar or process" in proc.stderr


def test_a_foreign_lock_holder_is_reported_without_a_guessed_pid(tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_store(data, events=10)
    lock = data / "LOCK"
    lock.write_text("424242")  # left by an earlier sidecar; not the holder now
    fd = os.open(lock, os.O_RDWR)
    # a foreign holder: this process (no sidecar) takes the lock and writes nothing
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        proc = serve(data)
    finally:
        os.close(fd)
    assert_refused(proc, "held by another sidecar or process", str(lock))
    assert "424242" not in proc.stderr
    assert "pid" not in proc.stderr


@pytest.mark.parametrize("cut", [100, 4096 + 100])
def test_a_file_cut_inside_its_meta_pages_is_refused(tmp_path: Path, cut: int) -> None:
    data = tmp_path / "data"
    data_file = make_store(data, events=10)
    os.truncate(data_file, cut)
    assert_refused(serve(data), str(data_file))


def test_a_damaged_page_met_by_a_request_stops_a_serving_daemon_clearly(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cfg = write_config(
        tmp_path / "c.yaml",
        learning={"sample_count": 1_000_000, "time_interval_seconds": 1_000_000},
    )
    daemon = DaemonProcess(data, config=cfg, http_port=0, log_path=tmp_path / "first.log")
    daemon.start()
    client = Client(daemon.target)
    try:
        client.send(traffic(800))
        client.wait(lambda s: s["samples"] >= 400)
    finally:
        client.close()
        daemon.stop()
    # a page in the middle of the samples: only a full read (an export) meets it
    data_file = data / "lmdb" / "data.mdb"
    env = lmdb.open(str(data / "lmdb"), readonly=True, lock=False, max_dbs=32)
    with env.begin() as txn:
        db = env.open_db(b"samples", txn=txn, create=False)
        values = [bytes(v) for _k, v in txn.cursor(db=db)]
    env.close()
    middle = values[len(values) // 2][:48]
    raw = data_file.read_bytes()
    psize = read_meta(data_file).page_size
    pages = [
        no
        for no in range(2, len(raw) // psize)
        if middle in raw[no * psize : (no + 1) * psize]
        and struct.unpack_from("<H", raw, no * psize + 10)[0] == _P_LEAF
    ]
    assert len(pages) == 1, pages
    flip_page_header(data_file, pages[0])

    log = tmp_path / "second.log"
    daemon = DaemonProcess(data, config=cfg, http_port=0, log_path=log).start()
    try:
        client = Client(daemon.target)
        with pytest.raises(grpc.RpcError):
            list(
                client.admin.ExportSamples(
                    admin_pb2.ExportSamplesRequest(kind=admin_pb2.EXPORT_KIND_SFT), timeout=30
                )
            )
        client.close()
        assert daemon.proc is not None
        assert daemon.proc.wait(30) == 3
    finally:
        daemon.kill()
    stderr = log.read_text()
    assert f"atlas-sidecar: {data_file} is damaged" in stderr, stderr[-2000:]
    assert "Traceback" not in stderr


def test_the_meta_pages_read_by_hand_match_lmdbs_own_record(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data_file = make_store(data, events=1000)
    env = lmdb.open(str(data / "lmdb"), readonly=True, lock=False, max_dbs=32)
    info, psize = env.info(), env.stat()["psize"]
    env.close()
    meta = read_meta(data_file)
    assert (meta.last_page, meta.txnid, meta.page_size) == (
        info["last_pgno"],
        info["last_txnid"],
        psize,
    )
    assert meta.map_size == StoreConfig().map_size_bytes  # what the writer opened it with
