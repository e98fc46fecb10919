"""The protobuf wire format's one primitive the daemon reads by hand: a varint.

Ingest splits a batch into events without decoding them, and the decode-error
interceptor walks a message to name its bad field; both read varints.
"""

from __future__ import annotations

__all__ = ["read_varint"]


def read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``raw[pos:]`` and the position after it.

    Raises:
        IndexError: the varint runs past the end of ``raw`` or past 64 bits.
    """
    value = shift = 0
    while True:
        if pos >= len(raw) or shift > 63:
            raise IndexError(pos)
        b = raw[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
