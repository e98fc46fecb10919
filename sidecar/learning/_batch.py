"""The selective-learning + replay + holdout step of the training stage's batch composition.

:class:`SelectiveReplayStep` is a ``BatchComposer`` (``sidecar.training``):
``await step.compose(batch, ctx)`` takes the batch of new scored samples and
pairs and returns it with

- held-out samples removed, and pairs that touch a held-out request removed;
- the qualifying (SFT) samples cut to those at or above the value threshold,
  highest value first;
- replay samples from memory added at exactly the replay ratio, marked
  ``source="replay"``.

Samples that do not qualify for SFT (kept for their negative feedback, as
KTO rows) pass through untouched. The work runs through the store writer in
one transaction, so the holdout decisions, the priority index and memory
move together with the batch.

The step reads only the fields it needs from samples and pairs (typed by the
protocols below) and builds replay samples with :func:`dataclasses.replace`
on a new sample of the batch, so it does not depend on the training stage's
classes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import lmdb

from sidecar.learning._compose import ComposedBatch, SelectiveReplayComposer
from sidecar.learning._selective import CandidateSample

__all__ = ["SelectiveReplayStep"]


class _Sample(Protocol):
    @property
    def request_id(self) -> str: ...
    @property
    def prompt(self) -> str: ...
    @property
    def completion(self) -> str: ...
    @property
    def reward(self) -> float: ...
    @property
    def qualifies(self) -> bool: ...
    @property
    def task_id(self) -> str: ...
    @property
    def logprob_mean(self) -> float | None: ...
    @property
    def source(self) -> str: ...


def _candidate(s: _Sample, task_attribute: str) -> CandidateSample:
    lp = s.logprob_mean
    # the mean log-prob is all uncertainty ("nll") needs
    logprobs = (lp,) if lp is not None and math.isfinite(lp) and lp <= 0 else ()
    attrs = {task_attribute: s.task_id} if s.task_id else {}
    return CandidateSample(s.request_id, s.prompt, s.completion, float(s.reward), logprobs, attrs)


class SelectiveReplayStep:
    """``BatchComposer``: holdout out, valuable samples in, memory replayed."""

    def __init__(self, composer: SelectiveReplayComposer, task_attribute: str = "task_id") -> None:
        self._composer = composer
        self._task_attribute = task_attribute

    async def compose(self, batch: Any, ctx: Any) -> Any:
        new = [s for s in batch.samples if s.source == "new" and s.qualifies]
        others = [s for s in batch.samples if not (s.source == "new" and s.qualifies)]
        cands = [_candidate(s, self._task_attribute) for s in new]
        pair_ids = sorted({rid for p in batch.pairs for rid in p.request_ids if rid})
        other_ids = [s.request_id for s in others]
        update_id = str(ctx.update_id)

        def work(txn: lmdb.Transaction) -> tuple[ComposedBatch, frozenset[str]]:
            composed = self._composer.compose(txn, cands, update_id=update_id)
            held = self._composer.held_out(txn, pair_ids + other_ids)
            return composed, held

        composed, held = await ctx.writer.run(work)
        by_id = {s.request_id: s for s in new}
        chosen = [by_id[r.sample_id] for r in composed.new]
        replay: list[Any] = []
        if composed.replay and new:
            template = new[0]
            replay = [
                dataclasses.replace(
                    template,
                    no=0,
                    seq=0,
                    request_id=r.sample_id,
                    prompt=r.prompt,
                    completion=r.completion,
                    reward=r.reward,
                    signed=2.0 * r.reward - 1.0,
                    has_feedback=True,
                    qualifies=True,
                    task_id=r.task_id,
                    sources=(),
                    signals=(),
                    rating=None,
                    logprob_mean=None,
                    logprob_min=None,
                    n_tokens=0,
                    source="replay",
                    quarantined=False,
                )
                for r in composed.replay
            ]
        kept_others = [s for s in others if s.request_id not in held]
        pairs = [p for p in batch.pairs if not (set(p.request_ids) & held)]
        extra = getattr(ctx, "extra", None)
        if isinstance(extra, dict):
            extra["composition"] = composed.stats
        return batch.with_rows(samples=[*chosen, *replay, *kept_others], pairs=pairs)
