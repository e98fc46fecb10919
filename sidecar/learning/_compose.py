"""Composing a learning batch: holdout out, valuable samples in, memory replayed.

:class:`SelectiveReplayComposer` is the batch-composition step of a dataset
snapshot. Given the curated samples waiting to be learned from, it

1. sets the holdout aside (decided once per sample, on first sight);
2. values the rest and keeps those at or above ``value_threshold``, highest
   value first, up to ``max_batch_samples``;
3. mixes in replay from the episodic memory so that replay rows are exactly
   ``round(new * replay_ratio / (1 - replay_ratio))`` of the batch (fewer only
   when memory holds fewer samples), each row marked ``source`` ``new`` or
   ``replay``;
4. offers the new samples to memory;
5. leaves pending, in the priority index, the good samples (at or above the
   threshold) that were cut only because the batch was full: at most
   ``max_pending_samples``, highest value first, and only those younger than
   ``max_pending_age_seconds`` in log time (their reward window's end against
   the newest candidate's). The caller offers them again with the next
   batch's candidates (:meth:`SelectiveReplayComposer.pending_samples`);
   everything else leaves the index, so nothing is trained on twice.

The candidates of a batch are the new samples and the pending ones; a
pending sample that is no longer offered (its source was quarantined since,
say) is dropped.

It runs on the writer thread inside the snapshot's transaction, so the
batch, the memory and the index move together; the same state and update id
give the same batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lmdb

from sidecar.learning._holdout import HoldoutSet
from sidecar.learning._memory import MemoryConsolidation, MemoryItem
from sidecar.learning._selective import CandidateSample, SelectiveLearner

__all__ = ["ComposedBatch", "ComposedRow", "SelectiveReplayComposer", "replay_count"]


@dataclass(frozen=True, slots=True)
class ComposedRow:
    sample_id: str
    task_id: str
    prompt: str
    completion: str
    reward: float
    #: ``new`` or ``replay``
    source: str
    value: float


@dataclass(frozen=True, slots=True)
class ComposedBatch:
    rows: Sequence[ComposedRow]
    #: what the manifest reports about the composition
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def new(self) -> list[ComposedRow]:
        return [r for r in self.rows if r.source == "new"]

    @property
    def replay(self) -> list[ComposedRow]:
        return [r for r in self.rows if r.source == "replay"]


def replay_count(new: int, ratio: float) -> int:
    """Replay rows that make ``ratio`` of a batch with ``new`` new rows."""
    if new <= 0 or ratio <= 0:
        return 0
    return round(new * ratio / (1.0 - ratio))


def _seed(update_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(update_id.encode(), digest_size=8).digest(), "big")


class SelectiveReplayComposer:
    """Holdout, selective learning and replay as one batch-composition step."""

    def __init__(
        self,
        selective: SelectiveLearner,
        memory: MemoryConsolidation,
        holdout: HoldoutSet,
    ) -> None:
        self._selective = selective
        self._memory = memory
        self._holdout = holdout

    @property
    def holdout(self) -> HoldoutSet:
        return self._holdout

    def pending_samples(self, txn: lmdb.Transaction) -> list[tuple[int, str]]:
        """(sample number, sample id) of the samples an earlier batch left
        pending, to offer with the next batch's candidates."""
        return self._selective.pending_samples(txn)

    def held_out(self, txn: lmdb.Transaction, sample_ids: Sequence[str]) -> frozenset[str]:
        """Which of these samples are held out (for filtering pairs and exports)."""
        return self._holdout.held_out_ids(txn, sample_ids)

    def split_holdout(
        self, txn: lmdb.Transaction, samples: Sequence[CandidateSample]
    ) -> tuple[list[CandidateSample], int]:
        """Decides holdout membership of good samples; returns the trainable ones and the held count."""
        keep: list[CandidateSample] = []
        held = 0
        for s in samples:
            task = self._memory.task_of(s.attributes)
            if self._holdout.assign(txn, s.sample_id, task, s.prompt, s.completion, s.reward):
                held += 1
            else:
                keep.append(s)
        return keep, held

    def compose(
        self,
        txn: lmdb.Transaction,
        candidates: Sequence[CandidateSample],
        *,
        update_id: str,
    ) -> ComposedBatch:
        """The learning batch for ``candidates`` (good curated samples). Writer thread only."""
        cfg = self._selective.config
        trainable, held = self.split_holdout(txn, candidates)
        vec = self._memory.vectorizer
        vectors = vec.vectorize([s.text for s in trainable])
        # the index is rewritten below to hold just what stays pending
        valued = self._selective.assess(txn, trainable, vectors, file=False)
        order = sorted(
            (i for i, v in enumerate(valued) if v.value >= cfg.value_threshold),
            key=lambda i: (-valued[i].value, valued[i].sample.sample_id),
        )
        take = order[: cfg.max_batch_samples] if cfg.max_batch_samples else order
        chosen = [valued[i] for i in take]
        new_rows = [
            ComposedRow(
                sample_id=v.sample.sample_id,
                task_id=v.task_id,
                prompt=v.sample.prompt,
                completion=v.sample.completion,
                reward=v.sample.reward,
                source="new",
                value=v.value,
            )
            for v in chosen
        ]
        want = replay_count(len(new_rows), self._memory.config.replay_ratio)
        exclude = frozenset(r.sample_id for r in new_rows)
        replayed = self._memory.replay(txn, want, exclude=exclude, seed=_seed(update_id))
        replay_rows = [
            ComposedRow(
                sample_id=m.sample_id,
                task_id=m.task_id,
                prompt=m.prompt,
                completion=m.completion,
                reward=m.reward,
                source="replay",
                value=m.importance,
            )
            for m in replayed
        ]
        consolidation = self._memory.consolidate(
            txn,
            [
                MemoryItem(
                    sample_id=v.sample.sample_id,
                    task_id=v.task_id,
                    prompt=v.sample.prompt,
                    completion=v.sample.completion,
                    reward=v.sample.reward,
                    importance=v.value,
                )
                for v in chosen
            ],
            vectors[take] if take else None,
        )
        # What the batch left out only because it was full waits for the next
        # one, within the pending bounds; everything else leaves the index.
        rest = order[len(take) :]
        max_age_ms = cfg.max_pending_age_seconds * 1000
        newest = max((s.closed_ms for s in trainable), default=0)
        young = [
            i
            for i in rest
            if not (max_age_ms > 0 and newest - valued[i].sample.closed_ms > max_age_ms)
        ]
        pending = young[: cfg.max_pending_samples]
        self._selective.keep_pending(txn, [valued[i] for i in pending])
        total = len(new_rows) + len(replay_rows)
        stats = {
            "candidates": len(candidates),
            "held_out": held,
            "below_threshold": len(valued)
            - sum(1 for v in valued if v.value >= cfg.value_threshold),
            "new": len(new_rows),
            # offered again after an earlier batch left them pending
            "carried": sum(1 for v in valued if v.carried),
            "carried_chosen": sum(1 for v in chosen if v.carried),
            "pending": len(pending),
            "pending_dropped_too_old": len(rest) - len(young),
            "pending_dropped_over_cap": len(young) - len(pending),
            "replay": len(replay_rows),
            "replay_wanted": want,
            "replay_ratio": len(replay_rows) / total if total else 0.0,
            "value_threshold": cfg.value_threshold,
            "memory_added": dict(consolidation.added),
            "memory_evicted": dict(consolidation.evicted),
        }
        return ComposedBatch(rows=[*new_rows, *replay_rows], stats=stats)
