"""The LMDB environment: one per data dir, named databases, schema version."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb

from sidecar._private import PRIVATE_FILE_MODE, make_private_dir
from sidecar.config import StoreConfig
from sidecar.errors import DataDirLockedError, SchemaVersionError, StoreCorruptError, StoreError
from sidecar.store._codec import decode_u64, encode_u64
from sidecar.store._meta import check_files, write_marker

__all__ = ["CORRUPTION_ERRORS", "DB_NAMES", "SCHEMA_VERSION", "Store"]

log = logging.getLogger(__name__)

#: Bumped when a stored layout changes incompatibly. A data dir with a newer
#: version is refused; an older one would be migrated here.
SCHEMA_VERSION = 1

#: Every named database of DESIGN.md section 4, created at open (empty until
#: the stage that owns it writes). ``dead_letters`` holds events a processor
#: could not handle, with the reason; ``history`` is the
#: append-only learning history (see ``_history.py``); ``windows`` orders
#: open requests by the end of their reward window, ``closed`` orders closed
#: requests by when their record is forgotten and ``prompts`` indexes scored
#: answers by prompt (all three owned by scoring).
DB_NAMES: tuple[str, ...] = (
    "events",
    "event_ids",
    "requests",
    "samples",
    "pairs",
    "priority",
    "memory",
    "holdout",
    "models",
    "rollouts",
    "directives",
    "dead_letters",
    "history",
    "windows",
    "prompts",
    "closed",
    "meta",
)

_SCHEMA_KEY = b"schema_version"

#: LMDB errors that mean the file itself is damaged (a page that is not what
#: its parent says, a page past the end, a meta page that failed to write).
#: Retrying cannot help; writing on may spread the damage.
CORRUPTION_ERRORS: tuple[type[lmdb.Error], ...] = (
    lmdb.CorruptedError,
    lmdb.PageNotFoundError,
    lmdb.PanicError,
    lmdb.InvalidError,
    lmdb.BadChecksumError,
    lmdb.IncompatibleError,
)

#: Called once, from whichever thread found it, when the store turns out to
#: be damaged while the daemon runs.
FatalHandler = Callable[[StoreCorruptError], None]


class _SharedExclusiveLock:
    """Many readers or one exclusive holder (map resizing).

    ``set_mapsize`` is only safe while no transaction is open in the process,
    so readers take the shared side and the resize takes the exclusive side.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._exclusive = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class Store:
    """Owns the LMDB environment of one data dir.

    Only the :class:`~sidecar.store.StoreWriter` thread writes; any thread may
    read through :meth:`read`. The data dir is locked (``flock``) for the life
    of the process, so a second sidecar on the same dir is refused.

    A damaged page met by :meth:`read` or :meth:`write_txn` raises
    :class:`StoreCorruptError` naming the file, and ``on_fatal`` is called
    once with it (the daemon stops with a clear message then).
    """

    def __init__(self, config: StoreConfig, *, on_fatal: FatalHandler | None = None) -> None:
        self._config = config
        self._env: lmdb.Environment | None = None
        self._dbs: dict[str, Any] = {}
        self._lock_fd: int | None = None
        self._resize = _SharedExclusiveLock()
        self._on_fatal = on_fatal
        self._fatal_lock = threading.Lock()
        self.corrupt: StoreCorruptError | None = None
        self.data_dir = Path(config.data_dir)

    @property
    def data_file(self) -> Path:
        """The LMDB file holding every database."""
        return self.data_dir / "lmdb" / "data.mdb"

    # -- lifecycle -------------------------------------------------------

    def open(self) -> None:
        """Locks the data dir, opens the environment, checks the schema.

        Raises:
            DataDirLockedError: another process holds the data dir.
            SchemaVersionError: the data was written by a newer schema.
            StoreCorruptError: the store's file is lost, truncated or damaged
                (the message names the file).
            StoreError: the environment cannot be opened.
        """
        if self._env is not None:
            return
        try:
            self._warn_if_shared()
            make_private_dir(self.data_dir)
            make_private_dir(self.data_dir / "lmdb")
        except OSError as exc:
            raise StoreError(f"cannot create data dir {self.data_dir}: {exc.strerror}") from exc
        self.lock_data_dir()
        try:
            existed = check_files(self.data_dir, self.data_file)
        except BaseException:
            self.close()
            raise
        try:
            self._env = lmdb.open(
                str(self.data_dir / "lmdb"),
                map_size=self._config.map_size_bytes,
                max_dbs=len(DB_NAMES) + 8,
                max_readers=512,
                sync=self._config.sync,
                metasync=self._config.sync,
                writemap=False,
                readahead=False,
                subdir=True,
                mode=PRIVATE_FILE_MODE,
            )
            self._make_files_private()
            self._env.reader_check()
            with self._env.begin(write=True) as txn:
                for name in DB_NAMES:
                    self._dbs[name] = self._env.open_db(name.encode(), txn=txn)
                self._check_schema(txn, existed)
            self._check_ends()
            write_marker(self.data_dir, SCHEMA_VERSION)
        except CORRUPTION_ERRORS as exc:
            self.close()
            raise StoreCorruptError(
                f"{self.data_file} is damaged: {exc}. Run `atlas-sidecar check --data-dir "
                f"{self.data_dir}` for details; restore the file from a backup"
            ) from exc
        except lmdb.Error as exc:
            self.close()
            raise StoreError(f"cannot open store in {self.data_dir}: {exc}") from exc
        except OSError as exc:
            self.close()
            raise StoreError(f"cannot open store in {self.data_dir}: {exc}") from exc
        except StoreError:
            self.close()
            raise

    def close(self) -> None:
        """Closes the environment and releases the data dir. Safe to call twice."""
        if self._env is not None:
            with self._resize.exclusive():
                self._env.close()
            self._env = None
            self._dbs.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _warn_if_shared(self) -> None:
        """Warns, naming the mode, when an existing data dir lets others in.

        The mode is not changed: an operator may have opened it on purpose
        (a backup user's group), and the files inside are 0600 anyway.
        """
        try:
            mode = stat.S_IMODE(self.data_dir.stat().st_mode)
        except FileNotFoundError:
            return
        if mode & 0o077:
            log.warning(
                "data dir %s has mode %04o: users other than its owner can list it "
                "(it holds prompts and responses); chmod 700 it",
                self.data_dir,
                mode,
                extra={"data_dir": str(self.data_dir), "mode": f"{mode:04o}"},
            )

    def _make_files_private(self) -> None:
        # LMDB creates its files with the given mode, but files made by an
        # older version (or restored from a backup) keep theirs: tighten them.
        for name in ("data.mdb", "lock.mdb"):
            path = self.data_dir / "lmdb" / name
            with contextlib.suppress(FileNotFoundError):
                if stat.S_IMODE(path.stat().st_mode) != PRIVATE_FILE_MODE:
                    os.chmod(path, PRIVATE_FILE_MODE)

    def lock_data_dir(self) -> None:
        """Takes the data dir's lock (released by :meth:`close`).

        Raises:
            DataDirLockedError: another process holds it.
        """
        path = self.data_dir / "LOCK"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE)
        os.fchmod(fd, PRIVATE_FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                # The pid written in LOCK is whoever locked it last; the
                # holder now may be any process (a backup tool, a second
                # sidecar that never wrote it), so no pid is named.
                raise DataDirLockedError(
                    f"data dir {self.data_dir} is held by another sidecar or process "
                    f"(it holds the lock on {path}); stop it, or point --data-dir elsewhere"
                ) from exc
            raise StoreError(f"cannot lock data dir {self.data_dir}: {exc.strerror}") from exc
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _check_schema(self, txn: lmdb.Transaction, existed: bool) -> None:
        meta = self._dbs["meta"]
        raw = txn.get(_SCHEMA_KEY, db=meta)
        if raw is None:
            if existed:
                # An environment that was there before this open always has
                # the schema marker: without it, this is not our store, or
                # its meta database was lost.
                raise StoreCorruptError(
                    f"{self.data_file} holds an LMDB environment without atlas-sidecar's "
                    f"schema marker (meta key {_SCHEMA_KEY.decode()!r}); refusing to "
                    "start on it. Restore the file from a backup, or move the data dir aside"
                )
            txn.put(_SCHEMA_KEY, encode_u64(SCHEMA_VERSION), db=meta)
            return
        found = decode_u64(raw)
        if found > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"data dir {self.data_dir} has schema version {found}, newer than this "
                f"atlas-sidecar supports ({SCHEMA_VERSION}); upgrade atlas-sidecar or "
                "point --data-dir elsewhere"
            )

    def _check_ends(self) -> None:
        """Reads both ends of every database: a damaged page on the path to
        the first or last entry shows at start, not at the first request.
        (The whole file is read by ``atlas-sidecar check``.)"""
        with self.env.begin(buffers=False) as txn:
            for name in DB_NAMES:
                db = self._dbs[name]
                txn.stat(db)
                with txn.cursor(db=db) as cur:
                    if cur.first():
                        cur.item()
                    if cur.last():
                        cur.item()

    def fatal(self, exc: lmdb.Error, where: str) -> StoreCorruptError:
        """The error to raise for a damaged page met in ``where``; tells
        ``on_fatal`` the first time."""
        err = StoreCorruptError(
            f"{self.data_file} is damaged ({where}: {exc}). Run `atlas-sidecar check "
            f"--data-dir {self.data_dir}` for details; restore the file from a backup"
        )
        with self._fatal_lock:
            first = self.corrupt is None
            if first:
                self.corrupt = err
        if first and self._on_fatal is not None:
            self._on_fatal(err)
        return self.corrupt or err

    # -- access ----------------------------------------------------------

    @property
    def env(self) -> lmdb.Environment:
        if self._env is None:
            raise StoreError("store is not open")
        return self._env

    def db(self, name: str) -> Any:
        """The handle of a named database (see :data:`DB_NAMES`)."""
        try:
            return self._dbs[name]
        except KeyError:
            raise StoreError(
                f"unknown database {name!r} (store open: {self._env is not None})"
            ) from None

    @contextlib.contextmanager
    def map_pinned(self) -> Iterator[bool]:
        """Keeps the memory map where it is (no resize, no close) inside the
        block; yields whether the store is open."""
        with self._resize.shared():
            yield self._env is not None

    @contextlib.contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        """A short read transaction. Keep it short: long readers stop page reuse.

        Raises:
            StoreCorruptError: a damaged page was met inside the block.
        """
        try:
            with self._resize.shared(), self.env.begin(buffers=False) as txn:
                yield txn
        except CORRUPTION_ERRORS as exc:
            raise self.fatal(exc, "read") from exc

    @contextlib.contextmanager
    def write_txn(self) -> Iterator[lmdb.Transaction]:
        """A write transaction; only the writer thread may call this.

        Raises:
            StoreCorruptError: a damaged page was met, or the commit failed so
                that LMDB will not write again (its meta page did not update).
        """
        try:
            with self._resize.shared(), self.env.begin(write=True) as txn:
                yield txn
        except CORRUPTION_ERRORS as exc:
            raise self.fatal(exc, "write") from exc

    @property
    def schema_version(self) -> int:
        with self.read() as txn:
            raw = txn.get(_SCHEMA_KEY, db=self._dbs["meta"])
        return decode_u64(raw) if raw else 0

    def grow(self) -> bool:
        """Doubles the map size, up to the configured maximum and the free disk.

        Returns False when it cannot grow. Must be called with no transaction
        open on the calling thread (the writer calls it between commits).
        """
        env = self.env
        current = int(env.info()["map_size"])
        limit = self._config.map_size_max_bytes
        if current >= limit:
            return False
        new = min(current * 2, limit)
        with self._resize.exclusive():
            env.set_mapsize(new)
        return True

    def stats(self) -> dict[str, int]:
        """Sizes for status: entries in the log, bytes used, map size, free disk."""
        env = self.env
        info = env.info()
        stat = env.stat()
        with self.read() as txn:
            log = txn.stat(self._dbs["events"])
        used = (int(info["last_pgno"]) + 1) * int(stat["psize"])
        free = shutil.disk_usage(self.data_dir).free
        return {
            "log_events": int(log["entries"]),
            "used_bytes": used,
            "map_size_bytes": int(info["map_size"]),
            "disk_free_bytes": int(free),
        }
