"""MemoryConsolidation: a bounded episodic memory per task, chosen for diversity.

The seed kept the last N samples (first in, first out), so a task that stopped
appearing was forgotten as soon as N newer samples arrived, and a burst of
near-duplicates filled the whole memory. Here each task keeps up to
``capacity_per_task`` samples, and when a task's pool (its memory plus new
samples) exceeds that, the kept set is an importance-weighted greedy k-center
selection on the samples' text vectors: start from the most important sample,
then repeatedly keep the sample farthest (in cosine distance) from everything
kept so far, its distance stretched by its importance. Rare kinds of input
survive because they are far from the rest; near-duplicates collapse to one.

Everything is stored in the ``memory`` database and written on the writer
thread inside the caller's transaction, so a crash keeps memory and the
batch that fed it consistent. Layout (``th`` = 8-byte task digest):

- ``m`` + th + sample id: a remembered sample (JSON header + float16 vector)
- ``t`` + th: the task's record (name, first seen, samples offered)
- ``b`` + u64: task boundaries, in order
- ``c``: the current (majority) task of the last consolidated batch
"""

from __future__ import annotations

import json
import struct
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import lmdb
import numpy as np
import numpy.typing as npt

from sidecar.config import MemoryConfig
from sidecar.learning._keys import id_key, task_key, task_of
from sidecar.learning._vectors import Matrix, TextVectorizer
from sidecar.store import Store, append_history, encode_u64

__all__ = [
    "ConsolidationResult",
    "MemoryConsolidation",
    "MemoryItem",
    "fifo_memory",
    "k_center_select",
]

#: a stored sample: importance, length of the JSON header, then header and vector
_HEAD = struct.Struct(">fI")
_CURRENT = b"c"
#: tasks whose memory Gram matrix is kept between consolidations (4 MB each at 1000)
_GRAM_CACHE_TASKS = 8


@dataclass(frozen=True, slots=True)
class MemoryItem:
    """One remembered sample: what to replay and what validation probes."""

    sample_id: str
    task_id: str
    prompt: str
    completion: str
    reward: float
    #: the sample's value when it was remembered, in [0, 1]
    importance: float = 0.5
    added_ms: int = 0

    @property
    def text(self) -> str:
        return f"{self.prompt}\n{self.completion}"


@dataclass(frozen=True, slots=True)
class ConsolidationResult:
    """What one consolidation did, per task: samples added and evicted."""

    added: Mapping[str, int]
    evicted: Mapping[str, int]
    boundaries: Sequence[Mapping[str, Any]]


def k_center_select(
    vectors: Matrix,
    weights: npt.NDArray[np.float64],
    k: int,
    *,
    gram: Matrix | None = None,
) -> npt.NDArray[np.intp]:
    """Indices (ascending) of ``k`` rows chosen by importance-weighted greedy k-center.

    Rows must be L2-normalized (a zero row is at distance 1 from everything).
    Weights must be positive. ``gram`` (``vectors @ vectors.T``) may be passed
    when the caller has it. Ties keep the lower index, so listing the current
    memory first makes the selection prefer what is already kept.
    """
    n = int(vectors.shape[0])
    if k >= n:
        return np.arange(n, dtype=np.intp)
    if k <= 0:
        return np.empty(0, dtype=np.intp)
    dist = (vectors @ vectors.T) if gram is None else gram.copy()
    np.subtract(1.0, dist, out=dist)
    np.maximum(dist, 0.0, out=dist)
    # a coarse grid makes the choice independent of how the products were
    # blocked (a cached Gram matrix or a fresh one give the same selection)
    np.round(dist, 4, out=dist)
    w = weights.astype(np.float32)
    chosen = np.empty(k, dtype=np.intp)
    first = int(np.argmax(w))
    chosen[0] = first
    min_d = dist[first].copy()
    min_d[first] = -np.inf
    score = np.empty_like(min_d)
    for step in range(1, k):
        np.multiply(w, min_d, out=score)
        i = int(np.argmax(score))
        chosen[step] = i
        np.minimum(min_d, dist[i], out=min_d)
        min_d[i] = -np.inf
    chosen.sort()
    return chosen


def fifo_memory(task_ids: Sequence[str], capacity: int) -> list[int]:
    """The seed's memory for comparison: indices of the last ``capacity`` samples."""
    n = len(task_ids)
    return list(range(max(0, n - capacity), n))


def _encode(item: MemoryItem, vector: npt.NDArray[np.float32]) -> bytes:
    doc = {
        "sample_id": item.sample_id,
        "task_id": item.task_id,
        "prompt": item.prompt,
        "completion": item.completion,
        "reward": item.reward,
        "importance": item.importance,
        "added_ms": item.added_ms,
    }
    head = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    return _HEAD.pack(item.importance, len(head)) + head + vector.astype(np.float16).tobytes()


def _decode_item(raw: bytes) -> MemoryItem:
    _imp, n = _HEAD.unpack_from(raw)
    return MemoryItem(**json.loads(raw[_HEAD.size : _HEAD.size + n]))


def _decode_vector(raw: bytes) -> npt.NDArray[np.float16]:
    _imp, n = _HEAD.unpack_from(raw)
    return np.frombuffer(raw, dtype=np.float16, offset=_HEAD.size + n)


def _importance(raw: bytes) -> float:
    return float(_HEAD.unpack_from(raw)[0])


class MemoryConsolidation:
    """The episodic memory of every task.

    Every method taking a transaction reads or writes through it; writes
    belong on the store's writer thread.
    """

    def __init__(self, store: Store, config: MemoryConfig, vectorizer: TextVectorizer) -> None:
        self._store = store
        self._config = config
        self._vec = vectorizer
        self._importance_weight = config.importance_weight
        # task -> (member keys in stored order, their Gram matrix); writer thread
        # only. Checked against the stored keys before use, so an aborted
        # transaction can only cost a recomputation.
        self._grams: OrderedDict[str, tuple[list[bytes], Matrix]] = OrderedDict()

    @property
    def config(self) -> MemoryConfig:
        return self._config

    @property
    def vectorizer(self) -> TextVectorizer:
        return self._vec

    def task_of(self, attributes: Mapping[str, str]) -> str:
        return task_of(attributes, self._config.task_attribute, self._config.default_task)

    def _db(self) -> Any:
        return self._store.db("memory")

    # -- reading -----------------------------------------------------------

    def _rows(self, txn: lmdb.Transaction, task_id: str) -> Iterator[tuple[bytes, bytes]]:
        prefix = b"m" + task_key(task_id)
        with txn.cursor(db=self._db()) as cur:
            if not cur.set_range(prefix):
                return
            for key, value in cur:
                if not bytes(key).startswith(prefix):
                    break
                yield bytes(key), bytes(value)

    def task_matrix(self, txn: lmdb.Transaction, task_id: str) -> Matrix:
        """The remembered vectors of one task (rows; empty when none)."""
        vecs = [_decode_vector(raw) for _key, raw in self._rows(txn, task_id)]
        if not vecs:
            return np.zeros((0, self._vec.dim), dtype=np.float32)
        return np.vstack(vecs).astype(np.float32)

    def items(self, txn: lmdb.Transaction, task_id: str | None = None) -> Iterator[MemoryItem]:
        """Remembered samples of one task, or of every task (grouped by task)."""
        tasks = [task_id] if task_id is not None else self.tasks(txn)
        for task in tasks:
            for _key, raw in self._rows(txn, task):
                yield _decode_item(raw)

    def tasks(self, txn: lmdb.Transaction) -> list[str]:
        """Every task ever offered to memory, in key order."""
        out: list[str] = []
        with txn.cursor(db=self._db()) as cur:
            if not cur.set_range(b"t"):
                return out
            for key, value in cur:
                if not bytes(key).startswith(b"t"):
                    break
                out.append(str(json.loads(bytes(value))["task_id"]))
        return out

    def sizes(self, txn: lmdb.Transaction) -> dict[str, int]:
        """Samples remembered per task."""
        out: dict[str, int] = {}
        for task in self.tasks(txn):
            prefix = b"m" + task_key(task)
            n = 0
            with txn.cursor(db=self._db()) as cur:
                if cur.set_range(prefix):
                    for key in cur.iternext(keys=True, values=False):
                        if not bytes(key).startswith(prefix):
                            break
                        n += 1
            out[task] = n
        return out

    def boundaries(self, txn: lmdb.Transaction) -> list[dict[str, Any]]:
        """Recorded task boundaries, oldest first."""
        out: list[dict[str, Any]] = []
        with txn.cursor(db=self._db()) as cur:
            if not cur.set_range(b"b"):
                return out
            for key, value in cur:
                if not bytes(key).startswith(b"b"):
                    break
                out.append(json.loads(bytes(value)))
        return out

    # -- writing -----------------------------------------------------------

    def consolidate(
        self,
        txn: lmdb.Transaction,
        items: Sequence[MemoryItem],
        vectors: Matrix | None = None,
        *,
        now_ms: int | None = None,
    ) -> ConsolidationResult:
        """Offers new samples to memory; each task keeps its most diverse, important set.

        ``vectors`` (rows aligned with ``items``) saves vectorizing again when
        the caller already has them. Samples already remembered are ignored.
        Writer thread only.
        """
        now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        if vectors is None:
            vectors = self._vec.vectorize([it.text for it in items])
        by_task: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            by_task.setdefault(it.task_id, []).append(i)
        boundaries = self._record_boundaries(txn, items, by_task, now)
        added: dict[str, int] = {}
        evicted: dict[str, int] = {}
        db = self._db()
        cap = self._config.capacity_per_task
        iw = self._importance_weight
        for task, idxs in by_task.items():
            tk = task_key(task)
            existing = list(self._rows(txn, task))
            known = {key for key, _raw in existing}
            fresh: list[int] = []
            seen_keys: set[bytes] = set()
            for i in idxs:
                key = b"m" + tk + id_key(items[i].sample_id)
                if key in known or key in seen_keys:
                    continue
                seen_keys.add(key)
                fresh.append(i)
            if not fresh:
                continue
            n_old = len(existing)
            if n_old + len(fresh) <= cap:
                keep_new = fresh
                drop_old: list[bytes] = []
            else:
                pool = np.empty((n_old + len(fresh), vectors.shape[1]), dtype=np.float32)
                for j, (_key, raw) in enumerate(existing):
                    pool[j] = _decode_vector(raw)
                # as stored (float16), so a restarted process sees the same numbers
                pool[n_old:] = vectors[fresh].astype(np.float16)
                pool_keys = [key for key, _raw in existing] + [
                    b"m" + tk + id_key(items[i].sample_id) for i in fresh
                ]
                gram = self._pool_gram(task, pool_keys[:n_old], pool, n_old)
                importance = np.fromiter(
                    (
                        *(_importance(raw) for _key, raw in existing),
                        *(items[i].importance for i in fresh),
                    ),
                    dtype=np.float64,
                    count=n_old + len(fresh),
                )
                weights = (1.0 - iw) + 2.0 * iw * np.clip(importance, 0.0, 1.0)
                keep = k_center_select(pool, weights, cap, gram=gram)
                self._cache_gram(task, pool_keys, gram, keep)
                kept = np.zeros(n_old + len(fresh), dtype=bool)
                kept[keep] = True
                drop_old = [existing[j][0] for j in range(n_old) if not kept[j]]
                keep_new = [fresh[j] for j in range(len(fresh)) if kept[n_old + j]]
            for key in drop_old:
                txn.delete(key, db=db)
            for i in keep_new:
                it = items[i]
                if it.added_ms == 0:
                    it = replace(it, added_ms=now)
                txn.put(b"m" + tk + id_key(it.sample_id), _encode(it, vectors[i]), db=db)
            added[task] = len(keep_new)
            evicted[task] = len(drop_old)
            self._count_offered(txn, task, len(idxs), now)
        return ConsolidationResult(added=added, evicted=evicted, boundaries=boundaries)

    def _pool_gram(self, task: str, old_keys: list[bytes], pool: Matrix, n_old: int) -> Matrix:
        cached = self._grams.get(task)
        new = pool[n_old:]
        if cached is None or cached[0] != old_keys:
            return pool @ pool.T
        old = pool[:n_old]
        cross = old @ new.T
        gram = np.empty((pool.shape[0], pool.shape[0]), dtype=np.float32)
        gram[:n_old, :n_old] = cached[1]
        gram[:n_old, n_old:] = cross
        gram[n_old:, :n_old] = cross.T
        gram[n_old:, n_old:] = new @ new.T
        return gram

    def _cache_gram(
        self, task: str, pool_keys: list[bytes], gram: Matrix, keep: npt.NDArray[np.intp]
    ) -> None:
        order = sorted(keep.tolist(), key=lambda i: pool_keys[i])
        self._grams[task] = ([pool_keys[i] for i in order], gram[np.ix_(order, order)])
        self._grams.move_to_end(task)
        while len(self._grams) > _GRAM_CACHE_TASKS:
            self._grams.popitem(last=False)

    def _count_offered(self, txn: lmdb.Transaction, task: str, n: int, now: int) -> None:
        key = b"t" + task_key(task)
        raw = txn.get(key, db=self._db())
        doc: dict[str, Any] = (
            json.loads(bytes(raw)) if raw else {"task_id": task, "first_seen_ms": now, "offered": 0}
        )
        doc["offered"] = int(doc["offered"]) + n
        doc["last_seen_ms"] = now
        txn.put(key, json.dumps(doc, sort_keys=True).encode(), db=self._db())

    def _record_boundaries(
        self,
        txn: lmdb.Transaction,
        items: Sequence[MemoryItem],
        by_task: Mapping[str, list[int]],
        now: int,
    ) -> list[dict[str, Any]]:
        if not items:
            return []
        db = self._db()
        raw = txn.get(_CURRENT, db=db)
        current: dict[str, Any] = json.loads(bytes(raw)) if raw else {"task_id": None, "seq": 0}
        out: list[dict[str, Any]] = []
        seq = int(current["seq"])
        for task in by_task:
            if txn.get(b"t" + task_key(task), db=db) is None:
                seq += 1
                out.append({"seq": seq, "kind": "new_task", "task_id": task, "at_ms": now})
        # the batch's majority task; ties go to the task seen first in the batch
        majority = max(by_task, key=lambda t: len(by_task[t]))
        if current["task_id"] is not None and majority != current["task_id"]:
            seq += 1
            out.append(
                {
                    "seq": seq,
                    "kind": "switch",
                    "task_id": majority,
                    "previous_task_id": current["task_id"],
                    "at_ms": now,
                }
            )
        for doc in out:
            txn.put(b"b" + encode_u64(doc["seq"]), json.dumps(doc, sort_keys=True).encode(), db=db)
            append_history(
                txn,
                self._store,
                "task_boundary",
                boundary=doc["kind"],
                **{k: v for k, v in doc.items() if k not in ("seq", "at_ms", "kind")},
                time_ms=now,
            )
        txn.put(_CURRENT, json.dumps({"task_id": majority, "seq": seq}).encode(), db=db)
        return out

    # -- replay ------------------------------------------------------------

    def replay(
        self,
        txn: lmdb.Transaction,
        count: int,
        *,
        exclude: frozenset[str] = frozenset(),
        seed: int = 0,
    ) -> list[MemoryItem]:
        """Up to ``count`` remembered samples to mix into a learning batch.

        Tasks share the count equally (a task with fewer samples gives its
        unused share to the others), so a rare task is replayed as often as
        a dominant one; within a task, samples are drawn without replacement
        with probability growing with importance. The same state and seed
        give the same rows.
        """
        if count <= 0:
            return []
        pools: list[list[MemoryItem]] = []
        for task in self.tasks(txn):
            pool = [it for it in self.items(txn, task) if it.sample_id not in exclude]
            if pool:
                pools.append(pool)
        if not pools:
            return []
        share = _water_fill([len(p) for p in pools], count)
        rng = np.random.default_rng(seed)
        out: list[MemoryItem] = []
        for pool, n in zip(pools, share, strict=True):
            if n <= 0:
                continue
            if n >= len(pool):
                out.extend(pool)
                continue
            w = np.fromiter((0.1 + it.importance for it in pool), dtype=np.float64, count=len(pool))
            picks = rng.choice(len(pool), size=n, replace=False, p=w / w.sum())
            out.extend(pool[int(i)] for i in sorted(picks))
        return out

    # -- status ------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._store.read() as txn:
            sizes = self.sizes(txn)
            raw = txn.get(_CURRENT, db=self._db())
        current: dict[str, Any] = json.loads(bytes(raw)) if raw else {"task_id": None, "seq": 0}
        return {
            "capacity_per_task": self._config.capacity_per_task,
            "replay_ratio": self._config.replay_ratio,
            "size": sum(sizes.values()),
            "size_per_task": sizes,
            "current_task": current["task_id"],
            "task_boundaries": current["seq"],
        }


def _water_fill(sizes: Sequence[int], total: int) -> list[int]:
    """Splits ``total`` as equally as possible under per-pool caps ``sizes``."""
    share = [0] * len(sizes)
    left = min(total, sum(sizes))
    open_ = [i for i, s in enumerate(sizes) if s > 0]
    while left > 0 and open_:
        each, extra = divmod(left, len(open_))
        nxt: list[int] = []
        for rank, i in enumerate(open_):
            want = each + (1 if rank < extra else 0)
            give = min(want, sizes[i] - share[i])
            share[i] += give
            left -= give
            if share[i] < sizes[i]:
                nxt.append(i)
        open_ = nxt
    return share
