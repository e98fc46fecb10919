"""SelectiveReplayStep as the training stage's batch-composition step.

The batch, sample and pair classes here mirror the training stage's
``LearningBatch``, ``Sample`` and ``Pair`` (the fields the step reads and
``with_rows``); the store and its writer are real.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from sidecar.config import HoldoutConfig, MemoryConfig, SelectiveConfig, StoreConfig
from sidecar.learning import (
    HashedNgramVectorizer,
    HoldoutSet,
    MemoryConsolidation,
    SelectiveLearner,
    SelectiveReplayComposer,
    SelectiveReplayStep,
)
from sidecar.store import Store, StoreWriter
from tests._helpers import running_store


@dataclass(frozen=True, slots=True)
class Sample:
    no: int
    seq: int
    request_id: str
    prompt: str
    completion: str
    reward: float
    signed: float
    has_feedback: bool
    qualifies: bool
    model_version: str
    task_id: str = ""
    sources: tuple[str, ...] = ()
    signals: tuple[str, ...] = ()
    rating: float | None = None
    logprob_mean: float | None = None
    logprob_min: float | None = None
    n_tokens: int = 0
    source: str = "new"
    quarantined: bool = False


@dataclass(frozen=True, slots=True)
class Pair:
    no: int
    prompt: str
    chosen: str
    rejected: str
    request_ids: tuple[str, str] = ("", "")
    source: str = "new"


@dataclass(frozen=True, slots=True)
class Batch:
    samples: tuple[Sample, ...] = ()
    pairs: tuple[Pair, ...] = ()

    def with_rows(
        self, samples: Sequence[Sample] | None = None, pairs: Sequence[Pair] | None = None
    ) -> Batch:
        return replace(
            self,
            samples=tuple(self.samples if samples is None else samples),
            pairs=tuple(self.pairs if pairs is None else pairs),
        )


@dataclass
class Ctx:
    writer: StoreWriter
    update_id: str
    extra: dict[str, object] = field(default_factory=dict)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[Store, StoreWriter]]:
    cfg = StoreConfig(data_dir=tmp_path / "data", map_size_bytes=1 << 29, sync=False)
    async with running_store(cfg) as pair:
        yield pair


def _batch(rng: random.Random, start: int, n: int) -> Batch:
    samples = []
    for i in range(start, start + n):
        task = rng.choice(["faq", "faq", "faq", "code"])
        good = rng.random() < 0.85
        samples.append(
            Sample(
                no=i,
                seq=i,
                request_id=f"req-{i}",
                prompt=f"{task} prompt {i} "
                + " ".join(rng.choice("abcdefgh") * 3 for _ in range(6)),
                completion=f"answer {i}",
                reward=0.8 if good else 0.1,
                signed=0.6 if good else -0.8,
                has_feedback=True,
                qualifies=good,
                model_version="v1",
                task_id=task,
                logprob_mean=-rng.random(),
            )
        )
    pairs = tuple(
        Pair(no=i, prompt="p", chosen="c", rejected="r", request_ids=(f"req-{i}", f"req-{i + 1}"))
        for i in range(start, start + n - 1, 3)
    )
    return Batch(samples=tuple(samples), pairs=pairs)


async def test_memory_step_replays_exactly_and_keeps_holdout_out_of_every_batch(
    env: tuple[Store, StoreWriter],
) -> None:
    store, writer = env
    mem = MemoryConsolidation(
        store, MemoryConfig(capacity_per_task=200, replay_ratio=0.5), HashedNgramVectorizer(dim=256)
    )
    sel = SelectiveLearner(store, SelectiveConfig(value_threshold=0.0, max_batch_samples=0), mem)
    hold = HoldoutSet(store, HoldoutConfig(fraction=0.1))
    step = SelectiveReplayStep(SelectiveReplayComposer(sel, mem, hold))
    rng = random.Random(1)
    trained: set[str] = set()
    for b in range(12):
        batch = _batch(rng, b * 200, 200)
        ctx = Ctx(writer=writer, update_id=f"u{b}")
        out = await step.compose(batch, ctx)
        new = [s for s in out.samples if s.source == "new" and s.qualifies]
        replay = [s for s in out.samples if s.source == "replay"]
        if b >= 2:
            assert len(replay) == len(new)  # replay_ratio 0.5, exactly
        assert all(s.qualifies and s.has_feedback for s in replay)
        assert ctx.extra["composition"]["new"] == len(new)  # type: ignore[index]
        trained.update(s.request_id for s in out.samples)
        trained.update(rid for p in out.pairs for rid in p.request_ids)
        # negative samples pass through unless held out
        negatives = [s for s in batch.samples if not s.qualifies]
        assert [s for s in out.samples if not s.qualifies] == negatives
    with store.read() as txn:
        held = {h.sample_id for h in hold.items(txn)}
    assert len(held) > 150
    assert not (trained & held)
