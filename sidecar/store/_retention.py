"""Retention: trims the event log and the dedupe index by age and size.

Events are deleted from the front of the log (the oldest sequence numbers)
when older than ``retention_seconds`` or beyond ``retention_max_events``, but
never past a processor's durable cursor (``meta`` keys ``cursor/<name>``
holding the next sequence number that processor will read), so nothing is
trimmed before every stage has seen it. An event's id leaves the dedupe index
when it is older than ``dedupe_window_seconds`` or when its event is trimmed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass

import lmdb

from sidecar._aio import cancel_and_wait, spawn
from sidecar.config import StoreConfig
from sidecar.store._codec import CURSOR_PREFIX, decode_log_value, decode_u64, encode_u64
from sidecar.store._env import Store
from sidecar.store._writer import StoreWriter

__all__ = ["CURSOR_PREFIX", "Retention", "TrimResult", "trim"]

log = logging.getLogger(__name__)

_DEDUPE_TRIM_KEY = b"retention/dedupe_next_seq"


@dataclass(frozen=True, slots=True)
class TrimResult:
    events_deleted: int
    ids_deleted: int
    more: bool


def _event_id(payload: bytes) -> bytes | None:
    from atlas_sidecar_client._proto.atlas.sidecar.v1 import events_pb2

    ev = events_pb2.Event()
    try:
        ev.ParseFromString(payload)
    except Exception:
        return None
    return ev.event_id.encode()


def trim(
    txn: lmdb.Transaction, store: Store, config: StoreConfig, now_ms: int, budget: int
) -> TrimResult:
    """Deletes at most ``budget`` events (and ids) in this transaction."""
    events = store.db("events")
    ids = store.db("event_ids")
    meta = store.db("meta")
    floor: int | None = None
    with txn.cursor(db=meta) as cur:
        if cur.set_range(CURSOR_PREFIX):
            for key, value in cur:
                if not bytes(key).startswith(CURSOR_PREFIX):
                    break
                seq = decode_u64(value)
                floor = seq if floor is None else min(floor, seq)
    total = int(txn.stat(events)["entries"])
    excess = max(0, total - config.retention_max_events) if config.retention_max_events else 0
    age_cutoff = now_ms - int(config.retention_seconds * 1000) if config.retention_seconds else -1
    dedupe_cutoff = now_ms - int(config.dedupe_window_seconds * 1000)
    raw = txn.get(_DEDUPE_TRIM_KEY, db=meta)
    dedupe_next = decode_u64(raw) if raw else 0
    deleted = ids_deleted = 0
    more = False
    with txn.cursor(db=events) as cur:
        # 1. trim the front of the log
        if cur.first():
            while deleted < budget:
                seq = decode_u64(cur.key())
                if floor is not None and seq >= floor:
                    break
                ingest_ms, payload = decode_log_value(cur.value())
                if not (deleted < excess or ingest_ms < age_cutoff):
                    break
                if seq >= dedupe_next:
                    eid = _event_id(payload)
                    if eid is not None and txn.delete(eid, db=ids):
                        ids_deleted += 1
                    dedupe_next = seq + 1
                deleted += 1
                if not cur.delete():
                    break
                if not cur.key():
                    break
            else:
                more = True
        # 2. forget ids past the dedupe window, walking the log in order
        if cur.set_range(encode_u64(dedupe_next)):
            while ids_deleted < budget:
                seq = decode_u64(cur.key())
                ingest_ms, payload = decode_log_value(cur.value())
                if ingest_ms >= dedupe_cutoff:
                    break
                eid = _event_id(payload)
                if eid is not None and txn.delete(eid, db=ids):
                    ids_deleted += 1
                dedupe_next = seq + 1
                if not cur.next():
                    break
            else:
                more = True
    txn.put(_DEDUPE_TRIM_KEY, encode_u64(dedupe_next), db=meta)
    return TrimResult(deleted, ids_deleted, more)


class Retention:
    """Runs :func:`trim` through the writer every ``retention_interval_seconds``."""

    def __init__(self, store: Store, writer: StoreWriter, config: StoreConfig) -> None:
        self._store = store
        self._writer = writer
        self._config = config
        self._task: asyncio.Task[None] | None = None
        self.events_deleted = 0
        self.ids_deleted = 0

    async def start(self) -> None:
        if self._task is None:
            self._task = spawn(self._loop(), stage="store", name="retention")

    async def shutdown(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def run_once(self) -> TrimResult:
        """Trims until nothing is left to trim; returns the totals."""
        ev = ids = 0
        while True:
            now_ms = time.time_ns() // 1_000_000
            budget = self._config.retention_batch
            res = await self._writer.run(
                functools.partial(
                    trim, store=self._store, config=self._config, now_ms=now_ms, budget=budget
                )
            )
            ev += res.events_deleted
            ids += res.ids_deleted
            if not res.more:
                break
        self.events_deleted += ev
        self.ids_deleted += ids
        return TrimResult(ev, ids, False)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.retention_interval_seconds)
            try:
                await self.run_once()
            except Exception:
                log.exception("retention failed; will retry")
