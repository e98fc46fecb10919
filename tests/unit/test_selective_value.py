"""SelectiveLearner: each feature moves the value the right way; the index persists."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import pytest

from sidecar.config import MemoryConfig, SelectiveConfig, StoreConfig
from sidecar.learning import (
    CandidateSample,
    HashedNgramVectorizer,
    MemoryConsolidation,
    MemoryItem,
    SelectiveLearner,
    uncertainty,
)
from sidecar.store import Store


def _learner(store: Store, **cfg: object) -> SelectiveLearner:
    mem = MemoryConsolidation(store, MemoryConfig(), HashedNgramVectorizer(dim=512))
    return SelectiveLearner(store, SelectiveConfig.model_validate(cfg), mem)


def _sample(
    sid: str,
    *,
    prompt: str = "how do I reset my password",
    reward: float = 0.8,
    logprobs: Sequence[float] = (-0.2,) * 10,
    attrs: Mapping[str, str] | None = None,
) -> CandidateSample:
    base = {"task_id": "support", "expected_score": "0.8"}
    return CandidateSample(
        sid, prompt, "click 'forgot password'", reward, logprobs, {**base, **(attrs or {})}
    )


def _values(store: Store, learner: SelectiveLearner, samples: list[CandidateSample]) -> list[float]:
    with store.write_txn() as txn:
        return [v.value for v in learner.assess(txn, samples, index=False)]


def _increasing(xs: list[float]) -> bool:
    return all(a < b for a, b in itertools.pairwise(xs))


def test_selective_value_follows_uncertainty(store: Store) -> None:
    learner = _learner(store)
    samples = [_sample(f"u{i}", logprobs=(lp,) * 12) for i, lp in enumerate((-0.01, -0.5, -2.0))]
    assert _increasing(_values(store, learner, samples))
    assert uncertainty([]) is None
    assert uncertainty([0.0, 0.0]) == 0.0
    assert 0.0 < uncertainty([-0.1], "entropy") < uncertainty([-0.7], "entropy")  # type: ignore[operator]


def test_selective_value_follows_novelty(store: Store) -> None:
    learner = _learner(store)
    mem = MemoryConsolidation(store, MemoryConfig(), HashedNgramVectorizer(dim=512))
    known = "how do I reset my password"
    with store.write_txn() as txn:
        mem.consolidate(txn, [MemoryItem("m1", "support", known, "click 'forgot password'", 0.9)])
    samples = [
        _sample("n0", prompt=known),
        _sample("n1", prompt="how can I reset the password on my phone"),
        _sample("n2", prompt="quarterly tax filing deadlines in norway"),
    ]
    with store.write_txn() as txn:
        got = learner.assess(txn, samples, index=False)
    novelty = [v.features.novelty for v in got]
    assert novelty[0] < 0.05
    assert _increasing(novelty)
    assert _increasing([v.value for v in got])


def test_selective_value_follows_error_magnitude(store: Store) -> None:
    learner = _learner(store)
    samples = [
        _sample(f"e{i}", attrs={"expected_score": exp})
        for i, exp in enumerate(("0.8", "0.5", "0.0"))
    ]
    assert _increasing(_values(store, learner, samples))


def test_selective_error_uses_the_task_running_mean_without_an_expectation(store: Store) -> None:
    learner = _learner(store)
    history = [
        CandidateSample(f"h{i}", f"question {i}", "answer", 0.9, (), {"task_id": "qa"})
        for i in range(30)
    ]
    with store.write_txn() as txn:
        learner.assess(txn, history)
    probe = [
        CandidateSample("p_good", "question x", "answer", 0.9, (), {"task_id": "qa"}),
        CandidateSample("p_bad", "question y", "answer", 0.1, (), {"task_id": "qa"}),
    ]
    with store.write_txn() as txn:
        got = learner.assess(txn, probe, index=False)
    assert got[0].features.error < 0.1
    assert got[1].features.error > 0.7


def test_selective_value_follows_user_expertise(store: Store) -> None:
    learner = _learner(store)
    levels = ("novice", "intermediate", "expert")
    samples = [_sample(f"x{i}", attrs={"user_expertise": lv}) for i, lv in enumerate(levels)]
    assert _increasing(_values(store, learner, samples))


def test_selective_value_follows_task_priority(store: Store) -> None:
    learner = _learner(store, task_priorities={"billing": 0.9})
    samples = [
        _sample(f"p{i}", attrs={"priority": lv}) for i, lv in enumerate(("low", "0.6", "critical"))
    ]
    assert _increasing(_values(store, learner, samples))
    by_task = [
        CandidateSample("t1", "q", "a", 0.8, (), {"task_id": "support", "expected_score": "0.8"}),
        CandidateSample("t2", "q", "a", 0.8, (), {"task_id": "billing", "expected_score": "0.8"}),
    ]
    with store.write_txn() as txn:
        got = learner.assess(txn, by_task, index=False)
    assert got[0].features.priority == 0.5 and got[1].features.priority == 0.9


def test_selective_priority_index_is_ordered_and_persisted(store_config: StoreConfig) -> None:
    s = Store(store_config)
    s.open()
    learner = _learner(s)
    samples = [_sample(f"s{i}", logprobs=(-0.05 * (i + 1),) * 8) for i in range(20)]
    with s.write_txn() as txn:
        valued = learner.assess(txn, samples)
    # re-assessing a sample replaces its entry instead of adding one
    with s.write_txn() as txn:
        learner.assess(txn, samples[:3])
    s.close()
    s = Store(store_config)
    s.open()
    try:
        learner = _learner(s)
        with s.read() as txn:
            ranked = list(learner.ranked(txn))
            top = list(learner.ranked(txn, limit=5))
            cut = sorted(v.value for v in valued)[10]
            above = list(learner.ranked(txn, threshold=cut))
            assert learner.value_of(txn, "s19") == pytest.approx(valued[19].value, abs=1e-6)
        values = [d["value"] for d in ranked]
        assert len(ranked) == 20
        assert values == sorted(values, reverse=True)
        assert [d["sample_id"] for d in top] == [d["sample_id"] for d in ranked[:5]]
        assert all(d["value"] >= cut for d in above) and len(above) >= 9
        with s.write_txn() as txn:
            assert learner.forget(txn, ["s0", "s1", "nope"]) == 2
        assert learner.status()["indexed"] == 18
    finally:
        s.close()
