"""How a learning batch is composed: a pluggable step.

When the scheduler fires, the training stage reads the samples and pairs
scored since the last update (each marked ``source="new"`` and with
``quarantined`` set from the current quarantine list) into a
:class:`LearningBatch` and hands it to the stage's :class:`BatchComposer`.
Whatever the composer returns is what the dataset snapshot writes:

- ``samples`` become SFT rows when ``qualifies``, KTO rows when their
  feedback is clear either way (see ``sidecar.scoring._rows``);
- ``pairs`` become DPO rows.

Composers chain (:class:`ComposerChain`): selective learning can reorder or
trim, memory can add rows with ``source="replay"``, a holdout filter can
drop rows. The default is :class:`QualityFilter`: all new samples and pairs
except quarantined ones.

A step that trims may keep what it cut for a later update: it then also
implements :class:`CarriesSamples`, and its ``carried(txn)`` names those
samples. The stage reads them into the next batch beside the samples scored
since (``source="new"``, quarantine applied as to the others), and the step
decides again; a carried sample that a step before it drops never reaches
it, and the step lets it go.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

import lmdb

from sidecar.scoring import Pair, Sample
from sidecar.store import Store, StoreWriter

__all__ = [
    "BatchComposer",
    "CarriesSamples",
    "ComposeContext",
    "ComposerChain",
    "LearningBatch",
    "QualityFilter",
]


@dataclass(frozen=True, slots=True)
class LearningBatch:
    samples: tuple[Sample, ...] = ()
    pairs: tuple[Pair, ...] = ()

    def with_rows(
        self,
        samples: Sequence[Sample] | None = None,
        pairs: Sequence[Pair] | None = None,
    ) -> LearningBatch:
        return replace(
            self,
            samples=tuple(self.samples if samples is None else samples),
            pairs=tuple(self.pairs if pairs is None else pairs),
        )


@dataclass(frozen=True, slots=True)
class ComposeContext:
    """What a composer may use. ``store`` for reads (short read transactions),
    ``writer`` for writes (``await writer.run(fn)``). Composers run on the
    event loop, never on the writer thread."""

    store: Store
    writer: StoreWriter
    update_id: str
    trigger: str
    base_version: str
    now_ms: int
    #: Sample and pair numbers of the new data: (after, upto].
    sample_range: tuple[int, int] = (0, 0)
    pair_range: tuple[int, int] = (0, 0)
    extra: dict[str, object] = field(default_factory=dict)


class BatchComposer(Protocol):
    """One step of batch composition. Must not drop the batch's meaning:
    rows it adds say where they come from in ``source``."""

    async def compose(self, batch: LearningBatch, ctx: ComposeContext) -> LearningBatch: ...


@runtime_checkable
class CarriesSamples(Protocol):
    """A step that keeps samples it cut for a later batch."""

    def carried(self, txn: lmdb.Transaction) -> Sequence[tuple[int, str]]:
        """(sample number, request id) of each sample waiting for a later batch."""
        ...


class QualityFilter:
    """The default step: drops rows of quarantined sources, and samples that
    neither qualify for SFT nor carry feedback (nothing to learn from)."""

    async def compose(self, batch: LearningBatch, ctx: ComposeContext) -> LearningBatch:
        return batch.with_rows(
            samples=[
                s
                for s in batch.samples
                if not s.quarantined and (s.qualifies or s.has_feedback or s.source != "new")
            ],
            pairs=[p for p in batch.pairs if not p.quarantined],
        )


class ComposerChain:
    """Runs composers in order, each on the previous one's output."""

    def __init__(self, steps: Sequence[BatchComposer] = ()) -> None:
        self.steps: list[BatchComposer] = list(steps)

    def append(self, step: BatchComposer) -> None:
        self.steps.append(step)

    def carried(self, txn: lmdb.Transaction) -> list[tuple[int, str]]:
        """The samples the chain's steps keep for a later batch, by sample number."""
        out: set[tuple[int, str]] = set()
        for step in self.steps:
            if isinstance(step, CarriesSamples):
                out.update(step.carried(txn))
        return sorted(out)

    async def compose(self, batch: LearningBatch, ctx: ComposeContext) -> LearningBatch:
        for step in self.steps:
            batch = await step.compose(batch, ctx)
        return batch
