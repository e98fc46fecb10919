"""The optional compiled helpers of the ingest path (``sidecar/_fastpath.c``).

``make install`` compiles them (gcc and the Python headers, no library); the
install succeeds without a compiler, and every user of them then runs its
pure-Python equivalent, which gives the same results, slower.
``ATLAS_SIDECAR_PURE_PYTHON=1`` forces the Python equivalents (read when a
stage is built, so a test can set it per daemon).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

__all__ = [
    "PURE_PYTHON_ENV",
    "EventCounter",
    "RowBuilder",
    "compiled_decoder",
    "compiled_reason",
    "event_counter",
    "row_builder",
]

#: Set to 1 (or true, yes) to run the pure-Python equivalents.
PURE_PYTHON_ENV = "ATLAS_SIDECAR_PURE_PYTHON"

#: (items, first seq, now ms) -> (dedupe rows, log rows); see sidecar/store/_writer.py.
RowBuilder = Callable[
    [Sequence[tuple[bytes, bytes]], int, int],
    tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]],
]

#: (serialized EventBatch, limit) -> its events, counted up to limit + 1.
EventCounter = Callable[[bytes, int], int]

try:
    from sidecar import _fastpath
except ImportError as exc:  # not built (no compiler at install time)
    _fastpath = None  # type: ignore[assignment]
    _IMPORT_ERROR = str(exc)
else:
    _IMPORT_ERROR = ""


def _switched_off() -> bool:
    return os.environ.get(PURE_PYTHON_ENV, "").strip().lower() in ("1", "true", "yes")


def compiled_decoder() -> type[_fastpath.BatchDecoder] | None:
    """The compiled EventBatch decoder, or None (not built, or switched off)."""
    if _fastpath is None or _switched_off():
        return None
    return _fastpath.BatchDecoder


def row_builder() -> RowBuilder | None:
    """The compiled builder of the writer's rows, or None (not built, or switched off)."""
    if _fastpath is None or _switched_off():
        return None
    return _fastpath.append_rows


def event_counter() -> EventCounter | None:
    """The compiled counter of a batch's events, or None (not built, or switched off)."""
    if _fastpath is None or _switched_off():
        return None
    return _fastpath.count_events


def compiled_reason() -> str:
    """Why the compiled helpers are not in use ("" when they are)."""
    if _fastpath is None:
        return f"the compiled ingest path is not built ({_IMPORT_ERROR})"
    if _switched_off():
        return f"{PURE_PYTHON_ENV} is set"
    return ""
