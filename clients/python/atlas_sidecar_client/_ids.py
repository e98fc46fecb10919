"""Time-ordered event ids (UUIDv7, RFC 9562).

Ids from one process are strictly increasing (a 12-bit counter within the
same millisecond), so the sidecar's dedupe index is written in key order.
"""

from __future__ import annotations

import os
import random
import threading
import time

__all__ = ["uuid7"]

_rand = random.Random(os.urandom(16))
_lock = threading.Lock()
#: The newest id's millisecond and its counter (guarded by ``_lock``).
_last_ms = 0
_seq = 0


def _reseed() -> None:
    _rand.seed(os.urandom(16))


os.register_at_fork(after_in_child=_reseed)


def uuid7() -> str:
    """A new UUIDv7 as a lowercase string."""
    global _last_ms, _seq
    ms = time.time_ns() // 1_000_000
    with _lock:
        if ms > _last_ms:
            _last_ms = ms
            _seq = _rand.getrandbits(8)
        else:
            _seq += 1
            if _seq > 0xFFF:
                _last_ms += 1
                _seq = 0
        ms, seq = _last_ms, _seq
    # One 128-bit integer to hex at once (about a quarter faster than
    # formatting two 64-bit halves): version 7, variant 0b10, 62 random bits.
    h = (
        ((((ms << 16) | 0x7000 | seq) << 64) | 0x8000000000000000 | _rand.getrandbits(62))
        .to_bytes(16, "big")
        .hex()
    )
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
