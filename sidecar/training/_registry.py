"""The candidate registry: every trained model version, kept and never overwritten.

Layout in the ``models`` database: ``v/<version>`` -> the record as JSON,
``n/<u64>`` -> version, in registration order. The stable version (the one
PRIMARY traffic is meant to run) is ``meta`` key ``models/stable``: at first
the configured base version, else the first model version seen in PRIMARY
traffic; afterwards whatever the rollout engine promotes with
:meth:`ModelRegistry.set_stable`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import lmdb
from atlas_sidecar_client.pb import admin_pb2

from sidecar.errors import SidecarError
from sidecar.names import check_name
from sidecar.store import Store, StoreWriter, append_history, decode_u64, encode_u64

__all__ = [
    "CandidateExistsError",
    "InvalidCandidateError",
    "ModelRecord",
    "ModelRegistry",
    "OnRegistered",
]

log = logging.getLogger(__name__)

STABLE_KEY = b"models/stable"
_VERSION_PREFIX = b"v/"
_ORDER_PREFIX = b"n/"
STATES = ("candidate", "stable", "retired", "rolled_back", "failed")


class CandidateExistsError(SidecarError):
    """A candidate with this version is already registered (versions are immutable)."""

    grpc_code = grpc.StatusCode.ALREADY_EXISTS


class InvalidCandidateError(SidecarError):
    """A candidate is malformed; the message names the field."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


@dataclass(frozen=True, slots=True)
class ModelRecord:
    version: str
    artifact_uri: str = ""
    base_version: str = ""
    update_id: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)
    registered_ms: int = 0
    state: str = "candidate"

    def to_json(self) -> bytes:
        doc = {
            "version": self.version,
            "artifact_uri": self.artifact_uri,
            "base_version": self.base_version,
            "update_id": self.update_id,
            "metrics": dict(self.metrics),
            "registered_ms": self.registered_ms,
            "state": self.state,
        }
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes | memoryview) -> ModelRecord:
        return cls(**json.loads(bytes(raw)))

    def to_proto(self) -> admin_pb2.ModelVersion:
        msg = admin_pb2.ModelVersion(
            version=self.version,
            artifact_uri=self.artifact_uri,
            base_version=self.base_version,
            update_id=self.update_id,
            metrics=dict(self.metrics),
            state=self.state,
        )
        msg.registered_at.FromMilliseconds(self.registered_ms)
        return msg


#: Called after a candidate is durably registered; may start a rollout and
#: return its id. Exceptions are logged and do not undo the registration.
OnRegistered = Callable[[ModelRecord], Awaitable[str | None]]


def validate_candidate(
    version: str,
    artifact_uri: str,
    metrics: Mapping[str, Any],
    *,
    base_version: str = "",
    update_id: str = "",
) -> dict[str, float]:
    """Checks a candidate's fields; returns the metrics as floats.

    ``version``, and ``base_version`` and ``update_id`` when given, follow the
    one rule for client-chosen names (:mod:`sidecar.names`).

    Raises:
        InvalidCandidateError: naming the bad field.
    """
    if not isinstance(version, str):
        raise InvalidCandidateError("version: required, a non-empty string")
    for name, value, required in (
        ("version", version, True),
        ("base_version", base_version, False),
        ("update_id", update_id, False),
    ):
        if required or value:
            bad = check_name(name, value)
            if bad is not None:
                raise InvalidCandidateError(bad)
    if not isinstance(artifact_uri, str):
        raise InvalidCandidateError("artifact_uri: must be a string")
    if not isinstance(metrics, Mapping):
        raise InvalidCandidateError("metrics: must be an object of name -> number")
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidCandidateError(f"metrics.{name}: must be a number, got {value!r}")
        if not math.isfinite(value):
            raise InvalidCandidateError(f"metrics.{name}: must be finite, got {value!r}")
        out[str(name)] = float(value)
    return out


class ModelRegistry:
    """Registers candidates, tracks the stable version, tells listeners.

    Implements the AdminService ``RegisterCandidate`` handler (``register``).
    ``on_registered`` callbacks run after each registration is durable; the
    rollout engine appends one to start a rollout automatically.
    """

    def __init__(self, store: Store, writer: StoreWriter, *, base_version: str = "") -> None:
        self._store = store
        self._writer = writer
        self._base_version = base_version
        # the transaction in which a stable version was last seen: enough to
        # skip the lookup for the rest of that batch, and only that batch (a
        # batch that is aborted takes its write with it)
        self._stable_seen_in: lmdb.Transaction | None = None
        self.on_registered: list[OnRegistered] = []
        self._waiters: dict[str, list[asyncio.Future[ModelRecord]]] = {}

    async def start(self) -> None:
        if self._base_version:
            await self._writer.run(
                lambda txn: self.observe_primary_version(txn, self._base_version)
            )

    async def shutdown(self) -> None:
        for futs in self._waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.cancel()
        self._waiters.clear()

    # -- the stable version --------------------------------------------------

    def observe_primary_version(self, txn: lmdb.Transaction, version: str) -> None:
        """Makes ``version`` stable when none is yet (writer thread)."""
        if self._stable_seen_in is txn:
            return
        meta = self._store.db("meta")
        if txn.get(STABLE_KEY, db=meta) is None:
            txn.put(STABLE_KEY, version.encode(), db=meta)
        self._stable_seen_in = txn

    def stable_version_txn(self, txn: lmdb.Transaction) -> str | None:
        raw = txn.get(STABLE_KEY, db=self._store.db("meta"))
        return bytes(raw).decode() if raw else None

    def stable_version(self) -> str | None:
        with self._store.read() as txn:
            return self.stable_version_txn(txn)

    def set_stable_txn(self, txn: lmdb.Transaction, version: str) -> None:
        """Marks ``version`` stable inside the caller's write transaction.

        The previous stable version's record (if registered) becomes
        ``retired``; the new one's becomes ``stable``.
        """
        meta = self._store.db("meta")
        old = self.stable_version_txn(txn)
        if old == version:
            return
        txn.put(STABLE_KEY, version.encode(), db=meta)
        if old:
            self._set_state(txn, old, "retired")
        self._set_state(txn, version, "stable")

    async def set_stable(self, version: str) -> None:
        await self._writer.run(lambda txn: self.set_stable_txn(txn, version))

    def _set_state(self, txn: lmdb.Transaction, version: str, state: str) -> None:
        db = self._store.db("models")
        key = _VERSION_PREFIX + version.encode()
        raw = txn.get(key, db=db)
        if raw is not None:
            txn.put(key, replace(ModelRecord.from_json(raw), state=state).to_json(), db=db)

    # -- reading ---------------------------------------------------------------

    def get_txn(self, txn: lmdb.Transaction, version: str) -> ModelRecord | None:
        raw = txn.get(_VERSION_PREFIX + version.encode(), db=self._store.db("models"))
        return ModelRecord.from_json(raw) if raw is not None else None

    def get(self, version: str) -> ModelRecord | None:
        with self._store.read() as txn:
            return self.get_txn(txn, version)

    def list(self, limit: int = 0) -> list[ModelRecord]:
        """Registered versions, newest first."""
        db = self._store.db("models")
        out: list[ModelRecord] = []
        with self._store.read() as txn, txn.cursor(db=db) as cur:
            ok = cur.set_range(_ORDER_PREFIX + b"\xff" * 8)
            ok = cur.prev() if ok else cur.last()
            while ok and bytes(cur.key()).startswith(_ORDER_PREFIX):
                rec = self.get_txn(txn, bytes(cur.value()).decode())
                if rec is not None:
                    out.append(rec)
                if limit and len(out) >= limit:
                    break
                ok = cur.prev()
        return out

    def find_by_update(self, update_id: str) -> ModelRecord | None:
        for rec in self.list():
            if rec.update_id == update_id:
                return rec
        return None

    def count(self) -> int:
        raw = None
        with self._store.read() as txn, txn.cursor(db=self._store.db("models")) as cur:
            if cur.set_range(_ORDER_PREFIX + b"\xff" * 8):
                if cur.prev() and bytes(cur.key()).startswith(_ORDER_PREFIX):
                    raw = bytes(cur.key())
            elif cur.last() and bytes(cur.key()).startswith(_ORDER_PREFIX):
                raw = bytes(cur.key())
        return decode_u64(raw[len(_ORDER_PREFIX) :]) if raw else 0

    # -- registering -----------------------------------------------------------

    async def register(
        self, request: admin_pb2.RegisterCandidateRequest
    ) -> admin_pb2.RegisterCandidateResponse:
        """The ``RegisterCandidate`` RPC.

        Raises:
            InvalidCandidateError: a field is malformed (INVALID_ARGUMENT).
            CandidateExistsError: the version exists (ALREADY_EXISTS).
        """
        record, rollout_id = await self.register_candidate(
            request.version,
            request.artifact_uri,
            dict(request.metrics),
            base_version=request.base_version,
            update_id=request.update_id,
        )
        return admin_pb2.RegisterCandidateResponse(
            model=record.to_proto(), rollout_id=rollout_id or ""
        )

    async def register_candidate(
        self,
        version: str,
        artifact_uri: str,
        metrics: Mapping[str, Any],
        *,
        base_version: str = "",
        update_id: str = "",
    ) -> tuple[ModelRecord, str | None]:
        """Stores a new candidate, then runs the ``on_registered`` callbacks.

        Returns the record and the id of a rollout a callback started, if any.
        """
        clean = validate_candidate(
            version, artifact_uri, metrics, base_version=base_version, update_id=update_id
        )
        record = ModelRecord(
            version=version,
            artifact_uri=artifact_uri,
            base_version=base_version,
            update_id=update_id,
            metrics=clean,
            registered_ms=time.time_ns() // 1_000_000,
        )
        await self._writer.run(lambda txn: self._put(txn, record))
        rollout_id: str | None = None
        for callback in list(self.on_registered):
            try:
                rid = await callback(record)
            except Exception:
                log.exception("on_registered callback failed", extra={"version": version})
                continue
            rollout_id = rollout_id or rid
        for fut in self._waiters.pop(update_id, []) if update_id else []:
            if not fut.done():
                fut.set_result(record)
        return record, rollout_id

    def _put(self, txn: lmdb.Transaction, record: ModelRecord) -> None:
        db = self._store.db("models")
        key = _VERSION_PREFIX + record.version.encode()
        if txn.get(key, db=db) is not None:
            raise CandidateExistsError(
                f"version {record.version!r} is already registered; versions are never "
                "overwritten, register the new model under a new version"
            )
        txn.put(key, record.to_json(), db=db)
        with txn.cursor(db=db) as cur:
            n = 1
            ok = cur.prev() if cur.set_range(_ORDER_PREFIX + b"\xff" * 8) else cur.last()
            if ok and bytes(cur.key()).startswith(_ORDER_PREFIX):
                n = decode_u64(bytes(cur.key())[len(_ORDER_PREFIX) :]) + 1
        txn.put(_ORDER_PREFIX + encode_u64(n), record.version.encode(), db=db)
        append_history(
            txn,
            self._store,
            "candidate_registered",
            version=record.version,
            artifact_uri=record.artifact_uri,
            base_version=record.base_version,
            update_id=record.update_id,
            metrics=dict(record.metrics),
        )

    def wait_for_update(self, update_id: str) -> asyncio.Future[ModelRecord]:
        """A future that resolves when a candidate for ``update_id`` registers."""
        fut: asyncio.Future[ModelRecord] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(update_id, []).append(fut)
        return fut
