"""Ack latency at a steady 10,000 events/s: time from sending a batch to its durable ack.

Batches of 50 events every 5 ms on one stream (a client that lingers 5 ms).
Prints p50/p99 in ms; target p99 <= 25 ms.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import daemon, make_batches, stream


def main() -> None:
    seconds = 15
    per, interval = 50, 0.005
    with tempfile.TemporaryDirectory() as tmp:
        d = daemon(tmp).start()
        try:
            stream(d.target, make_batches(100, per, "warm"), interval)
            r = stream(d.target, make_batches(int(seconds / interval), per, "run"), interval)
        finally:
            d.stop()
    print(
        f"offered {per / interval:,.0f} events/s for {seconds} s, achieved {r.rate:,.0f} events/s"
    )
    print(
        f"ack latency p50 {r.p(0.50):.2f} ms   p99 {r.p(0.99):.2f} ms   max {max(r.latencies_ms):.2f} ms"
        "   (target p99 <= 25 ms)"
    )


if __name__ == "__main__":
    main()
