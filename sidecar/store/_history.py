"""The learning history: an append-only log of what the loop decided and did.

Trigger decisions, dataset snapshots, training runs, candidate
registrations, rollout transitions and rollbacks are appended here as JSON
documents. The learning report and the dashboard read it. Keys are u64
sequence numbers in append order. :func:`trim_history` drops the oldest
entries by age and count (``learning.history_*``); the newest entry is always
kept, so sequence numbers never restart.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import lmdb

from sidecar.store._codec import decode_u64, encode_u64
from sidecar.store._env import Store

__all__ = ["append_history", "read_history", "trim_history"]


def append_history(txn: lmdb.Transaction, store: Store, kind: str, **data: Any) -> int:
    """Appends ``{"seq", "time_ms", "kind", **data}``; returns its seq. Writer thread only."""
    db = store.db("history")
    with txn.cursor(db=db) as cur:
        seq = decode_u64(cur.key()) + 1 if cur.last() else 1
    doc = {
        "seq": seq,
        "time_ms": data.pop("time_ms", None) or time.time_ns() // 1_000_000,
        "kind": kind,
        **data,
    }
    txn.put(
        encode_u64(seq), json.dumps(doc, sort_keys=True, default=str).encode(), db=db, append=True
    )
    return seq


def read_history(
    txn: lmdb.Transaction,
    store: Store,
    *,
    kinds: frozenset[str] | None = None,
    since_seq: int = 0,
    limit: int | None = None,
    newest_first: bool = False,
) -> Iterator[dict[str, Any]]:
    """Yields history documents, oldest first unless ``newest_first``."""
    db = store.db("history")
    n = 0
    with txn.cursor(db=db) as cur:
        if newest_first:
            ok = cur.last()
            step = cur.prev
        else:
            ok = cur.set_range(encode_u64(since_seq))
            step = cur.next
        while ok:
            doc = json.loads(bytes(cur.value()))
            if newest_first and doc["seq"] < since_seq:
                break
            if kinds is None or doc["kind"] in kinds:
                yield doc
                n += 1
                if limit is not None and n >= limit:
                    break
            ok = step()


def trim_history(
    txn: lmdb.Transaction,
    store: Store,
    *,
    now_ms: int,
    max_age_seconds: float,
    max_entries: int,
    budget: int,
) -> tuple[int, bool]:
    """Deletes at most ``budget`` of the oldest entries that are older than
    ``max_age_seconds`` or beyond ``max_entries`` (0: no limit, for either).

    Returns (deleted, more): ``more`` when the budget ran out first. Writer
    thread only.
    """
    db = store.db("history")
    total = int(txn.stat(db)["entries"])
    excess = max(0, total - max_entries) if max_entries else 0
    cutoff = now_ms - int(max_age_seconds * 1000) if max_age_seconds else None
    deleted = 0
    more = False
    with txn.cursor(db=db) as cur:
        ok = cur.first()
        while ok and total - deleted > 1:
            if deleted >= excess:
                if cutoff is None:
                    break
                doc = json.loads(bytes(cur.value()))
                if int(doc.get("time_ms") or 0) >= cutoff:
                    break
            if deleted >= budget:
                more = True
                break
            deleted += 1
            ok = cur.delete()
    return deleted, more
