"""Good samples a full learning batch left out stay pending for the next one.

``SelectiveReplayComposer`` on a real LMDB: what ``max_batch_samples`` cuts
is kept in the priority index (bounded by ``max_pending_samples`` and
``max_pending_age_seconds``), offered again beside newer samples, ranked
again, and never trained on twice.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

from sidecar.config import HoldoutConfig, MemoryConfig, SelectiveConfig
from sidecar.learning import (
    CandidateSample,
    HashedNgramVectorizer,
    HoldoutSet,
    MemoryConsolidation,
    SelectiveLearner,
    SelectiveReplayComposer,
)
from sidecar.learning._keys import task_key
from sidecar.store import Store


def _composer(store: Store, **selective: Any) -> SelectiveReplayComposer:
    mem = MemoryConsolidation(store, MemoryConfig(replay_ratio=0.0), HashedNgramVectorizer(dim=256))
    cfg = SelectiveConfig(**{"value_threshold": 0.0, **selective})
    sel = SelectiveLearner(store, cfg, mem)
    return SelectiveReplayComposer(sel, mem, HoldoutSet(store, HoldoutConfig(fraction=0.0)))


def _samples(start: int, n: int, *, closed_ms: int = 0, seed: int = 0) -> list[CandidateSample]:
    rng = random.Random(seed * 7919 + start)
    return [
        CandidateSample(
            f"req-{i}",
            f"question {i}: " + " ".join(rng.choice("abcdefghij") * 4 for _ in range(6)),
            f"answer {i}",
            0.9,
            (-0.1 * (1 + rng.random() * 30),) * 6,
            {"task_id": "faq"},
            no=i,
            closed_ms=closed_ms + i,
        )
        for i in range(start, start + n)
    ]


def _offer(
    comp: SelectiveReplayComposer,
    store: Store,
    new: Sequence[CandidateSample],
    by_no: dict[int, CandidateSample],
    update_id: str,
) -> tuple[list[str], dict[str, Any]]:
    """What the training stage does: the pending samples, then the new ones."""
    by_no.update((s.no, s) for s in new)
    with store.write_txn() as txn:
        pending = comp.pending_samples(txn)
        carried = [by_no[no] for no, sid in pending if by_no[no].sample_id == sid]
        batch = comp.compose(txn, [*carried, *new], update_id=update_id)
    return [r.sample_id for r in batch.new], dict(batch.stats)


def test_selective_batch_leftovers_are_offered_again_and_never_trained_twice(
    store: Store,
) -> None:
    comp = _composer(store, max_batch_samples=10)
    by_no: dict[int, CandidateSample] = {}
    first_wave = _samples(1, 25)
    with store.read() as txn:
        values = {
            v.sample.sample_id: v.value
            for v in comp._selective.assess(txn, first_wave, index=False)
        }
    best = sorted(values, key=lambda k: -values[k])

    first, stats = _offer(comp, store, first_wave, by_no, "u1")
    assert first == best[:10]
    assert stats["pending"] == 15 and stats["carried"] == 0
    with store.read() as txn:
        assert comp._selective.pending_count(txn) == 15
        assert [sid for _, sid in comp.pending_samples(txn)] == sorted(
            best[10:], key=lambda s: int(s.split("-")[1])
        )
    assert comp._selective.status()["pending"] == 15

    # Five newer samples: the next batch ranks them with the fifteen left over.
    second, stats = _offer(comp, store, _samples(26, 5), by_no, "u2")
    assert len(second) == 10 and not set(first) & set(second)
    assert stats["carried"] == 15 and stats["pending"] == 10
    assert stats["carried_chosen"] == sum(1 for s in second if int(s.split("-")[1]) <= 25)

    # Draining: no new samples at all, the leftovers still come out, once each.
    third, _ = _offer(comp, store, [], by_no, "u3")
    fourth, stats = _offer(comp, store, [], by_no, "u4")
    assert stats["new"] == 0 and stats["pending"] == 0
    trained = first + second + third + fourth
    assert len(trained) == len(set(trained)) == 30
    with store.read() as txn:
        assert comp._selective.pending_count(txn) == 0
        assert comp.pending_samples(txn) == []
        # each reward entered its task's running mean once, however often offered
        mean = json.loads(bytes(txn.get(b"e" + task_key("faq"), db=store.db("priority"))))
    assert mean["n"] == 30


def test_selective_pending_is_bounded_by_count_and_age(store: Store) -> None:
    day = 86_400_000
    comp = _composer(
        store, max_batch_samples=5, max_pending_samples=8, max_pending_age_seconds=86_400
    )
    by_no: dict[int, CandidateSample] = {}
    _, stats = _offer(comp, store, _samples(1, 20, closed_ms=0), by_no, "u1")
    # 15 left out, 8 kept (the most valuable of them), 7 dropped
    assert stats["pending"] == 8 and stats["pending_dropped_over_cap"] == 7
    with store.read() as txn:
        kept = {sid for _, sid in comp.pending_samples(txn)}

    # Two days later (log time): the leftovers may still be chosen now, but
    # what is cut again is too old to wait any longer.
    late = _samples(100, 6, closed_ms=2 * day)
    chosen, stats = _offer(comp, store, late, by_no, "u2")
    assert stats["carried"] == 8 and len(chosen) == 5
    left_out = (kept | {s.sample_id for s in late}) - set(chosen)
    too_old = {s for s in left_out if s in kept}
    assert stats["pending_dropped_too_old"] == len(too_old) > 0
    with store.read() as txn:
        assert {sid for _, sid in comp.pending_samples(txn)} == left_out - too_old
        assert comp._selective.pending_count(txn) == len(left_out - too_old)


def test_selective_pending_sample_not_offered_again_is_dropped(store: Store) -> None:
    """A pending sample that a step before this one dropped (its source was
    quarantined since, say) leaves the index instead of waiting forever."""
    comp = _composer(store, max_batch_samples=2)
    first = _samples(1, 6)
    with store.write_txn() as txn:
        comp.compose(txn, first, update_id="u1")
        pending = comp.pending_samples(txn)
    assert len(pending) == 4
    gone = pending[0][1]
    offered = [s for s in first if s.sample_id in {sid for _, sid in pending} - {gone}]
    with store.write_txn() as txn:
        batch = comp.compose(txn, offered, update_id="u2")
        left = {sid for _, sid in comp.pending_samples(txn)}
        assert comp._selective.pending_count(txn) == len(left) == 1
    assert gone not in left and gone not in {r.sample_id for r in batch.new}


def test_selective_nothing_waits_without_a_batch_cap_or_with_pending_off(store: Store) -> None:
    by_no: dict[int, CandidateSample] = {}
    comp = _composer(store, max_batch_samples=0, value_threshold=0.5)
    _, stats = _offer(comp, store, _samples(1, 30), by_no, "u1")
    assert stats["pending"] == 0 and stats["below_threshold"] > 0
    with store.read() as txn:
        # below-threshold samples are dropped, not kept in the index
        assert comp._selective.pending_count(txn) == 0
        assert list(comp._selective.ranked(txn)) == []
    off = _composer(store, max_batch_samples=3, max_pending_samples=0)
    chosen, stats = _offer(off, store, _samples(50, 10), by_no, "u2")
    assert len(chosen) == 3 and stats["pending"] == 0
    assert stats["pending_dropped_over_cap"] == 7
