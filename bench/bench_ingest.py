"""Durable ingest on one client stream vs a do-nothing gRPC server, same run.

Prints the durable rate (events/s) for batches of 100 events of about 300
bytes, the do-nothing server's rate on the same stream, and their ratio;
then the rate with one event per message.
Targets: >= 100,000 events/s, ratio >= 0.25; one per message >= 10,000/s.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import NullServer, daemon, make_batches, stream


def best_of(target: str, batches_fn, runs: int = 3) -> float:  # type: ignore[no-untyped-def]
    return max(stream(target, batches_fn(i)).rate for i in range(runs))


def main() -> None:
    n_batches, per = 2000, 100
    size = len(make_batches(1, 3)[0].events[0].SerializeToString())
    with NullServer() as null:
        stream(null.target, make_batches(50, per, "warm"))
        null_rate = best_of(null.target, lambda i: make_batches(n_batches, per, f"n{i}-"))
    with tempfile.TemporaryDirectory() as tmp:
        d = daemon(tmp).start()
        try:
            stream(d.target, make_batches(50, per, "warm"))
            durable = best_of(d.target, lambda i: make_batches(n_batches, per, f"d{i}-"))
            single = max(stream(d.target, make_batches(6000, 1, f"s{i}-")).rate for i in range(2))
        finally:
            d.stop()
    print(f"event size ~{size} bytes, {n_batches} batches of {per} per run, best of 3")
    print(f"do-nothing gRPC server : {null_rate:12,.0f} events/s")
    print(f"durable ingest (fsync) : {durable:12,.0f} events/s   (target >= 100,000)")
    print(f"ratio durable / null   : {durable / null_rate:12.2f}          (target >= 0.25)")
    print(f"one event per message  : {single:12,.0f} events/s   (target >= 10,000)")


if __name__ == "__main__":
    main()
