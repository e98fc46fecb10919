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
_state = {"ms": 0, "seq": 0}
_lock = threading.Lock()


def _reseed() -> None:
    _rand.seed(os.urandom(16))


os.register_at_fork(after_in_child=_reseed)


def uuid7() -> str:
    """A new UUIDv7 as a lowercase string."""
    ms = time.time_ns() // 1_000_000
    with _lock:
        if ms > _state["ms"]:
            _state["ms"] = ms
            _state["seq"] = _rand.getrandbits(8)
        else:
            seq = _state["seq"] + 1
            if seq > 0xFFF:
                _state["ms"] += 1
                seq = 0
            _state["seq"] = seq
        ms, seq = _state["ms"], _state["seq"]
    h = f"{(ms << 16) | 0x7000 | seq:016x}{0x8000000000000000 | _rand.getrandbits(62):016x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
