"""Observing the event log for the active rollout.

:class:`RolloutObserver` is a log processor. For the active rollout it stores
one compact observation per PRIMARY request of the candidate or the stable
version, per feedback on such a request (scored with the shared weight
table), and per shadow comparison; PROBE answers are stored by probe id.
Observations live in the ``rollouts`` database under the rollout's id, in
log order, written in the same transaction that advances the processor's
cursor, so the analysis can always be rebuilt from them after a restart.

Feedback counts for the arm (candidate or stable) that served its request.
Which arm served which request is durable, so feedback that arrives after a
restart for a request served before it still counts. Each batch's new
attributions are written as one record (``s/`` + the first entry's ordinal:
an object ``{request_id: [rollout_id, arm, ordinal, ingest_ms, record]}``) in the
transaction that advances the processor's cursor (``end_batch``), so the
attributions always match the cursor; they are read back into memory once,
when a rollout first needs them after start. A feedback event costs no LMDB
read. The attribution is bounded, by rules that depend on the log alone (so
a replay decides the same):

- by count: only the last ``join_capacity`` attributed requests (each
  PRIMARY request of either arm is numbered by an ordinal) can be joined;
- by age: feedback counts only within ``feedback_window_ms`` of log time
  (ingest time) after its request;
- and only while the rollout that served the request is the active one.

Records whose every entry is past these bounds (or superseded by a newer
answer under the same request id) are deleted.

It also keeps the default regression set: recent PRIMARY answers of the
stable version that got a good reward. That join (an answer waiting for its
rating) and the pairing of shadow answers are kept in memory only: after a
restart they start empty, which loses a few regression candidates and shadow
comparisons, not a decision.
"""

from __future__ import annotations

import json
import struct
import sys
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import lmdb
import numpy as np
import orjson
from atlas_sidecar_client.pb import events_pb2

from sidecar.rollout._analysis import ArmBatch, TrafficBatch
from sidecar.rollout._compare import Comparator
from sidecar.scoring import WeightTable, score_feedback
from sidecar.store import Store, decode_u64, encode_u64

__all__ = [
    "ActiveView",
    "Collected",
    "RecentGoodAnswers",
    "RegressionCase",
    "RegressionSource",
    "RolloutObserver",
    "ShadowBatch",
    "StoredObservations",
    "TrafficSource",
    "obs_prefix",
    "probe_answers",
]

_OBS = struct.Struct(">BBBdd")
KIND_REQUEST, KIND_FEEDBACK, KIND_SHADOW = 1, 2, 3
STABLE, CANDIDATE = 0, 1
_GOOD = b"g/"
_GOOD_COUNT = b"gc"
#: attribution records: ``s/`` + u64 first ordinal; the last ordinal given
_SERVED = b"s/"
_SERVED_ORDINAL = b"s#"


def obs_prefix(rollout_id: str) -> bytes:
    return b"o/" + rollout_id.encode() + b"/"


def _probe_key(probe_id: str, index: int) -> bytes:
    return b"p/" + probe_id.encode() + b"/" + struct.pack(">I", index)


@dataclass(frozen=True, slots=True)
class ActiveView:
    """What the observer needs to know about the active rollout."""

    rollout_id: str
    candidate: str
    stable: str
    #: Whether shadow answers are being compared (SHADOW state).
    shadow: bool = False


@dataclass(slots=True)
class ShadowBatch:
    agreement: list[float] = field(default_factory=list)
    candidate_error: list[bool] = field(default_factory=list)
    stable_error: list[bool] = field(default_factory=list)
    candidate_latency: list[float] = field(default_factory=list)
    stable_latency: list[float] = field(default_factory=list)


@dataclass(slots=True)
class Collected:
    traffic: TrafficBatch
    shadow: ShadowBatch
    cursor: int


class TrafficSource(Protocol):
    """Where the engine gets the traffic observed since ``cursor``."""

    def collect(self, rollout_id: str, cursor: int, now_ms: int) -> Collected: ...


@dataclass(frozen=True, slots=True)
class RegressionCase:
    prompt: str
    #: A known-good answer, when there is one.
    reference: str = ""


class RegressionSource(Protocol):
    """Prompts for validation probes (holdout and memory sets plug in here)."""

    def cases(self, limit: int) -> Sequence[RegressionCase]: ...


#: request id -> (rollout id, arm, ordinal, ingest ms, record): the record
#: is the first ordinal of the batch that stored it (its key's suffix)
_Served = tuple[str, int, int, int, int]


class _ServedBatch:
    """Attributions made in one transaction, written by ``end_batch``.

    Tied to its transaction object: one whose transaction was aborted (so
    ``end_batch`` never ran) is dropped, never written nor remembered.
    """

    __slots__ = ("ordinal", "record", "served", "txn")

    def __init__(self, txn: lmdb.Transaction, ordinal: int) -> None:
        self.txn = txn
        #: the last ordinal given out, this batch's included
        self.ordinal = ordinal
        #: the record this batch's attributions go to
        self.record = ordinal + 1
        #: what the record stores: one entry per request (the latest answer)
        self.served: dict[str, _Served] = {}


class RolloutObserver:
    """Log processor feeding the rollout analysis. Runs on the writer thread.

    Implements ``end_batch`` (:class:`sidecar.store.BatchingLogProcessor`):
    a caller of ``process`` must call it before committing.
    """

    name = "rollout"

    def __init__(
        self,
        store: Store,
        comparator: Comparator,
        *,
        weights: WeightTable | None = None,
        pool_size: int = 500,
        good_reward: float = 0.75,
        join_capacity: int = 100_000,
        feedback_window_ms: int = 3_600_000,
    ) -> None:
        self._store = store
        self.comparator = comparator
        self._weights = weights or WeightTable()
        self._pool = pool_size
        self._good = good_reward
        self._cap = join_capacity
        self._window_ms = feedback_window_ms
        #: Set by the engine; None when no rollout is active.
        self.view: ActiveView | None = None
        #: Version the regression pool is collected from.
        self.stable_version = ""
        # Committed attributions, oldest ordinal first, and per stored record
        # how many of them are still live; read from the store on first use.
        self._loaded = False
        self._served: OrderedDict[str, _Served] = OrderedDict()
        self._live: dict[int, int] = {}
        self._newest_ms = 0
        self._ordinal = 0
        self._batch: _ServedBatch | None = None
        self._recent: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._pending_shadow: OrderedDict[str, tuple[int, str, float, bool]] = OrderedDict()

    def _remember(self, d: OrderedDict[str, Any], key: str, value: Any) -> None:
        d[key] = value
        if len(d) > self._cap:
            d.popitem(last=False)

    def process(
        self, txn: lmdb.Transaction, seq: int, ingest_ms: int, event: events_pb2.Event
    ) -> None:
        db = self._store.db("rollouts")
        kind = event.WhichOneof("payload")
        if kind == "inference":
            self._inference(txn, db, seq, ingest_ms, event.inference)
        elif kind == "feedback":
            self._feedback(txn, db, seq, ingest_ms, event.feedback)

    def _inference(
        self, txn: lmdb.Transaction, db: Any, seq: int, ingest_ms: int, inf: events_pb2.Inference
    ) -> None:
        role = inf.role or events_pb2.PRIMARY
        if role == events_pb2.PROBE:
            probe_id = inf.attributes.get("probe_id", "")
            idx = inf.attributes.get("probe_index", "")
            if probe_id and idx.isdigit():
                doc = {
                    "version": inf.model_version,
                    "prompt": inf.prompt,
                    "response": inf.response,
                    "latency_ms": inf.latency_ms,
                    "error": inf.error,
                }
                txn.put(_probe_key(probe_id, int(idx)), json.dumps(doc).encode(), db=db)
            return
        if (
            role == events_pb2.PRIMARY
            and inf.model_version == self.stable_version
            and not inf.error
        ):
            self._remember(self._recent, inf.request_id, (inf.prompt, inf.response))
        v = self.view
        if v is None:
            return
        prefix = obs_prefix(v.rollout_id)
        if role == events_pb2.PRIMARY and inf.model_version in (v.candidate, v.stable):
            arm = CANDIDATE if inf.model_version == v.candidate else STABLE
            b = self._batch
            if b is None or b.txn is not txn:
                b = self._begin(txn)
            n = b.ordinal = b.ordinal + 1
            b.served[inf.request_id] = (v.rollout_id, arm, n, ingest_ms, b.record)
            value = _OBS.pack(KIND_REQUEST, arm, int(inf.error), inf.latency_ms, 0.0)
            txn.put(prefix + encode_u64(seq), value, db=db)
        if not v.shadow or role not in (events_pb2.PRIMARY, events_pb2.SHADOW):
            return
        if role == events_pb2.PRIMARY and inf.model_version != v.stable:
            return
        if role == events_pb2.SHADOW and inf.model_version != v.candidate:
            return
        key = inf.attributes.get("mirror_of", "") or inf.request_id
        mine = (role, inf.response, inf.latency_ms, inf.error)
        other = self._pending_shadow.pop(key, None)
        if other is None or other[0] == role:
            self._remember(self._pending_shadow, key, mine)
            return
        shadow, primary = (mine, other) if role == events_pb2.SHADOW else (other, mine)
        agree = 0.0
        if not shadow[3] and not primary[3]:
            agree = self.comparator.similarity(primary[1], shadow[1])
        err = (int(shadow[3]) << 1) | int(primary[3])
        value = _OBS.pack(KIND_SHADOW, err, 0, agree, 0.0)
        txn.put(prefix + encode_u64(seq), value + struct.pack(">dd", shadow[2], primary[2]), db=db)

    def _feedback(
        self, txn: lmdb.Transaction, db: Any, seq: int, ingest_ms: int, fb: events_pb2.Feedback
    ) -> None:
        rating = fb.rating if fb.HasField("rating") else None
        score = score_feedback([fb.signal], rating, self._weights)
        if not score.has_feedback:
            return
        request_id = fb.request_id
        recent = self._recent.pop(request_id, None)
        if recent is not None and score.reward >= self._good:
            self._add_good(txn, db, recent)
        v = self.view
        if v is None:
            return
        # The arm that served the request in this rollout, while feedback on
        # it still counts (the count and age bounds).
        b = self._batch
        if b is None or b.txn is not txn:
            b = self._begin(txn)
        got = b.served.get(request_id) or self._served.get(request_id)
        if got is None:
            return
        rid, arm, ordinal, ms, _ = got
        if (
            rid != v.rollout_id
            or ordinal <= b.ordinal - self._cap
            or ingest_ms - ms > self._window_ms
        ):
            return
        value = _OBS.pack(KIND_FEEDBACK, arm, 0, score.reward, 0.0)
        txn.put(obs_prefix(v.rollout_id) + encode_u64(seq), value, db=db)

    def _add_good(self, txn: lmdb.Transaction, db: Any, case: tuple[str, str]) -> None:
        raw = txn.get(_GOOD_COUNT, db=db)
        n = decode_u64(bytes(raw)) if raw else 0
        doc = {"prompt": case[0], "reference": case[1]}
        txn.put(_GOOD + encode_u64(n % self._pool), json.dumps(doc).encode(), db=db)
        txn.put(_GOOD_COUNT, encode_u64(n + 1), db=db)

    def tick(self, txn: lmdb.Transaction, now_ms: int) -> None:
        return None

    # -- which arm served a request ---------------------------------------------

    def _begin(self, txn: lmdb.Transaction) -> _ServedBatch:
        if not self._loaded:
            self._load(txn)
        b = self._batch = _ServedBatch(txn, self._ordinal)
        return b

    def end_batch(self, txn: lmdb.Transaction) -> None:
        """Stores this transaction's attributions as one record and drops the
        records nothing refers to any more (before the commit)."""
        b, self._batch = self._batch, None
        if b is None or b.txn is not txn:
            return
        db = self._store.db("rollouts")
        served = self._served
        live = self._live
        doomed: list[int] = []
        if b.served:
            blob = orjson.dumps(b.served)
            with txn.cursor(db=db) as cur:
                cur.putmulti(
                    [
                        (_SERVED + encode_u64(b.record), blob),
                        (_SERVED_ORDINAL, encode_u64(b.ordinal)),
                    ]
                )
            live[b.record] = len(b.served)
            if not served.keys().isdisjoint(b.served):
                # answers under a request id seen before: the newer one
                # counts, and it joins the queue at its own place
                for request_id in b.served:
                    old = served.pop(request_id, None)
                    if old is not None:
                        self._release(old[4], doomed)
            served.update(b.served)
            self._ordinal = b.ordinal
            newest = next(reversed(b.served.values()))[3]
            self._newest_ms = max(self._newest_ms, newest)
        # Forget what can never be joined again: past the count bound, or
        # older than the window by the newest log time seen.
        oldest_ordinal = self._ordinal - self._cap
        oldest_ms = self._newest_ms - self._window_ms
        while served:
            request_id, entry = served.popitem(last=False)
            if entry[2] > oldest_ordinal and entry[3] >= oldest_ms:
                served[request_id] = entry
                served.move_to_end(request_id, last=False)
                break
            self._release(entry[4], doomed)
        for record in doomed:
            txn.delete(_SERVED + encode_u64(record), db=db)

    def _release(self, record: int, doomed: list[int]) -> None:
        n = self._live[record] - 1
        if n:
            self._live[record] = n
        else:
            del self._live[record]
            doomed.append(record)

    def _load(self, txn: lmdb.Transaction) -> None:
        """Reads the stored attributions (once, on the writer thread)."""
        db = self._store.db("rollouts")
        served: OrderedDict[str, _Served] = OrderedDict()
        live: dict[int, int] = {}
        names: dict[str, str] = {}
        raw = txn.get(_SERVED_ORDINAL, db=db)
        ordinal = decode_u64(bytes(raw)) if raw else 0
        newest_ms = 0
        with txn.cursor(db=db) as cur:
            ok = cur.set_range(_SERVED)
            while ok:
                key = bytes(cur.key())
                if not key.startswith(_SERVED):
                    break
                record = decode_u64(key[len(_SERVED) :])
                entries: dict[str, list[Any]] = orjson.loads(cur.value())
                live[record] = len(entries)
                for request_id, (rid, arm, n, ms, _) in entries.items():
                    old = served.pop(request_id, None)
                    if old is not None:
                        live[old[4]] -= 1
                    rid = names.setdefault(rid, sys.intern(rid))
                    served[request_id] = (rid, int(arm), int(n), int(ms), record)
                    newest_ms = max(newest_ms, int(ms))
                ok = cur.next()
        doomed = [record for record, n in live.items() if n <= 0]
        for record in doomed:
            del live[record]
            txn.delete(_SERVED + encode_u64(record), db=db)
        self._served, self._live, self._ordinal = served, live, ordinal
        self._newest_ms = newest_ms
        self._loaded = True


class StoredObservations:
    """The observations the observer stored, turned into batches for the analysis."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def collect(self, rollout_id: str, cursor: int, now_ms: int) -> Collected:
        prefix = obs_prefix(rollout_id)
        lat: tuple[list[float], list[float]] = ([], [])
        err: tuple[list[bool], list[bool]] = ([], [])
        rew: tuple[list[float], list[float]] = ([], [])
        sh = ShadowBatch()
        last = cursor
        with self._store.read() as txn, txn.cursor(db=self._store.db("rollouts")) as cur:
            ok = cur.set_range(prefix + encode_u64(cursor + 1))
            while ok:
                key = bytes(cur.key())
                if not key.startswith(prefix):
                    break
                last = decode_u64(key[len(prefix) :])
                raw = cur.value()
                kind, arm, flag, v1, _v2 = _OBS.unpack_from(raw)
                if kind == KIND_REQUEST:
                    lat[arm].append(v1)
                    err[arm].append(bool(flag))
                elif kind == KIND_FEEDBACK:
                    rew[arm].append(v1)
                elif kind == KIND_SHADOW:
                    c_lat, s_lat = struct.unpack_from(">dd", raw, _OBS.size)
                    sh.agreement.append(v1)
                    sh.candidate_error.append(bool(arm & 2))
                    sh.stable_error.append(bool(arm & 1))
                    sh.candidate_latency.append(c_lat)
                    sh.stable_latency.append(s_lat)
                ok = cur.next()

        def arm_batch(i: int) -> ArmBatch:
            return ArmBatch(
                np.asarray(lat[i], dtype=float),
                np.asarray(err[i], dtype=bool),
                np.asarray(rew[i], dtype=float),
            )

        return Collected(TrafficBatch(arm_batch(CANDIDATE), arm_batch(STABLE)), sh, last)


def probe_answers(store: Store, probe_id: str) -> list[dict[str, Any]]:
    """Stored answers of one probe, by index order."""
    prefix = b"p/" + probe_id.encode() + b"/"
    out: list[dict[str, Any]] = []
    with store.read() as txn, txn.cursor(db=store.db("rollouts")) as cur:
        ok = cur.set_range(prefix)
        while ok and bytes(cur.key()).startswith(prefix):
            doc = json.loads(bytes(cur.value()))
            doc["index"] = struct.unpack(">I", bytes(cur.key())[len(prefix) :])[0]
            out.append(doc)
            ok = cur.next()
    return out


class RecentGoodAnswers:
    """The default regression set: recent stable answers with a good reward."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def cases(self, limit: int) -> list[RegressionCase]:
        out: list[RegressionCase] = []
        with self._store.read() as txn, txn.cursor(db=self._store.db("rollouts")) as cur:
            ok = cur.set_range(_GOOD)
            while ok and bytes(cur.key()).startswith(_GOOD) and len(out) < limit:
                doc = json.loads(bytes(cur.value()))
                out.append(RegressionCase(doc["prompt"], doc.get("reference", "")))
                ok = cur.next()
        return out
