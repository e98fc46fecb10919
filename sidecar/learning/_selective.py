"""SelectiveLearner: how much a sample is worth learning from.

A sample's value is a weighted mean of five features, each in [0, 1]:

- uncertainty: how unsure the model was (from its token log-probs);
- novelty: 1 minus the highest cosine similarity to the task's episodic
  memory (hashed character n-gram vectors), so what memory already covers
  is worth less;
- error: the gap between the reward the model was expected to get (an
  ``expected_score`` attribute, else the task's running mean) and the one it
  got; a surprise, good or bad, is informative;
- expertise: how much the user's judgment counts (attribute);
- priority: how much the task matters (attribute or per-task config).

Values are kept in the ``priority`` database as an index ordered by value,
highest first. Between updates the index holds exactly the pending samples:
good samples that a learning batch left out only because it was full
(``selective.max_batch_samples``). The next batch composition offers them
again (:meth:`SelectiveLearner.pending_samples`), values them anew (memory
has moved on) and ranks them with the samples that arrived since; what is
neither chosen nor kept pending is dropped (:meth:`SelectiveLearner.keep_pending`).
Layout:

- ``v`` + u32 (inverted value) + sample id: the sample's features, and its
  sample number and reward window's end when known (JSON)
- ``s`` + sample id: its current ``v`` key (to replace or drop it)
- ``n``: how many samples the index holds (u64), so the scheduler's pending
  count is one read
- ``e`` + 8-byte task digest: the task's running mean reward
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import lmdb
import numpy as np

from sidecar.config import SelectiveConfig
from sidecar.learning._keys import id_key, task_key
from sidecar.learning._memory import MemoryConsolidation
from sidecar.learning._vectors import Matrix, uncertainty
from sidecar.store import Store, decode_u64, encode_u64

__all__ = ["CandidateSample", "SelectiveLearner", "ValueFeatures", "ValuedSample"]

_U32 = struct.Struct(">I")
_SCALE = 0xFFFFFFFF
_COUNT_KEY = b"n"


@dataclass(frozen=True, slots=True)
class CandidateSample:
    """A curated sample offered to the learning batch."""

    sample_id: str
    prompt: str
    completion: str
    #: the [0, 1] training reward
    reward: float
    token_logprobs: Sequence[float] = ()
    attributes: Mapping[str, str] = field(default_factory=dict)
    #: The sample's number in the ``samples`` database (0: not stored there);
    #: a pending sample is offered again by it.
    no: int = 0
    #: End of its reward window (log time, ms; 0: unknown): its age.
    closed_ms: int = 0

    @property
    def text(self) -> str:
        return f"{self.prompt}\n{self.completion}"


@dataclass(frozen=True, slots=True)
class ValueFeatures:
    uncertainty: float
    novelty: float
    error: float
    expertise: float
    priority: float


@dataclass(frozen=True, slots=True)
class ValuedSample:
    sample: CandidateSample
    task_id: str
    features: ValueFeatures
    value: float
    #: It was in the index already (pending from an earlier batch): valued
    #: again, its reward not counted again in its task's running mean.
    carried: bool = False


def _level(raw: str | None, levels: Mapping[str, float], default: float) -> float:
    """A number in [0, 1] or a named level; anything else is the default."""
    if raw is None or raw == "":
        return default
    named = levels.get(raw.strip().lower())
    if named is not None:
        return float(named)
    try:
        x = float(raw)
    except ValueError:
        return default
    if not math.isfinite(x):
        return default
    return min(1.0, max(0.0, x))


def _value_key(value: float, sid: bytes) -> bytes:
    return b"v" + _U32.pack(round((1.0 - value) * _SCALE)) + sid


class SelectiveLearner:
    """Scores samples and keeps the persisted priority index.

    Methods taking a transaction that write (``assess``, ``forget``) belong on
    the store's writer thread.
    """

    def __init__(self, store: Store, config: SelectiveConfig, memory: MemoryConsolidation) -> None:
        self._store = store
        self._c = config
        self._memory = memory
        w = np.array(
            [
                config.uncertainty_weight,
                config.novelty_weight,
                config.error_weight,
                config.expertise_weight,
                config.priority_weight,
            ],
            dtype=np.float64,
        )
        total = float(w.sum())
        self._weights = w / total if total > 0 else np.full(5, 0.2)

    @property
    def config(self) -> SelectiveConfig:
        return self._c

    def _db(self) -> Any:
        return self._store.db("priority")

    # -- features ----------------------------------------------------------

    def value(self, f: ValueFeatures) -> float:
        """The weighted mean of the features, in [0, 1]."""
        x = np.array([f.uncertainty, f.novelty, f.error, f.expertise, f.priority])
        return float(min(1.0, max(0.0, float(self._weights @ x))))

    def _expected(self, txn: lmdb.Transaction, task: str) -> tuple[float, int]:
        raw = txn.get(b"e" + task_key(task), db=self._db())
        if raw is None:
            return 0.5, 0
        doc = json.loads(bytes(raw))
        return float(doc["mean"]), int(doc["n"])

    def _novelty(self, txn: lmdb.Transaction, tasks: Sequence[str], vectors: Matrix) -> list[float]:
        out = [1.0] * len(tasks)
        by_task: dict[str, list[int]] = {}
        for i, t in enumerate(tasks):
            by_task.setdefault(t, []).append(i)
        for task, idxs in by_task.items():
            mem = self._memory.task_matrix(txn, task)
            if mem.shape[0] == 0:
                continue
            sims = vectors[idxs] @ mem.T
            best = sims.max(axis=1)
            for j, i in enumerate(idxs):
                out[i] = float(min(1.0, max(0.0, 1.0 - float(best[j]))))
        return out

    def assess(
        self,
        txn: lmdb.Transaction,
        samples: Sequence[CandidateSample],
        vectors: Matrix | None = None,
        *,
        index: bool = True,
        file: bool | None = None,
    ) -> list[ValuedSample]:
        """Values each sample; with ``index`` stores the tasks' running means
        and (unless ``file`` is False) files each sample in the priority index.

        Each sample's reward also updates its task's running mean, after its
        own error was measured against the previous mean, once: a sample
        already in the index (pending) is valued against the mean but does
        not move it again. Samples are taken in the order given, so the same
        input gives the same values.
        """
        c = self._c
        if vectors is None:
            vectors = self._memory.vectorizer.vectorize([s.text for s in samples])
        tasks = [self._memory.task_of(s.attributes) for s in samples]
        novelty = self._novelty(txn, tasks, vectors)
        db = self._db()
        old_keys = [txn.get(b"s" + id_key(s.sample_id), db=db) for s in samples]
        out: list[ValuedSample] = []
        means: dict[str, tuple[float, int]] = {}
        for s, task, nov, old in zip(samples, tasks, novelty, old_keys, strict=True):
            u = uncertainty(s.token_logprobs, c.uncertainty)
            if task not in means:
                means[task] = self._expected(txn, task)
            mean, n = means[task]
            attr = s.attributes.get(c.expected_score_attribute)
            expected = _level(attr, {}, mean) if attr else mean
            reward = min(1.0, max(0.0, float(s.reward)))
            if old is None:
                alpha = max(c.expected_score_alpha, 1.0 / (n + 1))
                means[task] = (mean + alpha * (reward - mean), n + 1)
            priority_default = c.task_priorities.get(task, c.default_priority)
            f = ValueFeatures(
                uncertainty=c.default_uncertainty if u is None else u,
                novelty=nov,
                error=abs(expected - reward),
                expertise=_level(
                    s.attributes.get(c.expertise_attribute),
                    c.expertise_levels,
                    c.default_expertise,
                ),
                priority=_level(
                    s.attributes.get(c.priority_attribute), c.priority_levels, priority_default
                ),
            )
            out.append(
                ValuedSample(
                    sample=s,
                    task_id=task,
                    features=f,
                    value=self.value(f),
                    carried=old is not None,
                )
            )
        if index:
            for task, (mean, n) in means.items():
                doc = {"task_id": task, "mean": mean, "n": n}
                txn.put(b"e" + task_key(task), json.dumps(doc).encode(), db=db)
        if index and file is not False:
            count = self.pending_count(txn)
            # a sample offered twice in one call is filed once
            filed: dict[bytes, bytes] = {}
            for v, old in zip(out, old_keys, strict=True):
                sid = id_key(v.sample.sample_id)
                prev = filed.get(sid, None if old is None else bytes(old))
                filed[sid] = self._file(txn, v, sid, prev)
                count += prev is None
            self._set_count(txn, count)
        return out

    def _file(self, txn: lmdb.Transaction, v: ValuedSample, sid: bytes, old: bytes | None) -> bytes:
        db = self._db()
        if old is not None:
            txn.delete(old, db=db)
        key = _value_key(v.value, sid)
        doc = {
            "sample_id": v.sample.sample_id,
            "task_id": v.task_id,
            "value": v.value,
            **asdict(v.features),
            "no": v.sample.no,
            "closed_ms": v.sample.closed_ms,
        }
        txn.put(key, json.dumps(doc).encode(), db=db)
        txn.put(b"s" + sid, key, db=db)
        return key

    def _set_count(self, txn: lmdb.Transaction, n: int) -> None:
        txn.put(_COUNT_KEY, encode_u64(max(0, n)), db=self._db())

    # -- the index ---------------------------------------------------------

    def ranked(
        self,
        txn: lmdb.Transaction,
        *,
        threshold: float | None = None,
        limit: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Indexed samples, highest value first, down to ``threshold`` (inclusive)."""
        n = 0
        with txn.cursor(db=self._db()) as cur:
            if not cur.set_range(b"v"):
                return
            for key, raw in cur:
                if not bytes(key).startswith(b"v"):
                    break
                doc: dict[str, Any] = json.loads(bytes(raw))
                if threshold is not None and doc["value"] < threshold:
                    break
                yield doc
                n += 1
                if limit is not None and n >= limit:
                    break

    def value_of(self, txn: lmdb.Transaction, sample_id: str) -> float | None:
        db = self._db()
        key = txn.get(b"s" + id_key(sample_id), db=db)
        if key is None:
            return None
        raw = txn.get(bytes(key), db=db)
        return None if raw is None else float(json.loads(bytes(raw))["value"])

    def forget(self, txn: lmdb.Transaction, sample_ids: Sequence[str]) -> int:
        """Drops samples from the index (once trained on). Returns how many were there."""
        db = self._db()
        n = 0
        for sample_id in sample_ids:
            sid = id_key(sample_id)
            key = txn.get(b"s" + sid, db=db)
            if key is None:
                continue
            txn.delete(bytes(key), db=db)
            txn.delete(b"s" + sid, db=db)
            n += 1
        if n:
            self._set_count(txn, self.pending_count(txn) - n)
        return n

    def keep_pending(self, txn: lmdb.Transaction, pending: Sequence[ValuedSample]) -> int:
        """Makes the index hold exactly ``pending``, filed at their current
        values; drops every other entry. Returns how many were dropped.
        Writer thread."""
        db = self._db()
        filed: dict[bytes, bytes] = {}
        with txn.cursor(db=db) as cur:
            if cur.set_range(b"s"):
                for key, vkey in cur:
                    k = bytes(key)
                    if not k.startswith(b"s"):
                        break
                    filed[k[1:]] = bytes(vkey)
        kept: set[bytes] = set()
        for v in pending:
            sid = id_key(v.sample.sample_id)
            if sid in kept:
                continue
            kept.add(sid)
            self._file(txn, v, sid, filed.pop(sid, None))
        for sid, vkey in filed.items():
            txn.delete(vkey, db=db)
            txn.delete(b"s" + sid, db=db)
        self._set_count(txn, len(kept))
        return len(filed)

    def pending_count(self, txn: lmdb.Transaction) -> int:
        """How many samples wait in the index for a later batch (one read)."""
        db = self._db()
        raw = txn.get(_COUNT_KEY, db=db)
        if raw is not None:
            return decode_u64(raw)
        # an index written before the count was kept: count it
        n = 0
        with txn.cursor(db=db) as cur:
            if cur.set_range(b"s"):
                for key in cur.iternext(keys=True, values=False):
                    if not bytes(key).startswith(b"s"):
                        break
                    n += 1
        return n

    def pending_samples(self, txn: lmdb.Transaction) -> list[tuple[int, str]]:
        """(sample number, sample id) of each pending sample, by sample number.

        Entries without a sample number (filed by a caller that had none)
        cannot be offered again and are left out; the next
        :meth:`keep_pending` drops them.
        """
        out: list[tuple[int, str]] = []
        for doc in self.ranked(txn):
            no = int(doc.get("no") or 0)
            if no > 0:
                out.append((no, str(doc["sample_id"])))
        out.sort()
        return out

    def status(self) -> dict[str, Any]:
        threshold = self._c.value_threshold
        indexed = above = 0
        with self._store.read() as txn, txn.cursor(db=self._db()) as cur:
            cut = _value_key(threshold, b"")
            if cur.set_range(b"v"):
                for key in cur.iternext(keys=True, values=False):
                    k = bytes(key)
                    if not k.startswith(b"v"):
                        break
                    indexed += 1
                    if k[:5] <= cut[:5]:
                        above += 1
        with self._store.read() as txn:
            pending = self.pending_count(txn)
        return {
            "indexed": indexed,
            "above_threshold": above,
            "value_threshold": threshold,
            # good samples a full batch left for a later update
            "pending": pending,
            "max_pending_samples": self._c.max_pending_samples,
        }
