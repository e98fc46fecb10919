"""Byte layouts of the store's keys and values.

Sequence numbers are 8-byte big-endian so that LMDB's byte order is numeric
order and appends stay at the end of the B-tree (about 10x faster than random
keys). A log value is an 8-byte ingest timestamp (ms since the epoch)
followed by the serialized ``Event``.
"""

from __future__ import annotations

import struct

__all__ = [
    "CURSOR_PREFIX",
    "decode_id_value",
    "decode_log_value",
    "decode_u64",
    "encode_id_value",
    "encode_log_value",
    "encode_u64",
    "seq_key",
]

#: ``meta`` keys ``cursor/<processor>``: the next sequence number that
#: processor will read (a u64).
CURSOR_PREFIX = b"cursor/"

_U64 = struct.Struct(">Q")
_U64x2 = struct.Struct(">QQ")


def encode_u64(value: int) -> bytes:
    return _U64.pack(value)


def decode_u64(raw: bytes | memoryview) -> int:
    return int(_U64.unpack_from(raw)[0])


seq_key = encode_u64


def encode_log_value(ingest_ms: int, event: bytes) -> bytes:
    return _U64.pack(ingest_ms) + event


def decode_log_value(raw: bytes | memoryview) -> tuple[int, bytes]:
    """Returns (ingest_ms, serialized Event)."""
    return int(_U64.unpack_from(raw)[0]), bytes(raw[8:])


def encode_id_value(seq: int, ingest_ms: int) -> bytes:
    return _U64x2.pack(seq, ingest_ms)


def decode_id_value(raw: bytes | memoryview) -> tuple[int, int]:
    """Returns (seq, ingest_ms) of the stored event with this id."""
    seq, ms = _U64x2.unpack_from(raw)
    return int(seq), int(ms)
