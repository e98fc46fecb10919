"""MemoryConsolidation: bounded per task, diverse (k-center), not first-in first-out."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from sidecar.config import MemoryConfig, StoreConfig
from sidecar.learning import (
    HashedNgramVectorizer,
    MemoryConsolidation,
    MemoryItem,
    fifo_memory,
    k_center_select,
)
from sidecar.store import Store, read_history


def _memory(store: Store, capacity: int) -> MemoryConsolidation:
    return MemoryConsolidation(
        store, MemoryConfig(capacity_per_task=capacity), HashedNgramVectorizer(dim=512)
    )


def _topic_words(rng: random.Random, n_topics: int) -> list[list[str]]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [
        ["".join(rng.choice(letters) for _ in range(7)) for _ in range(25)] for _ in range(n_topics)
    ]


def _text(rng: random.Random, words: list[str]) -> str:
    return " ".join(rng.sample(words, 8))


def _feed(
    mem: MemoryConsolidation, store: Store, items: list[MemoryItem], batch: int = 100
) -> None:
    for i in range(0, len(items), batch):
        with store.write_txn() as txn:
            mem.consolidate(txn, items[i : i + batch], now_ms=1_000 + i)


def test_memory_rare_task_survives_a_dominant_stream_that_fifo_forgets(store: Store) -> None:
    rng = random.Random(7)
    topics = _topic_words(rng, 2)
    stream: list[MemoryItem] = []
    # the rare task appears only at the start, then a long run of the dominant one
    for i in range(60):
        stream.append(MemoryItem(f"r{i}", "rare", _text(rng, topics[0]), "ok", 0.8))
    for i in range(2400):
        stream.append(MemoryItem(f"d{i}", "dominant", _text(rng, topics[1]), "ok", 0.8))
    capacity = 200
    mem = _memory(store, capacity)
    _feed(mem, store, stream)

    with store.read() as txn:
        sizes = mem.sizes(txn)
        kept = {it.sample_id for it in mem.items(txn, "rare")}
    # the seed's memory: one first-in first-out buffer of the same total size
    fifo = fifo_memory([s.task_id for s in stream], 2 * capacity)
    fifo_rare = sum(1 for i in fifo if stream[i].task_id == "rare")

    assert fifo_rare == 0
    assert sizes == {"rare": 60, "dominant": capacity}
    assert kept == {f"r{i}" for i in range(60)}


def test_memory_keeps_a_rare_kind_of_input_within_a_task(store: Store) -> None:
    rng = random.Random(11)
    topics = _topic_words(rng, 8)
    stream: list[MemoryItem] = []
    # topic 0 shows up only in the first 30 samples; topics 1..7 keep coming
    for i in range(30):
        stream.append(MemoryItem(f"early{i}", "chat", _text(rng, topics[0]), "ok", 0.5))
    for i in range(1500):
        t = 1 + i % 7
        stream.append(MemoryItem(f"s{i}", "chat", _text(rng, topics[t]), "ok", 0.5))
    capacity = 100
    mem = _memory(store, capacity)
    _feed(mem, store, stream)

    with store.read() as txn:
        kept = list(mem.items(txn, "chat"))
    topic_of = {w: t for t, words in enumerate(topics) for w in words}

    def coverage(texts: list[str]) -> dict[int, int]:
        out: dict[int, int] = {}
        for text in texts:
            t = topic_of[text.split()[0]]
            out[t] = out.get(t, 0) + 1
        return out

    ours = coverage([it.prompt for it in kept])
    fifo = coverage([stream[i].prompt for i in fifo_memory([s.task_id for s in stream], capacity)])
    assert len(kept) == capacity
    assert sorted(ours) == list(range(8))  # every kind of input is represented
    assert ours[0] >= capacity // 16  # the rare one holds a fair share, not a token sample
    assert 0 not in fifo  # first-in first-out lost it entirely


def test_memory_k_center_prefers_distant_and_important_points() -> None:
    vec = HashedNgramVectorizer(dim=256)
    texts = ["the same sentence"] * 20 + ["zebra quantum violin", "mountain river lantern"]
    v = vec.vectorize(texts)
    picked = k_center_select(v, np.ones(len(texts)), 3)
    assert {20, 21} <= set(picked.tolist())  # near-duplicates collapse to one
    weights = np.ones(len(texts))
    weights[5] = 3.0
    picked = k_center_select(v, weights, 1)
    assert picked.tolist() == [5]  # the most important sample seeds the selection


def test_memory_is_persisted_and_duplicates_are_ignored(store_config: StoreConfig) -> None:
    s = Store(store_config)
    s.open()
    mem = _memory(s, 10)
    items = [MemoryItem(f"id{i}", "t", f"prompt number {i} about cats", "c", 0.7) for i in range(5)]
    with s.write_txn() as txn:
        mem.consolidate(txn, items + items[:2], now_ms=5)
    s.close()
    s = Store(store_config)
    s.open()
    try:
        mem = _memory(s, 10)
        with s.read() as txn:
            got = list(mem.items(txn, "t"))
            matrix = mem.task_matrix(txn, "t")
        assert sorted(it.sample_id for it in got) == [f"id{i}" for i in range(5)]
        assert all(it.added_ms == 5 for it in got)
        assert matrix.shape == (5, 512)
        assert np.allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-2)
    finally:
        s.close()


def test_memory_records_task_boundaries(store: Store) -> None:
    mem = _memory(store, 50)
    a = [MemoryItem(f"a{i}", "alpha", f"alpha {i}", "x", 0.5) for i in range(10)]
    b = [MemoryItem(f"b{i}", "beta", f"beta {i}", "x", 0.5) for i in range(10)]
    with store.write_txn() as txn:
        mem.consolidate(txn, a, now_ms=1)
    with store.write_txn() as txn:
        mem.consolidate(txn, a[:2] + b, now_ms=2)
    with store.write_txn() as txn:
        mem.consolidate(txn, a[2:4], now_ms=3)
    with store.read() as txn:
        got = [(d["kind"], d["task_id"]) for d in mem.boundaries(txn)]
        history = [d for d in read_history(txn, store) if d["kind"] == "task_boundary"]
    assert got == [
        ("new_task", "alpha"),
        ("new_task", "beta"),
        ("switch", "beta"),
        ("switch", "alpha"),
    ]
    assert len(history) == 4
    assert mem.status()["task_boundaries"] == 4


def test_memory_replay_shares_the_count_across_tasks(store: Store) -> None:
    mem = _memory(store, 100)
    items = [MemoryItem(f"big{i}", "big", f"big task prompt {i}", "x", 0.5) for i in range(90)]
    items += [
        MemoryItem(f"small{i}", "small", f"small task prompt {i}", "x", 0.5) for i in range(6)
    ]
    with store.write_txn() as txn:
        mem.consolidate(txn, items)
    with store.read() as txn:
        got = mem.replay(txn, 40, seed=3)
        again = mem.replay(txn, 40, seed=3)
        none = mem.replay(txn, 40, exclude=frozenset(i.sample_id for i in items))
    tasks = [it.task_id for it in got]
    assert len(got) == 40
    assert tasks.count("small") == 6 and tasks.count("big") == 34
    assert len({it.sample_id for it in got}) == 40
    assert got == again
    assert none == []


def test_memory_lifecycle_status_reports_size_per_task(store: Store) -> None:
    mem = _memory(store, 3)
    with store.write_txn() as txn:
        mem.consolidate(
            txn, [MemoryItem(f"i{i}", "t", f"distinct text {i * 7919}", "x", 0.5) for i in range(8)]
        )
    st = mem.status()
    assert st["size"] == 3
    assert st["size_per_task"] == {"t": 3}


def test_memory_selection_does_not_depend_on_the_gram_cache(tmp_path: Path) -> None:
    rng = random.Random(5)
    topics = _topic_words(rng, 5)
    stream = [
        MemoryItem(f"s{i}", "t", _text(rng, topics[i % 5]), "ok", rng.random()) for i in range(600)
    ]
    kept: list[list[str]] = []
    for clear_cache in (False, True):
        s = Store(StoreConfig(data_dir=tmp_path / f"d{clear_cache}", map_size_bytes=1 << 28))
        s.open()
        mem = _memory(s, 80)
        for i in range(0, len(stream), 40):
            if clear_cache:  # as after a restart
                mem = _memory(s, 80)
            with s.write_txn() as txn:
                mem.consolidate(txn, stream[i : i + 40], now_ms=1)
        with s.read() as txn:
            kept.append([it.sample_id for it in mem.items(txn, "t")])
        s.close()
    assert len(kept[0]) == 80
    assert kept[0] == kept[1]
