"""FeedbackProcessor: join, score and curate, on the event log.

Inference and Feedback meet by ``request_id`` in either order. An answer's
reward window opens when its Inference is logged and lasts
``reward_window_seconds`` of log time; feedback logged inside it is
aggregated (every signal, the latest rating, the latest correction, who gave
it), feedback logged after it is counted as late and ignored. Feedback that
arrives first waits one window for its answer, then is dropped (counted).

Windows close in order of their end. They close when an event whose ingest
time is past their end is processed, or on ``tick`` once the processor has
caught up with the log and the wall clock is past their end. Either way the
order of closes and everything derived from them is a function of the log,
so a replay (after a crash, or ``atlas-sidecar reprocess``) gives the same
samples and pairs with the same numbers.

On close a PRIMARY answer becomes a :class:`Sample` (scored with the current
weight version), may yield preference pairs (retry chains, corrections,
answers to the same prompt whose rewards differ by the pair margin), and
updates the per-version feedback of its model and its sources' statistics
for quarantine. SHADOW and PROBE answers never join: they are counted and
left to the stages that compare them.

A closed request leaves a small record behind (its sample number) so that a
retry naming it finds its sample, late feedback is counted as late and a
resent answer as a duplicate. That record is forgotten
``closed_request_retention_seconds`` of log time after its window closed
(the ``closed`` database queues them in that order); after that, such
feedback waits as an orphan and is dropped, a retry forms no retry pair and
a resent answer is scored again. Forgetting is interleaved with closing in
log-time order (at equal times forgetting goes first), so it is as much a
function of the log as closing is.

The processor runs once per event, so it does as little per event as it
can: running totals (counters, per-version feedback, per-source statistics)
and request records are kept in memory for the current transaction and
written once, by ``end_batch``, before that transaction commits. Samples and
pairs are built and stored as plain documents (the same bytes
``Sample.to_json`` and ``Pair.to_json`` give); :class:`Sample` and
:class:`Pair` objects are only made for listeners that take them, and
``sample_document_listeners`` get the stored document itself.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import lmdb
import orjson
from atlas_sidecar_client.pb import events_pb2

from sidecar.config import ScoringConfig
from sidecar.scoring._views import (
    COUNTERS_KEY,
    PERF_PREFIX,
    SOURCE_PREFIX,
    Pair,
    Sample,
    ScoringCounters,
    VersionFeedback,
)
from sidecar.scoring._weights import WeightTable, ensure_weight_version, score_parts
from sidecar.store import Store, decode_u64, encode_u64, read_cursor

_Doc = dict[str, Any]

__all__ = [
    "FeedbackProcessor",
    "PairListener",
    "SampleDocumentListener",
    "SampleListener",
    "table_from_config",
]

S = events_pb2.Signal
_PRIMARY_ROLES = (events_pb2.ROLE_UNSPECIFIED, events_pb2.PRIMARY)
_SIGNAL_NAMES = {v: k for k, v in S.items()}
_ENGAGE = int(S.ENGAGE)
_NO_DEADLINE = 1 << 64
_MISSING = object()
_unpack_u64 = struct.Struct(">Q").unpack_from
_NO_COUNTERS = ScoringCounters().pack()
_SOURCE = struct.Struct(">Qd")
_PROMPT_ENTRY = struct.Struct(">d8s")
#: windows key: deadline, seq; closed key: forget time, seq
_WINDOW_KEY = struct.Struct(">QQ")
_TIME_SEQ = _WINDOW_KEY
_KIND_INFERENCE = b"i"
_KIND_ORPHAN = b"o"

#: The layout of a stored request record (``requests`` database, key: the
#: request id, value: an orjson document). The keys are short (a record is
#: written per answer and rewritten per feedback); this table is their
#: legend, and a unit test fails when a record carries a key missing here.
#: A record is in one of three shapes: **open** (its Inference arrived; the
#: reward window is running), **orphan** (``o``: feedback that waits for its
#: answer) or **closed** (``c``: the window closed; kept for retries and late
#: feedback until ``closed_request_retention_seconds`` have passed).
REQUEST_RECORD_FIELDS: dict[str, str] = {
    "s": "log sequence number of the event that made the record (all shapes)",
    "t": "ingest time of the Inference, ms since the epoch (open)",
    "dl": "end of the reward window, ms of log time (open, orphan)",
    "v": "model_version that answered (open)",
    "p": "prompt text (open)",
    "r": "response text (open)",
    "e": "1 when the answer was an error, else 0 (open)",
    "u": "user_id of the request (open)",
    "ss": "session_id of the request (open)",
    "ro": "retry_of: the request id this one retries, or '' (open)",
    "tk": "task id, the Inference attribute named by memory.task_attribute, or '' (open)",
    "at": "Inference attributes kept for the sample, as [key, value] pairs (open)",
    "lp": "token log-probs as [mean, min, count], or null when absent (open)",
    "sg": "feedback signals so far, as Signal numbers; ENGAGE for long dwell (open, orphan)",
    "rt": "latest explicit rating in [0, 1], or null (open, orphan)",
    "cr": "latest correction text, or '' (open, orphan)",
    "fs": "feedback sources so far, 'user:<id>' and 'session:<id>' (open, orphan)",
    "o": "1: an orphan, feedback whose Inference has not arrived (orphan)",
    "c": "sample number given at close; 0: no sample (an error or an empty answer) (closed)",
}

#: Called on the writer thread, inside the closing transaction, for each new
#: sample. Must be deterministic (replays call it again) and must not block.
SampleListener = Callable[[lmdb.Transaction, Sample], None]
#: Like :data:`SampleListener`, but given the stored sample document (the
#: fields of :class:`Sample`; lists where Sample has tuples). Read-only: it is
#: the document that was stored and may be reused for preference pairs.
SampleDocumentListener = Callable[[lmdb.Transaction, Mapping[str, Any]], None]
PairListener = Callable[[lmdb.Transaction, Pair], None]


def table_from_config(config: ScoringConfig) -> WeightTable:
    return WeightTable(
        signals=dict(config.signal_weights),
        explicit_weight=config.explicit_weight,
        implicit_weight=config.implicit_weight,
        default_reward=config.default_reward,
    )


# orjson: records are read and written several times per event, and it is
# several times faster than the standard library's json for that.
_dumps = orjson.dumps
_loads = orjson.loads


class _Batch:
    """What the processor accumulated in one transaction, written by ``end_batch``.

    Tied to its transaction object: a batch whose transaction was aborted
    (so ``end_batch`` never ran) is dropped, never written.
    """

    __slots__ = (
        "counters",
        "counters_raw",
        "dirty",
        "next_deadline",
        "next_expiry",
        "pair_rows",
        "perf",
        "prompts_cursor",
        "requests",
        "sample_rows",
        "samples",
        "sources",
        "txn",
    )

    def __init__(self, txn: lmdb.Transaction, counters_raw: bytes) -> None:
        self.txn = txn
        self.counters_raw = counters_raw
        self.counters = ScoringCounters.unpack(counters_raw)
        self.perf: dict[str, VersionFeedback] = {}
        #: meta key -> [n, sum of signed scores]
        self.sources: dict[bytes, list[Any]] = {}
        #: request records read or written in this batch (None: absent)
        self.requests: dict[bytes, _Doc | None] = {}
        #: request keys to write (a dict, for a deterministic write order)
        self.dirty: dict[bytes, None] = {}
        #: sample documents made or read in this batch, by sample key
        self.samples: dict[bytes, _Doc] = {}
        #: new samples and pairs (numbers ascending), appended by ``end_batch``
        self.sample_rows: list[tuple[bytes, bytes]] = []
        self.pair_rows: list[tuple[bytes, bytes]] = []
        #: the prompts index, read and written for every answer with feedback
        self.prompts_cursor: lmdb.Cursor | None = None
        #: nothing closes or is forgotten before this log time (a lower
        #: bound; None: unknown)
        self.next_deadline: int | None = None
        #: no closed request is forgotten before this log time (a lower
        #: bound; None: unknown)
        self.next_expiry: int | None = None


class FeedbackProcessor:
    """The join + scoring + curation processor (cursor ``scoring``).

    ``on_primary_version(txn, version)`` is called for each PRIMARY answer's
    model version (the registry uses it to learn the initial stable version).
    Implements ``end_batch`` (:class:`sidecar.store.BatchingLogProcessor`):
    a caller of ``process`` must call it before committing.

    Each new sample is handed, in the transaction that stores it, to every
    ``sample_document_listeners`` entry (the stored document) and then to
    every ``sample_listeners`` entry (a :class:`Sample`, built only when
    there is such a listener); each new pair to ``pair_listeners``.
    """

    name = "scoring"

    def __init__(
        self,
        store: Store,
        config: ScoringConfig,
        *,
        baseline_samples: int = 100,
        recent_samples: int = 100,
        on_primary_version: Callable[[lmdb.Transaction, str], None] | None = None,
        task_attribute: str = "task_id",
        sample_attributes: Sequence[str] = (),
    ) -> None:
        self._store = store
        self.config = config
        self.table = table_from_config(config)
        self._window_ms = int(config.reward_window_seconds * 1000)
        # at least 1 ms: a record is forgotten strictly after its close
        self._forget_ms = max(1, int(config.closed_request_retention_seconds * 1000))
        self._quality = config.quality_threshold
        self._dwell_ms = config.dwell_engage_ms
        self._baseline_n = baseline_samples
        self._alpha = 2.0 / (recent_samples + 1)
        self._on_version = on_primary_version
        # The attribute naming a sample's task, and the Inference attributes
        # a sample keeps for the stages that value it (selective learning).
        self._task_attr = task_attribute
        self._keep_attrs = tuple(sorted({*sample_attributes, task_attribute}))
        self.weight_version: int | None = None
        self._batch: _Batch | None = None
        # database handles, looked up when a batch begins (the store opens later)
        self._meta: Any = None
        self._requests: Any = None
        self._windows: Any = None
        self._samples: Any = None
        self._pairs: Any = None
        self._prompts: Any = None
        self._closed: Any = None
        self.sample_listeners: list[SampleListener] = []
        self.sample_document_listeners: list[SampleDocumentListener] = []
        self.pair_listeners: list[PairListener] = []

    # -- set-up ------------------------------------------------------------

    def bind(self, txn: lmdb.Transaction) -> int:
        """Records the configured weight table as a version (writer thread)."""
        self.weight_version = ensure_weight_version(txn, self._store, self.table)
        return self.weight_version

    # -- LogProcessor --------------------------------------------------------

    def process(
        self, txn: lmdb.Transaction, seq: int, ingest_ms: int, event: events_pb2.Event
    ) -> None:
        b = self._batch
        if b is None or b.txn is not txn:
            b = self._begin(txn)
        nd = b.next_deadline
        if nd is None or ingest_ms >= nd:
            self._close_due(b, ingest_ms)
        kind = event.WhichOneof("payload")
        if kind == "inference":
            self._on_inference(b, seq, ingest_ms, event.inference)
        elif kind == "feedback":
            self._on_feedback(b, seq, ingest_ms, event.feedback)
        else:
            raise ValueError("event has no payload (expected inference or feedback)")

    def end_batch(self, txn: lmdb.Transaction) -> None:
        """Writes what this transaction's events accumulated (before its commit)."""
        b, self._batch = self._batch, None
        if b is None or b.txn is not txn:
            return
        if b.prompts_cursor is not None:
            b.prompts_cursor.close()
        for db, rows in ((self._samples, b.sample_rows), (self._pairs, b.pair_rows)):
            if rows:
                with txn.cursor(db=db) as cur:
                    if cur.putmulti(rows, append=True)[1] != len(rows):
                        # numbers not past the stored ones (views out of step
                        # with their counters): store them rather than drop them
                        cur.putmulti(rows)
        meta_items: list[tuple[bytes, bytes]] = []
        counters = b.counters.pack()
        if counters != b.counters_raw:
            meta_items.append((COUNTERS_KEY, counters))
        for version, perf in b.perf.items():
            meta_items.append((PERF_PREFIX + version.encode(), perf.pack()))
        for skey, (n, total) in b.sources.items():
            meta_items.append((skey, _SOURCE.pack(n, total)))
        if meta_items:
            with txn.cursor(db=self._meta) as cur:
                cur.putmulti(meta_items)
        requests = self._requests
        puts: list[tuple[bytes, bytes]] = []
        for key in b.dirty:
            rec = b.requests[key]
            if rec is None:
                txn.delete(key, db=requests)
            else:
                puts.append((key, _dumps(rec)))
        if puts:
            with txn.cursor(db=requests) as cur:
                cur.putmulti(puts)

    def tick(self, txn: lmdb.Transaction, now_ms: int) -> None:
        # Only once every logged event is processed: events logged later carry
        # a later ingest time, so closing now cannot cut off feedback that a
        # replay would count.
        store = self._store
        with txn.cursor(db=store.db("events")) as cur:
            last = decode_u64(cur.key()) if cur.last() else 0
        if read_cursor(txn, store, self.name) <= last:
            return
        self._close_until(txn, now_ms)
        self.end_batch(txn)

    def _begin(self, txn: lmdb.Transaction) -> _Batch:
        db = self._store.db
        self._meta, self._requests, self._windows = db("meta"), db("requests"), db("windows")
        self._samples, self._pairs, self._prompts = db("samples"), db("pairs"), db("prompts")
        self._closed = db("closed")
        # Every batch, not once: a first batch that failed and was retried
        # event by event took its weight-version record with it.
        self.bind(txn)
        raw = txn.get(COUNTERS_KEY, db=self._meta)
        b = self._batch = _Batch(txn, bytes(raw) if raw else _NO_COUNTERS)
        return b

    def _request(self, b: _Batch, key: bytes) -> _Doc | None:
        known: object = b.requests.get(key, _MISSING)  # None: known to be absent
        if known is not _MISSING:
            return cast("_Doc | None", known)
        raw = b.txn.get(key, db=self._requests)
        rec: _Doc | None = _loads(raw) if raw is not None else None
        b.requests[key] = rec
        return rec

    def _set_request(self, b: _Batch, key: bytes, rec: _Doc | None) -> None:
        b.requests[key] = rec
        b.dirty[key] = None

    # -- the join ------------------------------------------------------------

    def _on_inference(self, b: _Batch, seq: int, ingest_ms: int, inf: events_pb2.Inference) -> None:
        if inf.role not in _PRIMARY_ROLES:
            b.counters.non_primary += 1
            return
        rid = inf.request_id
        if not rid:
            raise ValueError("inference.request_id is empty")
        version = inf.model_version
        if not version:
            raise ValueError("inference.model_version is empty")
        txn = b.txn
        if self._on_version is not None:
            self._on_version(txn, version)
        key = rid.encode()
        prev = self._request(b, key)
        if prev is not None:
            if "o" not in prev:
                b.counters.duplicate_requests += 1
                return
            txn.delete(_WINDOW_KEY.pack(prev["dl"], prev["s"]), db=self._windows)
        error = inf.error
        perf = b.perf.get(version) or self._get_perf(b, version)
        perf.requests += 1
        if error:
            perf.errors += 1
        x = 1.0 if error else 0.0
        er = perf.error_recent
        perf.error_recent = x if perf.requests == 1 else er + self._alpha * (x - er)
        lp = list(inf.token_logprobs)
        attrs = inf.attributes
        deadline = ingest_ms + self._window_ms
        rec: _Doc = {
            "s": seq,
            "t": ingest_ms,
            "dl": deadline,
            "v": version,
            "p": inf.prompt,
            "r": inf.response,
            "e": 1 if error else 0,
            "u": inf.user_id,
            "ss": inf.session_id,
            "ro": inf.retry_of,
            "tk": attrs.get(self._task_attr, ""),
            "at": [[k, v] for k in self._keep_attrs if (v := attrs.get(k)) is not None],
            "lp": [sum(lp) / len(lp), min(lp), len(lp)] if lp else None,
            "sg": prev["sg"] if prev else [],
            "rt": prev["rt"] if prev else None,
            "cr": prev["cr"] if prev else "",
            "fs": prev["fs"] if prev else [],
        }
        b.requests[key] = rec
        b.dirty[key] = None
        self._add_window(b, deadline, seq, _KIND_INFERENCE + key)

    def _on_feedback(self, b: _Batch, seq: int, ingest_ms: int, fb: events_pb2.Feedback) -> None:
        rid = fb.request_id
        if not rid:
            raise ValueError("feedback.request_id is empty")
        key = rid.encode()
        rec = self._request(b, key)
        if rec is None:
            deadline = ingest_ms + self._window_ms
            rec = {
                "o": 1,
                "s": seq,
                "dl": deadline,
                "sg": [],
                "rt": None,
                "cr": "",
                "fs": [],
            }
            self._add_window(b, deadline, seq, _KIND_ORPHAN + key)
        elif "c" in rec:
            b.counters.late_feedback += 1
            return
        signal = fb.signal
        if signal:
            if signal not in _SIGNAL_NAMES:
                raise ValueError(f"feedback.signal: unknown value {signal}")
            rec["sg"].append(int(signal))
        threshold = self._dwell_ms
        if threshold and fb.dwell_ms >= threshold:
            rec["sg"].append(_ENGAGE)
        if fb.HasField("rating"):
            rec["rt"] = float(fb.rating)
        if fb.correction:
            rec["cr"] = fb.correction
        fs = rec["fs"]
        if fb.user_id:
            src = "user:" + fb.user_id
            if src not in fs:
                fs.append(src)
        if fb.session_id:
            src = "session:" + fb.session_id
            if src not in fs:
                fs.append(src)
        b.requests[key] = rec
        b.dirty[key] = None

    # -- closing windows -----------------------------------------------------

    def _add_window(self, b: _Batch, deadline: int, seq: int, value: bytes) -> None:
        b.txn.put(_WINDOW_KEY.pack(deadline, seq), value, db=self._windows)
        nd = b.next_deadline
        if nd is not None and deadline < nd:
            b.next_deadline = deadline

    def _close_until(self, txn: lmdb.Transaction, until_ms: int) -> None:
        """Closes every window that ends at or before ``until_ms`` (log time),
        and forgets the closed requests due by then.

        Part of the current batch: ``end_batch(txn)`` writes the outcome.
        """
        b = self._batch
        if b is None or b.txn is not txn:
            b = self._begin(txn)
        self._close_due(b, until_ms)

    def _close_due(self, b: _Batch, until_ms: int) -> None:
        # Windows close in (deadline, seq) order; closed requests due at or
        # before a window's deadline are forgotten before it closes.
        txn = b.txn
        close = self._close
        with txn.cursor(db=self._windows) as cur:
            k = cur.key() if cur.first() else b""
            while True:
                deadline = _unpack_u64(k)[0] if k else _NO_DEADLINE
                upto = deadline if deadline < until_ms else until_ms
                nx = b.next_expiry
                if nx is None or nx <= upto:
                    nx = b.next_expiry = self._forget_due(b, upto)
                if deadline > until_ms:
                    b.next_deadline = deadline if deadline < nx else nx
                    return
                value = bytes(cur.value())
                cur.delete()  # moves to the next window (an empty key past the last)
                close(b, value[:1], value[1:], deadline)
                k = cur.key()

    def _forget_due(self, b: _Batch, upto_ms: int) -> int:
        """Forgets closed requests due at or before ``upto_ms``; returns when
        the next one is due."""
        requests, dirty = b.requests, b.dirty
        with b.txn.cursor(db=self._closed) as cur:
            if not cur.first():
                return _NO_DEADLINE
            while True:
                k = cur.key()
                if not k:
                    return _NO_DEADLINE
                due = decode_u64(k)
                if due > upto_ms:
                    return due
                # Nothing replaces a closed request's record (its answer is a
                # duplicate, its feedback late) until it is forgotten here.
                key = bytes(cur.value())
                requests[key] = None
                dirty[key] = None
                cur.delete()

    def _closed_record(self, b: _Batch, key: bytes, deadline: int, seq: int, no: int) -> None:
        """Replaces a request's record by what later events need: its sample number."""
        self._set_request(b, key, {"c": no, "s": seq})
        due = deadline + self._forget_ms
        # Closes come in deadline order, so this is normally the last key
        # (cheap to append); a clock step back makes it an ordinary insert.
        ck = _TIME_SEQ.pack(due, seq)
        txn = b.txn
        if not txn.put(ck, key, db=self._closed, append=True):
            txn.put(ck, key, db=self._closed)
        nx = b.next_expiry
        if nx is not None and due < nx:
            b.next_expiry = due

    def _close(self, b: _Batch, kind: bytes, key: bytes, deadline: int) -> None:
        rec = self._request(b, key)
        if rec is None:
            return
        counters = b.counters
        if kind == _KIND_ORPHAN:
            if "o" in rec:
                self._set_request(b, key, None)
                counters.orphans_dropped += 1
            return
        txn = b.txn
        sg = rec["sg"]
        signed, has_feedback, reward_raw = score_parts(sg, rec["rt"], self.table)
        version = rec["v"]
        sources: list[str] = rec["fs"]
        if not sources:
            # Feedback that names no one is attributed to whoever was served.
            if rec["u"]:
                sources = ["user:" + rec["u"]]
            if rec["ss"]:
                sources = [*sources, "session:" + rec["ss"]]
        if has_feedback:
            self._perf_feedback(b, version, reward_raw, signed)
            src_stats = b.sources
            for src in sources:
                skey = SOURCE_PREFIX + src.encode()
                st = src_stats.get(skey)
                if st is None:
                    old = txn.get(skey, db=self._meta)
                    st = src_stats[skey] = list(_SOURCE.unpack(old)) if old else [0, 0.0]
                st[0] += 1
                st[1] += signed
        seq = rec["s"]
        if rec["e"] or not rec["p"] or not rec["r"]:
            counters.closed_other += 1
            self._closed_record(b, key, deadline, seq, 0)
            return
        counters.samples += 1
        no = counters.samples
        lp = rec["lp"]
        qualifies = reward_raw >= self._quality
        # Sample's fields, in its order: the same bytes as Sample.to_json.
        doc: _Doc = {
            "no": no,
            "seq": seq,
            "request_id": key.decode(),
            "prompt": rec["p"],
            "completion": rec["r"],
            "reward": _round6(reward_raw),
            "signed": _round6(signed),
            "has_feedback": has_feedback,
            "qualifies": qualifies,
            "model_version": version,
            "task_id": rec["tk"],
            "user_id": rec["u"],
            "session_id": rec["ss"],
            "sources": sources,
            "signals": [_SIGNAL_NAMES[x] for x in sorted(set(sg))] if sg else [],
            "rating": rec["rt"],
            "logprob_mean": _round6(lp[0]) if lp else None,
            "logprob_min": _round6(lp[1]) if lp else None,
            "n_tokens": lp[2] if lp else 0,
            "closed_ms": deadline,
            "ingest_ms": rec["t"],
            "weight_version": self.weight_version or 0,
            "source": "new",
            "quarantined": False,
            # kept attributes are [str, str] pairs (a record's own JSON)
            "attributes": rec.get("at") or [],
        }
        if qualifies:
            counters.sft += 1
        if has_feedback:
            counters.feedback_samples += 1
        skey = encode_u64(no)
        b.samples[skey] = doc
        b.sample_rows.append((skey, _dumps(doc)))
        if rec["cr"] or rec["ro"] or (has_feedback and self.config.pair_lookback):
            for pair in self._pairs_for(b, doc, rec):
                counters.pairs += 1
                pair["no"] = counters.pairs
                raw = _dumps(pair)
                b.pair_rows.append((encode_u64(counters.pairs), raw))
                if self.pair_listeners:
                    pair_obj = Pair.from_json(raw)
                    for plisten in self.pair_listeners:
                        plisten(txn, pair_obj)
        self._closed_record(b, key, deadline, seq, no)
        for dlisten in self.sample_document_listeners:
            dlisten(txn, doc)
        if self.sample_listeners:
            sample = _sample(doc)
            for listen in self.sample_listeners:
                listen(txn, sample)

    # -- preference pairs ----------------------------------------------------

    def _sample_doc(self, b: _Batch, skey: bytes) -> _Doc:
        doc = b.samples.get(skey)
        if doc is None:
            doc = b.samples[skey] = _loads(_must(b.txn.get(skey, db=self._samples)))
        return doc

    def _pairs_for(self, b: _Batch, s: _Doc, rec: _Doc) -> list[_Doc]:
        out: list[_Doc] = []
        correction = rec["cr"]
        completion = s["completion"]
        if correction and correction != completion:
            out.append(
                {
                    "no": 0,
                    "kind": "edit",
                    "prompt": s["prompt"],
                    "chosen": correction,
                    "rejected": completion,
                    "margin": _round6(1.0 - s["reward"]),
                    "reward": 1.0,
                    "seqs": [s["seq"], s["seq"]],
                    "request_ids": [s["request_id"], s["request_id"]],
                    "sources": s["sources"],
                    "task_id": s["task_id"],
                    "closed_ms": s["closed_ms"],
                    "weight_version": s["weight_version"],
                    "source": "new",
                    "quarantined": False,
                }
            )
        if rec["ro"]:
            prev_rec = self._request(b, rec["ro"].encode())
            prev_no = prev_rec.get("c", 0) if prev_rec else 0
            if prev_no:
                prev = self._sample_doc(b, encode_u64(prev_no))
                if prev["completion"] != completion:
                    # A retry says the user rejected the earlier answer, unless
                    # its own feedback scored it higher than the retry.
                    if prev["reward"] > s["reward"]:
                        out.append(_pair("retry", prev, s))
                    else:
                        out.append(_pair("retry", s, prev))
        config = self.config
        if s["has_feedback"] and config.pair_lookback:
            # one pair per two answers: a retry pair already says it
            paired = {seq for p in out for seq in p["seqs"]} if out else ()
            prompt = s["prompt"]
            reward = s["reward"]
            prefix = hashlib.sha256(prompt.encode()).digest()[:12]
            mine = _completion_hash(completion)
            margin = config.pair_margin
            room = config.pairs_per_sample
            lookback = config.pair_lookback
            own_key = prefix + encode_u64(s["no"])
            cur = b.prompts_cursor
            if cur is None:
                cur = b.prompts_cursor = b.txn.cursor(db=self._prompts)
            seen = 0
            ok = cur.set_range(own_key)
            ok = cur.prev() if ok else cur.last()
            while ok and seen < lookback and room > 0:
                k = cur.key()
                if k[:12] != prefix:
                    break
                seen += 1
                other_reward, chash = _PROMPT_ENTRY.unpack(cur.value())
                if chash != mine and abs(reward - other_reward) >= margin:
                    other = self._sample_doc(b, bytes(k[12:]))
                    if other["prompt"] == prompt and other["seq"] not in paired:
                        room -= 1
                        if reward > other["reward"]:
                            out.append(_pair("score", s, other))
                        else:
                            out.append(_pair("score", other, s))
                ok = cur.prev()
            cur.put(own_key, _PROMPT_ENTRY.pack(reward, mine))
        return out

    # -- per-version feedback --------------------------------------------------

    def _get_perf(self, b: _Batch, version: str) -> VersionFeedback:
        perf = b.perf.get(version)
        if perf is None:
            raw = b.txn.get(PERF_PREFIX + version.encode(), db=self._meta)
            perf = b.perf[version] = VersionFeedback.unpack(raw)
        return perf

    def _perf_feedback(self, b: _Batch, version: str, reward: float, signed: float) -> None:
        perf = self._get_perf(b, version)
        perf.feedback_n += 1
        perf.reward_sum += reward
        perf.signed_sum += signed
        perf.reward_recent = (
            reward
            if perf.feedback_n == 1
            else perf.reward_recent + self._alpha * (reward - perf.reward_recent)
        )
        if perf.baseline_n < self._baseline_n:
            perf.baseline_n += 1
            perf.baseline_sum += reward


def _pair(kind: str, chosen: _Doc, rejected: _Doc) -> _Doc:
    """A pair document (Pair's fields, in its order); ``no`` is set on storing."""
    return {
        "no": 0,
        "kind": kind,
        "prompt": chosen["prompt"],
        "chosen": chosen["completion"],
        "rejected": rejected["completion"],
        "margin": _round6(chosen["reward"] - rejected["reward"]),
        "reward": chosen["reward"],
        "seqs": [chosen["seq"], rejected["seq"]],
        "request_ids": [chosen["request_id"], rejected["request_id"]],
        "sources": list(dict.fromkeys(chosen["sources"] + rejected["sources"])),
        "task_id": chosen["task_id"] or rejected["task_id"],
        "closed_ms": max(chosen["closed_ms"], rejected["closed_ms"]),
        "weight_version": chosen["weight_version"],
        "source": "new",
        "quarantined": False,
    }


def _sample(doc: _Doc) -> Sample:
    return Sample(
        **{
            **doc,
            "sources": tuple(doc["sources"]),
            "signals": tuple(doc["signals"]),
            "attributes": tuple((k, v) for k, v in doc["attributes"]),
        }
    )


_floor = math.floor


def _round6(x: float) -> float:
    """``round(x, 6)``, bit for bit, without its decimal round trip in the usual case.

    ``x * 1e6`` is within 6e-8 of the exact product for ``|x| < 1000``, so
    unless that product sits near a half (where the two could round apart)
    its nearest integer is the one ``round`` finds; ``n / 1e6`` is then the
    double nearest to ``n`` millionths, which is what ``round`` returns.
    """
    m = x * 1e6
    if -1e9 < m < 1e9:
        f = _floor(m)
        r = m - f
        if not 0.4999 < r < 0.5001:
            n = f + 1 if r > 0.5 else f
            if n:
                return n / 1e6
            return math.copysign(0.0, x)  # round keeps the sign of a zero
    return round(x, 6)


def _completion_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


def _must(raw: bytes | memoryview | None) -> bytes | memoryview:
    if raw is None:
        raise LookupError("scoring views are inconsistent: a referenced sample is missing")
    return raw
