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
highest first, so the learning batch takes the best samples without
rescoring everything. Layout:

- ``v`` + u32 (inverted value) + sample id: the sample's features (JSON)
- ``s`` + sample id: its current ``v`` key (to replace or drop it)
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
from sidecar.store import Store

__all__ = ["CandidateSample", "SelectiveLearner", "ValueFeatures", "ValuedSample"]

_U32 = struct.Struct(">I")
_SCALE = 0xFFFFFFFF


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
    ) -> list[ValuedSample]:
        """Values each sample and (with ``index``) files it in the priority index.

        Each sample's reward also updates its task's running mean, after its
        own error was measured against the previous mean; samples are taken
        in the order given, so the same input gives the same values.
        """
        c = self._c
        if vectors is None:
            vectors = self._memory.vectorizer.vectorize([s.text for s in samples])
        tasks = [self._memory.task_of(s.attributes) for s in samples]
        novelty = self._novelty(txn, tasks, vectors)
        out: list[ValuedSample] = []
        means: dict[str, tuple[float, int]] = {}
        for s, task, nov in zip(samples, tasks, novelty, strict=True):
            u = uncertainty(s.token_logprobs, c.uncertainty)
            if task not in means:
                means[task] = self._expected(txn, task)
            mean, n = means[task]
            attr = s.attributes.get(c.expected_score_attribute)
            expected = _level(attr, {}, mean) if attr else mean
            reward = min(1.0, max(0.0, float(s.reward)))
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
            out.append(ValuedSample(sample=s, task_id=task, features=f, value=self.value(f)))
        if index:
            db = self._db()
            for task, (mean, n) in means.items():
                doc = {"task_id": task, "mean": mean, "n": n}
                txn.put(b"e" + task_key(task), json.dumps(doc).encode(), db=db)
            for v in out:
                self._file(txn, v)
        return out

    def _file(self, txn: lmdb.Transaction, v: ValuedSample) -> None:
        db = self._db()
        sid = id_key(v.sample.sample_id)
        old = txn.get(b"s" + sid, db=db)
        if old is not None:
            txn.delete(bytes(old), db=db)
        key = _value_key(v.value, sid)
        doc = {
            "sample_id": v.sample.sample_id,
            "task_id": v.task_id,
            "value": v.value,
            **asdict(v.features),
        }
        txn.put(key, json.dumps(doc).encode(), db=db)
        txn.put(b"s" + sid, key, db=db)

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
        return n

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
        return {"indexed": indexed, "above_threshold": above, "value_threshold": threshold}
