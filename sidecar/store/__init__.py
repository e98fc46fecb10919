"""Durable storage: one LMDB environment, one writer thread, retention."""

from sidecar.store._check import CheckReport, check_store
from sidecar.store._codec import (
    decode_log_value,
    decode_u64,
    encode_log_value,
    encode_u64,
)
from sidecar.store._env import DB_NAMES, SCHEMA_VERSION, FatalHandler, Store
from sidecar.store._health import StoreHealth
from sidecar.store._history import append_history, read_history, trim_history
from sidecar.store._mapped import MappedPages, PageRelease
from sidecar.store._meta import MARKER_FILE, LmdbMeta, read_meta
from sidecar.store._processor import (
    BatchingLogProcessor,
    LogProcessor,
    ProcessorRunner,
    ProcessorStats,
    read_cursor,
)
from sidecar.store._retention import CURSOR_PREFIX, Retention, TrimResult, trim
from sidecar.store._writer import IngestResult, StoreWriter, WriterStats, append_rows

__all__ = [
    "CURSOR_PREFIX",
    "DB_NAMES",
    "MARKER_FILE",
    "SCHEMA_VERSION",
    "BatchingLogProcessor",
    "CheckReport",
    "FatalHandler",
    "IngestResult",
    "LmdbMeta",
    "LogProcessor",
    "MappedPages",
    "PageRelease",
    "ProcessorRunner",
    "ProcessorStats",
    "Retention",
    "Store",
    "StoreHealth",
    "StoreWriter",
    "TrimResult",
    "WriterStats",
    "append_history",
    "append_rows",
    "check_store",
    "decode_log_value",
    "decode_u64",
    "encode_log_value",
    "encode_u64",
    "read_cursor",
    "read_history",
    "read_meta",
    "trim",
    "trim_history",
]
