"""The selective-learning + replay + holdout step of the training stage's batch composition.

:class:`SelectiveReplayStep` is a ``BatchComposer`` (``sidecar.training``):
``await step.compose(batch, ctx)`` takes the batch of new scored samples and
pairs and returns it with

- held-out samples removed, and every row (sample or pair) whose request or
  prompt is held out removed;
- the qualifying (SFT) samples cut to those at or above the value threshold,
  highest value first;
- replay samples from memory added at exactly the replay ratio, marked
  ``source="replay"``.

Samples that do not qualify for SFT (kept for their negative feedback, as
KTO rows) pass through untouched. Qualifying samples that a full batch left
out stay pending; :meth:`SelectiveReplayStep.carried` names them, and the
training stage puts them into the next batch beside the new samples, where
they are ranked again (see ``SelectiveReplayComposer``). The work runs through the store writer in
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
from sidecar.learning._curation import sample_task
from sidecar.learning._selective import CandidateSample

__all__ = ["SelectiveReplayStep"]


class _Sample(Protocol):
    @property
    def no(self) -> int: ...
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


def _candidate(s: _Sample, task_attribute: str, default_task: str) -> CandidateSample:
    lp = s.logprob_mean
    # the mean log-prob is all uncertainty ("nll") needs
    logprobs = (lp,) if lp is not None and math.isfinite(lp) and lp <= 0 else ()
    # the Inference's kept attributes (expertise, priority, expected score)
    attrs = dict(getattr(s, "attributes", ()))
    attrs[task_attribute] = sample_task(s, task_attribute, default_task)
    return CandidateSample(
        s.request_id,
        s.prompt,
        s.completion,
        float(s.reward),
        logprobs,
        attrs,
        no=int(s.no),
        closed_ms=int(getattr(s, "closed_ms", 0)),
    )


class SelectiveReplayStep:
    """``BatchComposer``: holdout out, valuable samples in, memory replayed."""

    def __init__(
        self,
        composer: SelectiveReplayComposer,
        task_attribute: str = "task_id",
        default_task: str = "default",
    ) -> None:
        self._composer = composer
        self._task_attribute = task_attribute
        self._default_task = default_task

    def carried(self, txn: lmdb.Transaction) -> list[tuple[int, str]]:
        """(sample number, request id) of the samples an earlier batch left
        pending: the training stage offers them with the next batch."""
        return self._composer.pending_samples(txn)

    async def compose(self, batch: Any, ctx: Any) -> Any:
        new = [s for s in batch.samples if s.source == "new" and s.qualifies]
        others = [s for s in batch.samples if not (s.source == "new" and s.qualifies)]
        cands = [_candidate(s, self._task_attribute, self._default_task) for s in new]
        update_id = str(ctx.update_id)
        holdout = self._composer.holdout

        def work(txn: lmdb.Transaction) -> tuple[ComposedBatch, list[bool], list[bool]]:
            composed = self._composer.compose(txn, cands, update_id=update_id)
            drop_others = [holdout.excludes(txn, (s.request_id,), s.prompt) for s in others]
            drop_pairs = [holdout.excludes(txn, p.request_ids, p.prompt) for p in batch.pairs]
            return composed, drop_others, drop_pairs

        composed, drop_others, drop_pairs = await ctx.writer.run(work)
        by_id = {s.request_id: s for s in new}
        chosen = [by_id[r.sample_id] for r in composed.new]
        replay: list[Any] = []
        if composed.replay and new:
            template = new[0]
            # replay rows carry none of the template's own attributes
            blank: dict[str, Any] = {"attributes": ()} if hasattr(template, "attributes") else {}
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
                    **blank,
                )
                for r in composed.replay
            ]
        kept_others = [s for s, drop in zip(others, drop_others, strict=True) if not drop]
        pairs = [p for p, drop in zip(batch.pairs, drop_pairs, strict=True) if not drop]
        extra = getattr(ctx, "extra", None)
        if isinstance(extra, dict):
            extra["composition"] = {
                **composed.stats,
                "held_out_rows_dropped": sum(drop_others),
                "held_out_pairs_dropped": sum(drop_pairs),
            }
        return batch.with_rows(samples=[*chosen, *replay, *kept_others], pairs=pairs)
