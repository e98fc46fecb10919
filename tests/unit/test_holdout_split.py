"""Holdout: stratified by task, decided once, never in a learning batch; the regression suite."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from sidecar.config import HoldoutConfig, MemoryConfig, SelectiveConfig, StoreConfig
from sidecar.learning import (
    CandidateSample,
    HashedNgramVectorizer,
    HoldoutSet,
    MemoryConsolidation,
    MemoryItem,
    RegressionSuite,
    SelectiveLearner,
    SelectiveReplayComposer,
)
from sidecar.learning._keys import task_key
from sidecar.store import Store


@pytest.fixture
def store_config(tmp_path: Path) -> StoreConfig:
    return StoreConfig(data_dir=tmp_path / "data", map_size_bytes=1 << 29)


def _stream(n: int, seed: int = 1) -> list[CandidateSample]:
    rng = random.Random(seed)
    tasks = ["faq"] * 8 + ["code"] * 3 + ["legal"]  # unequal task sizes
    out = []
    for i in range(n):
        task = rng.choice(tasks)
        words = " ".join(
            rng.choice(["alpha", "beta", "gamma", "delta", "omega", "sigma"]) for _ in range(6)
        )
        out.append(
            CandidateSample(
                f"req-{i}",
                f"{task} question {i}: {words}",
                f"answer {i}",
                0.6 + 0.4 * rng.random(),
                tuple(-rng.random() for _ in range(8)),
                {"task_id": task},
            )
        )
    return out


def test_holdout_is_stratified_by_task_and_decided_once(store: Store) -> None:
    h = HoldoutSet(store, HoldoutConfig(fraction=0.1, max_per_task=0))
    samples = _stream(3000)
    with store.write_txn() as txn:
        first = [
            h.assign(txn, s.sample_id, s.attributes["task_id"], s.prompt, s.completion, s.reward)
            for s in samples
        ]
    with store.write_txn() as txn:
        again = [
            h.assign(txn, s.sample_id, s.attributes["task_id"], s.prompt, s.completion, s.reward)
            for s in samples
        ]
        counts = h.counts(txn)
    assert first == again
    for task, c in counts.items():
        assert abs(c["held"] - 0.1 * c["offered"]) < 1.0, task
    # not a fixed rhythm: held-out positions are not every 10th sample
    held_idx = [i for i, x in enumerate(first) if x]
    gaps = {b - a for a, b in itertools.pairwise(held_idx)}
    assert len(gaps) > 5
    assert h.status()["size"] == sum(first)


def test_holdout_cap_per_task(store: Store) -> None:
    h = HoldoutSet(store, HoldoutConfig(fraction=0.5, max_per_task=7))
    with store.write_txn() as txn:
        held = sum(h.assign(txn, f"id{i}", "t", f"p{i}", "c", 1.0) for i in range(100))
    assert held == 7


def test_holdout_decides_per_prompt(store: Store) -> None:
    """Later answers to a held-out prompt are held out too, and rows touching it excluded."""
    h = HoldoutSet(store, HoldoutConfig(fraction=0.3, max_per_task=0))
    with store.write_txn() as txn:
        first = {i: h.assign(txn, f"a{i}", "t", f"prompt {i}", "c", 1.0) for i in range(200)}
        again = {i: h.assign(txn, f"b{i}", "t", f"prompt {i}", "other", 0.9) for i in range(200)}
        assert first == again
        held = [i for i, x in first.items() if x]
        kept = [i for i, x in first.items() if not x]
        assert held and kept
        # a row is excluded by its prompt, or by any held-out request it touches
        assert h.excludes(txn, ("never-curated",), f"prompt {held[0]}")
        assert h.excludes(txn, (f"a{kept[0]}", f"a{held[0]}"), "a pair prompt")
        assert not h.excludes(txn, (f"a{kept[0]}", ""), f"prompt {kept[0]}")
        assert h.prompt_held_out(txn, f"prompt {held[0]}")


def _composer(store: Store, *, ratio: float = 0.5, capacity: int = 150) -> SelectiveReplayComposer:
    mem = MemoryConsolidation(
        store,
        MemoryConfig(capacity_per_task=capacity, replay_ratio=ratio),
        HashedNgramVectorizer(dim=256),
    )
    sel = SelectiveLearner(store, SelectiveConfig(value_threshold=0.0, max_batch_samples=0), mem)
    return SelectiveReplayComposer(sel, mem, HoldoutSet(store, HoldoutConfig(fraction=0.1)))


def test_holdout_samples_never_appear_in_any_learning_batch(store: Store) -> None:
    comp = _composer(store)
    samples = _stream(4000, seed=3)
    exported: set[str] = set()
    for i in range(0, len(samples), 250):
        with store.write_txn() as txn:
            batch = comp.compose(txn, samples[i : i + 250], update_id=f"u{i}")
        exported.update(r.sample_id for r in batch.rows)
    with store.read() as txn:
        held = {h.sample_id for h in comp.holdout.items(txn)}
        assert comp.held_out(txn, [s.sample_id for s in samples]) == frozenset(held)
    assert 350 <= len(held) <= 450
    assert exported and not (exported & held)
    # a re-offered held-out sample stays out
    with store.write_txn() as txn:
        again = comp.compose(txn, [s for s in samples if s.sample_id in held], update_id="again")
    assert again.new == [] and again.stats["held_out"] == len(held)


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_memory_replay_ratio_holds_exactly_in_every_batch(store: Store, ratio: float) -> None:
    comp = _composer(store, ratio=ratio)
    samples = _stream(1200, seed=4)
    checked = 0
    for i in range(0, len(samples), 120):
        with store.write_txn() as txn:
            batch = comp.compose(txn, samples[i : i + 120], update_id=f"u{i}")
        new, replay = batch.new, batch.replay
        assert {r.source for r in batch.rows} <= {"new", "replay"}
        assert not ({r.sample_id for r in new} & {r.sample_id for r in replay})
        want = round(len(new) * ratio / (1 - ratio))
        if i >= 240:  # memory holds enough once warm
            assert len(replay) == want
            assert len(replay) / len(batch.rows) == pytest.approx(ratio, abs=0.5 / len(batch.rows))
            checked += 1
        else:
            assert len(replay) <= want
    assert checked == 8


def test_selective_batch_takes_highest_value_first_above_the_threshold(store: Store) -> None:
    mem = MemoryConsolidation(store, MemoryConfig(replay_ratio=0.0), HashedNgramVectorizer(dim=256))
    sel = SelectiveLearner(store, SelectiveConfig(value_threshold=0.4, max_batch_samples=10), mem)
    comp = SelectiveReplayComposer(sel, mem, HoldoutSet(store, HoldoutConfig(fraction=0.0)))
    samples = _stream(60, seed=9)
    with store.write_txn() as txn:
        values = {v.sample.sample_id: v.value for v in sel.assess(txn, samples, index=False)}
    with store.write_txn() as txn:
        batch = comp.compose(txn, samples, update_id="x")
    got = [r.value for r in batch.new]
    assert len(got) == min(10, sum(1 for v in values.values() if v >= 0.4))
    assert got == sorted(got, reverse=True) and min(got) >= 0.4
    assert batch.stats["below_threshold"] == sum(1 for v in values.values() if v < 0.4)


def test_holdout_regression_prompts_mix_holdout_and_memory(store: Store) -> None:
    hs = HoldoutSet(store, HoldoutConfig(fraction=0.5, regression_holdout_share=0.5))
    mem = MemoryConsolidation(store, MemoryConfig(), HashedNgramVectorizer(dim=256))
    with store.write_txn() as txn:
        for i in range(40):
            hs.assign(txn, f"h{i}", ["a", "b"][i % 2], f"held prompt {i}", f"ref {i}", 0.9)
        mem.consolidate(
            txn,
            [
                MemoryItem(f"m{i}", ["a", "b"][i % 2], f"mem prompt {i}", f"ans {i}", 0.7)
                for i in range(30)
            ],
        )
    suite = RegressionSuite(store, hs, mem)
    got = suite.regression_prompts(20)
    assert len(got) == 20
    assert [p.source for p in got].count("holdout") == 10
    assert {p.task_id for p in got if p.source == "holdout"} == {"a", "b"}
    assert all(p.reference and 0.0 <= p.reference_score <= 1.0 for p in got)
    assert len(suite.regression_prompts(1000)) == 20 + 30  # all 20 held out + all of memory
    assert suite.regression_prompts(0) == []


def test_task_counts_are_stored_as_json_dumps_writes_them(store: Store) -> None:
    # the counts record is formatted directly; its bytes must stay json.dumps's
    h = HoldoutSet(store, HoldoutConfig(fraction=0.5, max_per_task=0))
    tasks = ["faq", 'quote " and \\ slash', "caf\u00e9 \u4e2d\u6587", ""]
    with store.write_txn() as txn:
        for i in range(40):
            h.assign(txn, f"s{i}", tasks[i % 4], f"prompt {i}", "answer", 0.9, now_ms=1)
    with store.read() as txn:
        counts = h.counts(txn)
        for task in tasks:
            doc = {"task_id": task, "offered": 10, "held": 5}
            key = b"c" + task_key(task)
            assert bytes(txn.get(key, db=store.db("holdout"))) == json.dumps(doc).encode()
    assert counts == {t: {"offered": 10, "held": 5} for t in tasks}
