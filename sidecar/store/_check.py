"""Offline verification of a data dir (``atlas-sidecar check``).

Reads every named database end to end and checks that the databases agree
with each other. It takes the data dir's lock, so it refuses to run beside
a daemon, and it never writes to the environment.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from sidecar.config import StoreConfig
from sidecar.errors import StoreCorruptError
from sidecar.store._codec import CURSOR_PREFIX, decode_u64
from sidecar.store._env import DB_NAMES, SCHEMA_VERSION, Store
from sidecar.store._meta import MARKER_FILE, check_files, read_meta

__all__ = ["CheckReport", "check_store"]

_SCHEMA_KEY = b"schema_version"


@dataclass(slots=True)
class CheckReport:
    """What was checked (one line each) and what is wrong (empty: all good)."""

    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_store(data_dir: Path, *, progress: Callable[[str], None] | None = None) -> CheckReport:
    """Verifies the store in ``data_dir``; problems are listed, never raised.

    Raises:
        DataDirLockedError: a daemon (or another process) holds the data dir.
    """
    report = CheckReport()
    say = progress or (lambda _line: None)

    def checked(line: str) -> None:
        report.checked.append(line)
        say(f"ok    {line}")

    def problem(line: str) -> None:
        report.problems.append(line)
        say(f"FAIL  {line}")

    store = Store(StoreConfig(data_dir=data_dir))
    store.lock_data_dir()
    try:
        data_file = store.data_file
        try:
            existed = check_files(data_dir, data_file)
        except StoreCorruptError as exc:
            problem(str(exc))
            return report
        if not existed:
            problem(f"{data_file}: no store here (the file is missing or empty)")
            return report
        meta = read_meta(data_file)
        size = data_file.stat().st_size
        checked(
            f"{data_file}: {size} bytes, last commit {meta.txnid} needs "
            f"{meta.needed_bytes} ({meta.last_page + 1} pages of {meta.page_size})"
        )
        if not (data_dir / MARKER_FILE).exists():
            # a store made before the marker existed; serve writes it
            checked(f"{data_dir / MARKER_FILE}: not there yet (the next start writes it)")
        _check_env(data_dir, data_file, meta.map_size, checked, problem)
    finally:
        store.close()
    return report


def _check_env(
    data_dir: Path,
    data_file: Path,
    map_size: int,
    checked: Callable[[str], None],
    problem: Callable[[str], None],
) -> None:
    try:
        env = lmdb.open(
            str(data_file.parent),
            map_size=map_size,
            max_dbs=len(DB_NAMES) + 8,
            readonly=True,
            lock=False,
            readahead=False,
            subdir=True,
        )
    except lmdb.Error as exc:
        problem(f"{data_file}: LMDB cannot open it: {exc}")
        return
    try:
        # one transaction per database: after LMDB meets a damaged page the
        # transaction is spent, and the other databases are still worth
        # reading. (A handle opened in a read-only transaction lives only as
        # long as that transaction.)
        counts: dict[str, int] = {}
        for name in DB_NAMES:
            with env.begin(buffers=True) as txn:
                db = _open(env, txn, name, problem)
                n = _walk(txn, db, name, checked, problem) if db is not None else None
            if n is not None:
                counts[name] = n
        if {"meta", "events", "event_ids"} <= counts.keys():
            with env.begin(buffers=True) as txn:
                dbs = {n: env.open_db(n.encode(), txn=txn, create=False) for n in counts}
                _check_meta(txn, dbs, counts, checked, problem)
    except lmdb.Error as exc:
        problem(f"{data_file}: {exc}")
    finally:
        env.close()


def _open(
    env: lmdb.Environment, txn: lmdb.Transaction, name: str, problem: Callable[[str], None]
) -> Any:
    try:
        return env.open_db(name.encode(), txn=txn, create=False)
    except lmdb.NotFoundError:
        problem(f"database {name!r}: missing")
    except lmdb.Error as exc:
        problem(f"database {name!r}: cannot open: {exc}")
    return None


def _walk(
    txn: lmdb.Transaction,
    db: Any,
    name: str,
    checked: Callable[[str], None],
    problem: Callable[[str], None],
) -> int | None:
    """Reads every entry of ``db``; the count, or None when it is unreadable."""
    try:
        expected = int(txn.stat(db)["entries"])
        n = 0
        previous = b""
        with txn.cursor(db=db) as cur:
            for key, value in cur:
                raw = bytes(key)
                if n and raw <= previous:
                    problem(f"database {name!r}: keys out of order after entry {n}")
                    return None
                previous = raw
                len(value)  # touches the value's pages (overflow pages too)
                n += 1
    except lmdb.Error as exc:
        problem(f"database {name!r}: unreadable: {exc}")
        return None
    if n != expected:
        problem(f"database {name!r}: {n} entries read, but its header says {expected}")
        return None
    checked(f"database {name!r}: {n} entries read end to end")
    return n


def _check_meta(
    txn: lmdb.Transaction,
    dbs: dict[str, Any],
    counts: dict[str, int],
    checked: Callable[[str], None],
    problem: Callable[[str], None],
) -> None:
    meta = dbs["meta"]
    raw = txn.get(_SCHEMA_KEY, db=meta)
    if raw is None or len(raw) != 8:
        problem("meta: the schema version is missing")
    elif decode_u64(raw) > SCHEMA_VERSION:
        problem(f"meta: schema version {decode_u64(raw)} is newer than {SCHEMA_VERSION}")
    else:
        checked(f"meta: schema version {decode_u64(raw)}")
    events, ids = dbs["events"], dbs["event_ids"]
    with txn.cursor(db=events) as cur:
        first = decode_u64(cur.key()) if cur.first() else 0
        last = decode_u64(cur.key()) if cur.last() else 0
    # every remembered id points at an event still in the log (an id is
    # forgotten when its event is trimmed)
    dangling = 0
    with txn.cursor(db=ids) as cur:
        for _eid, value in cur:
            if len(value) < 8:
                dangling += 1
                continue
            seq = decode_u64(value)
            if txn.get(bytes(value[:8]), db=events) is None and not (first and seq < first):
                dangling += 1
    if dangling:
        problem(f"event_ids: {dangling} ids point at events that are not in the log")
    elif counts["event_ids"] > counts["events"]:
        problem(f"event_ids: {counts['event_ids']} ids for {counts['events']} events in the log")
    else:
        checked(
            f"event_ids: {counts['event_ids']} ids, each pointing at one of the "
            f"{counts['events']} events (seq {first}..{last})"
        )
    # a processor's cursor is the next sequence number it will read: never
    # past the one the log will give next
    nxt = last + 1
    with txn.cursor(db=meta) as cur:
        if cur.set_range(CURSOR_PREFIX):
            for key, value in cur:
                k = bytes(key)
                if not k.startswith(CURSOR_PREFIX):
                    break
                name = k[len(CURSOR_PREFIX) :].decode(errors="replace")
                if len(value) != 8:
                    problem(f"cursor {name!r}: {len(value)} bytes, expected 8")
                    continue
                seq = decode_u64(value)
                if counts["events"] and seq > nxt:
                    problem(
                        f"cursor {name!r} is at seq {seq}, beyond the log's end (next seq {nxt})"
                    )
                else:
                    checked(f"cursor {name!r}: seq {seq} (log ends at {last})")
