"""The holdout: good samples set aside, never trained on, for validation.

When a good sample is first curated, :meth:`HoldoutSet.assign` decides once
and for all whether it is held out. The split is stratified by task: each
task's held-out count stays within one sample of ``fraction`` times the good
samples it has offered (until ``max_per_task``), and which samples go is
decided by a hash of the sample id, so the split does not follow the order
or rhythm of the traffic. Layout of the ``holdout`` database
(``th`` = 8-byte task digest):

- ``d`` + sample id: the decision (``1`` held out, ``0`` trainable)
- ``h`` + th + sample id: a held-out sample (JSON)
- ``c`` + th: the task's counts (good samples offered, held out)
- ``p`` + 16-byte prompt digest: the decision for the prompt (``1``/``0``)

The decision is per prompt as well as per sample: the first good sample of
a prompt decides, later good samples of the same prompt follow it, so a
held-out prompt never reaches training through another answer to it.
:meth:`HoldoutSet.excludes` is the check every dataset snapshot and every
export applies to its rows (samples and preference pairs alike).

Together with the episodic memory, the holdout is the regression suite:
:meth:`RegressionSuite.regression_prompts` gives validation prompts with
reference answers and scores.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import lmdb

from sidecar.config import HoldoutConfig
from sidecar.learning._keys import id_key, task_key
from sidecar.learning._memory import MemoryConsolidation
from sidecar.store import Store

__all__ = ["HeldOutSample", "HoldoutSet", "RegressionPrompt", "RegressionSuite"]


@dataclass(frozen=True, slots=True)
class HeldOutSample:
    sample_id: str
    task_id: str
    prompt: str
    completion: str
    reward: float
    held_ms: int = 0


@dataclass(frozen=True, slots=True)
class RegressionPrompt:
    """One validation probe: a prompt, the answer on record and its score."""

    prompt: str
    reference: str
    reference_score: float
    task_id: str
    #: ``holdout`` (never trained on) or ``memory`` (trained on; checks forgetting)
    source: str
    sample_id: str


def _prompt_key(prompt: str) -> bytes:
    return b"p" + hashlib.blake2b(prompt.encode("utf-8"), digest_size=16).digest()


_COUNT_KEYS = ["task_id", "offered", "held"]


def _encode_counts(counts: list[Any]) -> bytes:
    """A task's counts record: the bytes ``json.dumps`` gives for the stored doc
    updated with the new counts (formatted directly when it has the usual shape)."""
    doc, offered, held = counts
    if list(doc) == _COUNT_KEYS or list(doc) == _COUNT_KEYS[:1]:
        task = json.dumps(doc["task_id"])
        return f'{{"task_id": {task}, "offered": {offered}, "held": {held}}}'.encode()
    doc.update(offered=offered, held=held)
    return json.dumps(doc).encode()


def _unit_hash(sample_id: str) -> float:
    digest = hashlib.blake2b(sample_id.encode("utf-8"), digest_size=8, person=b"holdout").digest()
    return int.from_bytes(digest, "big") / float(1 << 64)


class HoldoutSet:
    """Decides, stores and answers holdout membership. Writes on the writer thread."""

    def __init__(self, store: Store, config: HoldoutConfig) -> None:
        self._store = store
        self._c = config
        # Task counts read or written in the current write transaction (the
        # curation listener calls ``assign`` for every good sample of a
        # batch): task key -> [task_id, offered, held]. Tied to the
        # transaction object, so counts of an aborted one are never reused.
        self._counts_txn: lmdb.Transaction | None = None
        self._counts: dict[bytes, list[Any]] = {}
        self._task_keys: dict[str, bytes] = {}

    @property
    def config(self) -> HoldoutConfig:
        return self._c

    def _db(self) -> Any:
        return self._store.db("holdout")

    def assign(
        self,
        txn: lmdb.Transaction,
        sample_id: str,
        task_id: str,
        prompt: str,
        completion: str,
        reward: float,
        *,
        now_ms: int | None = None,
    ) -> bool:
        """True when the (good) sample is held out. Decided on the first call, then fixed."""
        db = self._db()
        sid = id_key(sample_id)
        prior = txn.get(b"d" + sid, db=db)
        if prior is not None:
            return bytes(prior) == b"1"
        tk = self._task_keys.get(task_id)
        if tk is None:
            if len(self._task_keys) >= 4096:
                self._task_keys.clear()
            tk = self._task_keys[task_id] = task_key(task_id)
        counts = self._task_counts(txn, db, tk, task_id)
        offered = counts[1] + 1
        held_n = counts[2]
        held = False
        pkey = _prompt_key(prompt)
        by_prompt = txn.get(pkey, db=db)
        cap = self._c.max_per_task
        if by_prompt is not None:
            held = bytes(by_prompt) == b"1"
        elif self._c.fraction > 0 and (cap == 0 or held_n < cap):
            deficit = self._c.fraction * offered - held_n
            held = deficit >= 1.0 or (deficit > 0 and _unit_hash(sample_id) < deficit)
        if by_prompt is None:
            txn.put(pkey, b"1" if held else b"0", db=db)
        if held:
            held_n += 1
            now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
            # HeldOutSample's fields, in its order
            item = {
                "sample_id": sample_id,
                "task_id": task_id,
                "prompt": prompt,
                "completion": completion,
                "reward": float(reward),
                "held_ms": now,
            }
            txn.put(b"h" + tk + sid, json.dumps(item, ensure_ascii=False).encode(), db=db)
        txn.put(b"d" + sid, b"1" if held else b"0", db=db)
        counts[1], counts[2] = offered, held_n
        txn.put(b"c" + tk, _encode_counts(counts), db=db)
        return held

    def _task_counts(self, txn: lmdb.Transaction, db: Any, tk: bytes, task_id: str) -> list[Any]:
        """[stored doc, offered, held] of a task, read once per write transaction."""
        if self._counts_txn is not txn:
            self._counts_txn = txn
            self._counts = {}
        counts = self._counts.get(tk)
        if counts is None:
            raw = txn.get(b"c" + tk, db=db)
            doc: dict[str, Any] = json.loads(bytes(raw)) if raw else {"task_id": task_id}
            counts = [doc, int(doc.get("offered", 0)), int(doc.get("held", 0))]
            self._counts[tk] = counts
        return counts

    def is_held_out(self, txn: lmdb.Transaction, sample_id: str) -> bool:
        return txn.get(b"d" + id_key(sample_id), db=self._db()) == b"1"

    def prompt_held_out(self, txn: lmdb.Transaction, prompt: str) -> bool:
        return txn.get(_prompt_key(prompt), db=self._db()) == b"1"

    def excludes(self, txn: lmdb.Transaction, request_ids: Sequence[str], prompt: str) -> bool:
        """True when a row (sample or pair) must stay out of training data and exports:
        one of its requests is held out, or its prompt is."""
        db = self._db()
        if txn.get(_prompt_key(prompt), db=db) == b"1":
            return True
        return any(rid and txn.get(b"d" + id_key(rid), db=db) == b"1" for rid in request_ids)

    def decided(self, txn: lmdb.Transaction, sample_id: str) -> bool:
        return txn.get(b"d" + id_key(sample_id), db=self._db()) is not None

    def held_out_ids(self, txn: lmdb.Transaction, sample_ids: Sequence[str]) -> frozenset[str]:
        """The ids among ``sample_ids`` that are held out."""
        db = self._db()
        return frozenset(s for s in sample_ids if txn.get(b"d" + id_key(s), db=db) == b"1")

    def counts(self, txn: lmdb.Transaction) -> dict[str, dict[str, int]]:
        """Per task: good samples offered and held out."""
        out: dict[str, dict[str, int]] = {}
        with txn.cursor(db=self._db()) as cur:
            if not cur.set_range(b"c"):
                return out
            for key, raw in cur:
                if not bytes(key).startswith(b"c"):
                    break
                doc = json.loads(bytes(raw))
                out[str(doc["task_id"])] = {"offered": doc["offered"], "held": doc["held"]}
        return out

    def items(self, txn: lmdb.Transaction, task_id: str | None = None) -> Iterator[HeldOutSample]:
        prefix = b"h" + (task_key(task_id) if task_id is not None else b"")
        with txn.cursor(db=self._db()) as cur:
            if not cur.set_range(prefix):
                return
            for key, raw in cur:
                if not bytes(key).startswith(prefix):
                    break
                yield HeldOutSample(**json.loads(bytes(raw)))

    def status(self) -> dict[str, Any]:
        with self._store.read() as txn:
            counts = self.counts(txn)
        return {
            "fraction": self._c.fraction,
            "size": sum(c["held"] for c in counts.values()),
            "size_per_task": {t: c["held"] for t, c in counts.items()},
        }


class RegressionSuite:
    """Holdout and memory together: what validation probes a candidate with."""

    def __init__(self, store: Store, holdout: HoldoutSet, memory: MemoryConsolidation) -> None:
        self._store = store
        self._holdout = holdout
        self._memory = memory

    def regression_prompts(self, limit: int) -> list[RegressionPrompt]:
        """Up to ``limit`` prompts with reference answers and scores.

        About ``regression_holdout_share`` come from the holdout and the rest
        from memory (either side fills in when the other runs short); each
        side is spread evenly over tasks, in a stable order.
        """
        if limit <= 0:
            return []
        with self._store.read() as txn:
            held = _round_robin(
                [
                    [_from_holdout(h) for h in self._holdout.items(txn, task)]
                    for task in sorted(self._holdout.counts(txn))
                ]
            )
            mem = _round_robin(
                [
                    [_from_memory(m) for m in self._memory.items(txn, task)]
                    for task in sorted(self._memory.tasks(txn))
                ]
            )
        want_held = round(limit * self._holdout.config.regression_holdout_share)
        take_held = min(len(held), max(want_held, limit - len(mem)))
        take_mem = min(len(mem), limit - take_held)
        return held[:take_held] + mem[:take_mem]


def _from_holdout(h: HeldOutSample) -> RegressionPrompt:
    return RegressionPrompt(h.prompt, h.completion, h.reward, h.task_id, "holdout", h.sample_id)


def _from_memory(m: Any) -> RegressionPrompt:
    return RegressionPrompt(m.prompt, m.completion, m.reward, m.task_id, "memory", m.sample_id)


def _round_robin(groups: list[list[RegressionPrompt]]) -> list[RegressionPrompt]:
    out: list[RegressionPrompt] = []
    depth = max((len(g) for g in groups), default=0)
    for i in range(depth):
        out.extend(g[i] for g in groups if i < len(g))
    return out
