"""Cost of memory selection per sample at memory size 1000.

A task's memory is filled to 1000 samples, then batches of 100 new samples
are consolidated into it (vectorizing, importance-weighted greedy k-center
over the 1100-sample pool, LMDB writes). Prints the time per offered sample.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

from sidecar.config import MemoryConfig, SelectiveConfig, StoreConfig
from sidecar.learning import HashedNgramVectorizer, MemoryConsolidation, MemoryItem
from sidecar.store import Store

CAPACITY = 1000
BATCH = 100
BATCHES = 10


def _items(rng: random.Random, start: int, n: int, vocab: list[str]) -> list[MemoryItem]:
    return [
        MemoryItem(
            f"s{start + i}",
            "bench",
            " ".join(rng.choice(vocab) for _ in range(rng.randint(10, 40))),
            " ".join(rng.choice(vocab) for _ in range(rng.randint(10, 60))),
            rng.random(),
            rng.random(),
        )
        for i in range(n)
    ]


def main() -> None:
    rng = random.Random(42)
    vocab = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
        for _ in range(3000)
    ]
    sel = SelectiveConfig()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(StoreConfig(data_dir=Path(tmp), map_size_bytes=1 << 30, sync=False))
        store.open()
        try:
            mem = MemoryConsolidation(
                store,
                MemoryConfig(capacity_per_task=CAPACITY),
                HashedNgramVectorizer(sel.vector_dim, sel.ngram_sizes),
            )
            with store.write_txn() as txn:
                mem.consolidate(txn, _items(rng, 0, CAPACITY, vocab))
            # one warm-up batch so the steady state (cached Gram matrix) is measured
            with store.write_txn() as txn:
                mem.consolidate(txn, _items(rng, CAPACITY, BATCH, vocab))
            elapsed = 0.0
            for b in range(BATCHES):
                items = _items(rng, CAPACITY + BATCH * (b + 1), BATCH, vocab)
                t0 = time.perf_counter()
                with store.write_txn() as txn:
                    mem.consolidate(txn, items)
                elapsed += time.perf_counter() - t0
            with store.read() as txn:
                size = mem.sizes(txn)["bench"]
        finally:
            store.close()
    per_sample_us = elapsed / (BATCH * BATCHES) * 1e6
    print(
        f"memory selection: {per_sample_us:.0f} us per sample "
        f"(memory {size}, batches of {BATCH}, dim {sel.vector_dim})"
    )


if __name__ == "__main__":
    main()
