"""What the store's files say about themselves, read before LMDB maps them.

LMDB maps ``data.mdb`` and trusts it: a file cut shorter than its last
commit makes the first read of a missing page a SIGBUS (the process dies
with no message), and a file cut to zero bytes opens as a brand-new empty
environment (everything is silently gone). So before opening, the store
reads LMDB's own record of the file from its two meta pages and compares
it with the file, and a marker file beside the environment says whether
this data dir ever held a store.

The meta page layout is LMDB's (``mdb.c``, 64-bit builds): page 0 and page 1
each start with a 16-byte page header (``mp_pgno`` u64, ``mp_pad`` u16,
``mp_flags`` u16, 4 bytes of bounds), then ``MDB_meta``::

    +0   mm_magic    u32   0xBEEFC0DE
    +4   mm_version  u32   1
    +8   mm_address  u64
    +16  mm_mapsize  u64
    +24  mm_dbs[2]   2 x MDB_db (48 bytes each); mm_dbs[0].md_pad is the page size
    +120 mm_last_pg  u64   last page number used by the commit
    +128 mm_txnid    u64   the commit that wrote this meta page

LMDB uses the meta page with the higher ``mm_txnid``; so does this module.
"""

from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from sidecar._private import open_private
from sidecar.errors import StoreCorruptError

__all__ = ["MARKER_FILE", "LmdbMeta", "check_files", "read_meta", "write_marker"]

#: Written beside the environment once a store has been created in a data
#: dir. With it present, a missing or empty ``data.mdb`` is data loss, not a
#: fresh start.
MARKER_FILE = "INITIALIZED"

_MAGIC = 0xBEEFC0DE
_VERSION = 1
_PAGE_HEADER = 16
_META = struct.Struct("<IIQQ")  # magic, version, address, mapsize
_PSIZE_AT = 24  # mm_dbs[FREE_DBI].md_pad
_TAIL_AT = 120  # mm_last_pg, mm_txnid
_TAIL = struct.Struct("<QQ")
_META_BYTES = _TAIL_AT + _TAIL.size
_MIN_PAGE = 512  # LMDB refuses smaller pages; the first meta page lies in the first 512 bytes


@dataclass(frozen=True, slots=True)
class LmdbMeta:
    """The newer of the two meta pages: what the last commit left."""

    page_size: int
    map_size: int
    last_page: int
    txnid: int

    @property
    def needed_bytes(self) -> int:
        """The file size the last commit needs: every page up to ``last_page``."""
        return (self.last_page + 1) * self.page_size


def _parse(page: bytes) -> LmdbMeta | None:
    if len(page) < _PAGE_HEADER + _META_BYTES:
        return None
    magic, version, _addr, mapsize = _META.unpack_from(page, _PAGE_HEADER)
    if magic != _MAGIC or version != _VERSION:
        return None
    (psize,) = struct.unpack_from("<I", page, _PAGE_HEADER + _PSIZE_AT)
    last_pg, txnid = _TAIL.unpack_from(page, _PAGE_HEADER + _TAIL_AT)
    if psize < _MIN_PAGE or psize & (psize - 1):
        return None
    return LmdbMeta(page_size=psize, map_size=mapsize, last_page=last_pg, txnid=txnid)


def read_meta(path: Path) -> LmdbMeta:
    """The meta record of the LMDB file ``path`` (reads, never maps).

    Raises:
        StoreCorruptError: neither meta page is valid (the file names itself).
    """
    with open(path, "rb") as f:
        first = f.read(_MIN_PAGE)
        meta0 = _parse(first)
        size = os.fstat(f.fileno()).st_size
        meta1 = None
        if meta0 is not None:
            f.seek(meta0.page_size)
            meta1 = _parse(f.read(_PAGE_HEADER + _META_BYTES))
    if meta0 is None:
        raise StoreCorruptError(
            f"{path} is not a readable LMDB file ({size} bytes): its first meta page "
            "is damaged or missing; restore it from a backup, or move the data dir aside"
        )
    if meta1 is None or meta1.page_size != meta0.page_size:
        # page 1 damaged or cut off: LMDB would fall back to page 0 as well
        return meta0
    return meta1 if meta1.txnid > meta0.txnid else meta0


def check_files(data_dir: Path, data_file: Path) -> bool:
    """Refuses a data dir whose store was lost or cut short; says whether
    ``data_file`` held committed data before this open (an environment whose
    first commit never happened, say after a crash at the very first start,
    counts as new).

    Raises:
        StoreCorruptError: the marker says a store was created here but
            ``data_file`` is missing or empty, or ``data_file`` is shorter than
            its last commit needs (mapping it would crash the process).
    """
    marker = data_dir / MARKER_FILE
    try:
        size: int | None = data_file.stat().st_size
    except FileNotFoundError:
        size = None
    if not size:
        if marker.exists():
            state = "missing" if size is None else "empty (0 bytes)"
            raise StoreCorruptError(
                f"{data_file} is {state}, but {marker} records that a store was created "
                "in this data dir: its data is lost. Restore the file from a backup, or "
                "move the data dir aside to start with an empty store"
            )
        return False
    meta = read_meta(data_file)
    if size < meta.needed_bytes:
        raise StoreCorruptError(
            f"{data_file} is truncated: it has {size} bytes, but its last commit "
            f"(transaction {meta.txnid}) needs {meta.needed_bytes} bytes "
            f"({meta.last_page + 1} pages of {meta.page_size}). Restore the file from a "
            "backup, or move the data dir aside to start with an empty store"
        )
    return meta.txnid > 0


def write_marker(data_dir: Path, schema_version: int) -> None:
    """Records, durably, that this data dir now holds a store."""
    marker = data_dir / MARKER_FILE
    if marker.exists():
        return
    tmp = data_dir / f".{MARKER_FILE}.tmp"
    doc = {
        "store": "atlas-sidecar",
        "schema_version": schema_version,
        "created_ms": time.time_ns() // 1_000_000,
    }
    with open_private(tmp, "w") as f:
        f.write(json.dumps(doc) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, marker)
    fd = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
