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
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from typing import Any

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
from sidecar.scoring._weights import WeightTable, ensure_weight_version, score_feedback
from sidecar.store import Store, decode_u64, encode_u64, read_cursor

__all__ = ["FeedbackProcessor", "SampleListener", "table_from_config"]

S = events_pb2.Signal
_PRIMARY_ROLES = (events_pb2.ROLE_UNSPECIFIED, events_pb2.PRIMARY)
_SIGNAL_NAMES = {v: k for k, v in S.items()}
_ENGAGE = S.ENGAGE
_SOURCE = struct.Struct(">Qd")
_PROMPT_ENTRY = struct.Struct(">d8s")
_KIND_INFERENCE = b"i"
_KIND_ORPHAN = b"o"

#: Called on the writer thread, inside the closing transaction, for each new
#: sample. Must be deterministic (replays call it again) and must not block.
SampleListener = Callable[[lmdb.Transaction, Sample], None]
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


class FeedbackProcessor:
    """The join + scoring + curation processor (cursor ``scoring``).

    ``on_primary_version(txn, version)`` is called for each PRIMARY answer's
    model version (the registry uses it to learn the initial stable version).
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
    ) -> None:
        self._store = store
        self.config = config
        self.table = table_from_config(config)
        self._window_ms = int(config.reward_window_seconds * 1000)
        self._baseline_n = baseline_samples
        self._alpha = 2.0 / (recent_samples + 1)
        self._on_version = on_primary_version
        self.weight_version: int | None = None
        # Read caches of values this processor itself wrote in the current
        # transaction (every write still goes to the store): a new
        # transaction object, including a retry after an abort, starts empty.
        self._cache_txn: lmdb.Transaction | None = None
        self._counters: ScoringCounters | None = None
        self._perf: dict[str, VersionFeedback] = {}
        self.sample_listeners: list[SampleListener] = []
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
        if self.weight_version is None:
            self.bind(txn)
        self._close_until(txn, ingest_ms)
        kind = event.WhichOneof("payload")
        if kind == "inference":
            self._on_inference(txn, seq, ingest_ms, event.inference)
        elif kind == "feedback":
            self._on_feedback(txn, seq, ingest_ms, event.feedback)
        else:
            raise ValueError("event has no payload (expected inference or feedback)")

    def tick(self, txn: lmdb.Transaction, now_ms: int) -> None:
        # Only once every logged event is processed: events logged later carry
        # a later ingest time, so closing now cannot cut off feedback that a
        # replay would count.
        store = self._store
        with txn.cursor(db=store.db("events")) as cur:
            last = decode_u64(cur.key()) if cur.last() else 0
        if read_cursor(txn, store, self.name) <= last:
            return
        if self.weight_version is None:
            self.bind(txn)
        self._close_until(txn, now_ms)

    # -- the join ------------------------------------------------------------

    def _on_inference(
        self, txn: lmdb.Transaction, seq: int, ingest_ms: int, inf: events_pb2.Inference
    ) -> None:
        if inf.role not in _PRIMARY_ROLES:
            self._bump(txn, "non_primary")
            return
        rid = inf.request_id
        if not rid:
            raise ValueError("inference.request_id is empty")
        version = inf.model_version
        if not version:
            raise ValueError("inference.model_version is empty")
        if self._on_version is not None:
            self._on_version(txn, version)
        store = self._store
        requests = store.db("requests")
        key = rid.encode()
        raw = txn.get(key, db=requests)
        early: dict[str, Any] | None = None
        if raw is not None:
            prev = _loads(raw)
            if "o" not in prev:
                self._bump(txn, "duplicate_requests")
                return
            early = prev
            txn.delete(encode_u64(prev["dl"]) + encode_u64(prev["s"]), db=store.db("windows"))
        self._perf_request(txn, version, inf.error)
        lp = inf.token_logprobs
        deadline = ingest_ms + self._window_ms
        rec: dict[str, Any] = {
            "s": seq,
            "t": ingest_ms,
            "dl": deadline,
            "v": version,
            "p": inf.prompt,
            "r": inf.response,
            "e": 1 if inf.error else 0,
            "u": inf.user_id,
            "ss": inf.session_id,
            "ro": inf.retry_of,
            "tk": inf.attributes.get("task_id", ""),
            "lp": [sum(lp) / len(lp), min(lp), len(lp)] if lp else None,
            "sg": early["sg"] if early else [],
            "rt": early["rt"] if early else None,
            "cr": early["cr"] if early else "",
            "fs": early["fs"] if early else [],
        }
        txn.put(key, _dumps(rec), db=requests)
        txn.put(
            encode_u64(deadline) + encode_u64(seq),
            _KIND_INFERENCE + key,
            db=store.db("windows"),
        )

    def _on_feedback(
        self, txn: lmdb.Transaction, seq: int, ingest_ms: int, fb: events_pb2.Feedback
    ) -> None:
        rid = fb.request_id
        if not rid:
            raise ValueError("feedback.request_id is empty")
        store = self._store
        requests = store.db("requests")
        key = rid.encode()
        raw = txn.get(key, db=requests)
        if raw is None:
            deadline = ingest_ms + self._window_ms
            rec: dict[str, Any] = {
                "o": 1,
                "s": seq,
                "dl": deadline,
                "sg": [],
                "rt": None,
                "cr": "",
                "fs": [],
            }
            txn.put(
                encode_u64(deadline) + encode_u64(seq),
                _KIND_ORPHAN + key,
                db=store.db("windows"),
            )
        else:
            rec = _loads(raw)
            if "c" in rec:
                self._bump(txn, "late_feedback")
                return
        if fb.signal:
            if fb.signal not in _SIGNAL_NAMES:
                raise ValueError(f"feedback.signal: unknown value {fb.signal}")
            rec["sg"].append(int(fb.signal))
        threshold = self.config.dwell_engage_ms
        if threshold and fb.dwell_ms >= threshold:
            rec["sg"].append(int(_ENGAGE))
        if fb.HasField("rating"):
            rec["rt"] = float(fb.rating)
        if fb.correction:
            rec["cr"] = fb.correction
        fs = rec["fs"]
        for src in (
            "user:" + fb.user_id if fb.user_id else "",
            "session:" + fb.session_id if fb.session_id else "",
        ):
            if src and src not in fs:
                fs.append(src)
        txn.put(key, _dumps(rec), db=requests)

    # -- closing windows -----------------------------------------------------

    def _close_until(self, txn: lmdb.Transaction, until_ms: int) -> None:
        windows = self._store.db("windows")
        with txn.cursor(db=windows) as cur:
            while cur.first():
                k = cur.key()
                if decode_u64(k) > until_ms:
                    return
                value = bytes(cur.value())
                cur.delete()
                self._close(txn, value[:1], value[1:], decode_u64(k))

    def _close(self, txn: lmdb.Transaction, kind: bytes, key: bytes, deadline: int) -> None:
        store = self._store
        requests = store.db("requests")
        raw = txn.get(key, db=requests)
        if raw is None:
            return
        rec = _loads(raw)
        if kind == _KIND_ORPHAN:
            if "o" in rec:
                txn.delete(key, db=requests)
                self._bump(txn, "orphans_dropped")
            return
        meta = store.db("meta")
        counters = self._get_counters(txn)
        table = self.table
        score = score_feedback(rec["sg"], rec["rt"], table)
        version = rec["v"]
        sources: list[str] = rec["fs"]
        if not sources:
            # Feedback that names no one is attributed to whoever was served.
            if rec["u"]:
                sources = ["user:" + rec["u"]]
            if rec["ss"]:
                sources = [*sources, "session:" + rec["ss"]]
        if score.has_feedback:
            self._perf_feedback(txn, version, score.reward, score.signed)
            for src in sources:
                skey = SOURCE_PREFIX + src.encode()
                old = txn.get(skey, db=meta)
                n, total = _SOURCE.unpack(old) if old else (0, 0.0)
                txn.put(skey, _SOURCE.pack(n + 1, total + score.signed), db=meta)
        if rec["e"] or not rec["p"] or not rec["r"]:
            counters.closed_other += 1
            self._put_counters(txn, counters)
            txn.put(key, _dumps({"c": 0, "s": rec["s"]}), db=requests)
            return
        counters.samples += 1
        no = counters.samples
        lp = rec["lp"]
        qualifies = score.reward >= self.config.quality_threshold
        sample = Sample(
            no=no,
            seq=rec["s"],
            request_id=key.decode(),
            prompt=rec["p"],
            completion=rec["r"],
            reward=round(score.reward, 6),
            signed=round(score.signed, 6),
            has_feedback=score.has_feedback,
            qualifies=qualifies,
            model_version=version,
            task_id=rec["tk"],
            user_id=rec["u"],
            session_id=rec["ss"],
            sources=tuple(sources),
            signals=tuple(_SIGNAL_NAMES[s] for s in sorted(set(rec["sg"]))),
            rating=rec["rt"],
            logprob_mean=round(lp[0], 6) if lp else None,
            logprob_min=round(lp[1], 6) if lp else None,
            n_tokens=lp[2] if lp else 0,
            closed_ms=deadline,
            ingest_ms=rec["t"],
            weight_version=self.weight_version or 0,
        )
        if qualifies:
            counters.sft += 1
        if score.has_feedback:
            counters.feedback_samples += 1
        txn.put(encode_u64(no), sample.to_json(), db=store.db("samples"), append=True)
        pairs = self._pairs_for(txn, sample, rec)
        for pair in pairs:
            counters.pairs += 1
            pair = _renumber(pair, counters.pairs)
            txn.put(encode_u64(pair.no), pair.to_json(), db=store.db("pairs"), append=True)
            for plisten in self.pair_listeners:
                plisten(txn, pair)
        self._put_counters(txn, counters)
        txn.put(key, _dumps({"c": no, "s": rec["s"]}), db=requests)
        for listen in self.sample_listeners:
            listen(txn, sample)

    # -- preference pairs ----------------------------------------------------

    def _pairs_for(self, txn: lmdb.Transaction, s: Sample, rec: dict[str, Any]) -> list[Pair]:
        out: list[Pair] = []
        correction = rec["cr"]
        if correction and correction != s.completion:
            out.append(
                Pair(
                    no=0,
                    kind="edit",
                    prompt=s.prompt,
                    chosen=correction,
                    rejected=s.completion,
                    margin=round(1.0 - s.reward, 6),
                    reward=1.0,
                    seqs=(s.seq, s.seq),
                    request_ids=(s.request_id, s.request_id),
                    sources=s.sources,
                    task_id=s.task_id,
                    closed_ms=s.closed_ms,
                    weight_version=s.weight_version,
                )
            )
        samples = self._store.db("samples")
        if rec["ro"]:
            raw = txn.get(rec["ro"].encode(), db=self._store.db("requests"))
            prev_no = _loads(raw).get("c", 0) if raw else 0
            if prev_no:
                prev = Sample.from_json(_must(txn.get(encode_u64(prev_no), db=samples)))
                if prev.completion != s.completion:
                    # A retry says the user rejected the earlier answer, unless
                    # its own feedback scored it higher than the retry.
                    if prev.reward > s.reward:
                        out.append(self._pair("retry", prev, s))
                    else:
                        out.append(self._pair("retry", s, prev))
        # one pair per two answers: a retry pair already says it
        paired = {seq for p in out for seq in p.seqs}
        if s.has_feedback and self.config.pair_lookback:
            prompts = self._store.db("prompts")
            prefix = hashlib.sha256(s.prompt.encode()).digest()[:12]
            mine = _completion_hash(s.completion)
            margin = self.config.pair_margin
            room = self.config.pairs_per_sample
            with txn.cursor(db=prompts) as cur:
                seen = 0
                ok = cur.set_range(prefix + encode_u64(s.no))
                ok = cur.prev() if ok else cur.last()
                while ok and seen < self.config.pair_lookback and room > 0:
                    k = cur.key()
                    if k[:12] != prefix:
                        break
                    seen += 1
                    reward, chash = _PROMPT_ENTRY.unpack(cur.value())
                    if chash != mine and abs(s.reward - reward) >= margin:
                        other = Sample.from_json(_must(txn.get(k[12:], db=samples)))
                        if other.prompt == s.prompt and other.seq not in paired:
                            room -= 1
                            if s.reward > other.reward:
                                out.append(self._pair("score", s, other))
                            else:
                                out.append(self._pair("score", other, s))
                    ok = cur.prev()
            txn.put(prefix + encode_u64(s.no), _PROMPT_ENTRY.pack(s.reward, mine), db=prompts)
        return out

    @staticmethod
    def _pair(kind: str, chosen: Sample, rejected: Sample) -> Pair:
        sources = tuple(dict.fromkeys(chosen.sources + rejected.sources))
        return Pair(
            no=0,
            kind=kind,
            prompt=chosen.prompt,
            chosen=chosen.completion,
            rejected=rejected.completion,
            margin=round(chosen.reward - rejected.reward, 6),
            reward=chosen.reward,
            seqs=(chosen.seq, rejected.seq),
            request_ids=(chosen.request_id, rejected.request_id),
            sources=sources,
            task_id=chosen.task_id or rejected.task_id,
            closed_ms=max(chosen.closed_ms, rejected.closed_ms),
            weight_version=chosen.weight_version,
        )

    # -- counters and per-version feedback ------------------------------------

    def _check_cache(self, txn: lmdb.Transaction) -> None:
        if self._cache_txn is not txn:
            self._cache_txn = txn
            self._counters = None
            self._perf.clear()

    def _get_counters(self, txn: lmdb.Transaction) -> ScoringCounters:
        self._check_cache(txn)
        if self._counters is None:
            self._counters = ScoringCounters.unpack(
                txn.get(COUNTERS_KEY, db=self._store.db("meta"))
            )
        return self._counters

    def _put_counters(self, txn: lmdb.Transaction, counters: ScoringCounters) -> None:
        txn.put(COUNTERS_KEY, counters.pack(), db=self._store.db("meta"))

    def _get_perf(self, txn: lmdb.Transaction, version: str) -> VersionFeedback:
        self._check_cache(txn)
        perf = self._perf.get(version)
        if perf is None:
            raw = txn.get(PERF_PREFIX + version.encode(), db=self._store.db("meta"))
            perf = self._perf[version] = VersionFeedback.unpack(raw)
        return perf

    def _bump(self, txn: lmdb.Transaction, name: str) -> None:
        counters = self._get_counters(txn)
        setattr(counters, name, getattr(counters, name) + 1)
        self._put_counters(txn, counters)

    def _perf_request(self, txn: lmdb.Transaction, version: str, error: bool) -> None:
        meta = self._store.db("meta")
        key = PERF_PREFIX + version.encode()
        perf = self._get_perf(txn, version)
        perf.requests += 1
        x = 1.0 if error else 0.0
        if error:
            perf.errors += 1
        perf.error_recent = (
            x if perf.requests == 1 else perf.error_recent + self._alpha * (x - perf.error_recent)
        )
        txn.put(key, perf.pack(), db=meta)

    def _perf_feedback(
        self, txn: lmdb.Transaction, version: str, reward: float, signed: float
    ) -> None:
        meta = self._store.db("meta")
        key = PERF_PREFIX + version.encode()
        perf = self._get_perf(txn, version)
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
        txn.put(key, perf.pack(), db=meta)


def _completion_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


def _must(raw: bytes | memoryview | None) -> bytes | memoryview:
    if raw is None:
        raise LookupError("scoring views are inconsistent: a referenced sample is missing")
    return raw


def _renumber(pair: Pair, no: int) -> Pair:
    from dataclasses import replace

    return replace(pair, no=no)
