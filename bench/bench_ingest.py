"""Durable ingest on one client stream vs a do-nothing gRPC server, same run.

Prints the durable rate (events/s) for batches of 100 events of about 300
bytes, the do-nothing server's rate on the same stream, and their ratio;
then the rate with one event per message. Each rate is also given per CPU
second of the server process: on a shared machine that figure is the one
that compares across runs (the wall rate depends on what else runs).
Targets: >= 100,000 events/s, ratio >= 0.25; one per message >= 10,000/s.

One event per message is also measured with the Go load generator
(clients/go/cmd/atlas-loadgen), against the durable daemon and against the
do-nothing server: a Python client costs this machine about as much CPU per
message as the server, so only a cheap client shows the server's ceiling.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import (
    NullServer,
    cpu_seconds,
    daemon,
    loadgen,
    loadgen_binary,
    make_batches,
    stream,
)


def best_of(pid: int, target: str, batches_fn, runs: int = 3) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Best wall rate and best rate per server CPU-second over ``runs`` runs."""
    wall = per_cpu = 0.0
    for i in range(runs):
        batches = batches_fn(i)
        c0 = cpu_seconds(pid)
        r = stream(target, batches)
        used = cpu_seconds(pid) - c0
        wall = max(wall, r.rate)
        per_cpu = max(per_cpu, r.events / max(used, 1e-3))
    return wall, per_cpu


def best_go(
    pid: int, binary: Path, target: str, events: int = 20_000, batch: int = 1, runs: int = 2
) -> tuple[float, float]:
    """Best wall rate and rate per server CPU-second, Go client."""
    wall = per_cpu = 0.0
    loadgen(binary, target, 20 * batch, batch, prefix=f"w{batch}-")  # warm-up
    for i in range(runs):
        c0 = cpu_seconds(pid)
        r = loadgen(binary, target, events, batch, prefix=f"g{batch}-{i}-")
        used = cpu_seconds(pid) - c0
        wall = max(wall, r["events_per_second"])
        per_cpu = max(per_cpu, r["events"] / max(used, 1e-3))
    return wall, per_cpu


def main() -> None:
    n_batches, per = 2000, 100
    go = loadgen_binary()
    size = len(make_batches(1, 3)[0].events[0].SerializeToString())
    with NullServer() as null:
        assert null.proc is not None
        stream(null.target, make_batches(50, per, "warm"))
        null_rate, null_cpu = best_of(
            null.proc.pid, null.target, lambda i: make_batches(n_batches, per, f"n{i}-")
        )
        null_single_go = best_go(null.proc.pid, go, null.target) if go else None
    with tempfile.TemporaryDirectory() as tmp:
        d = daemon(tmp).start()
        assert d.proc is not None
        try:
            stream(d.target, make_batches(50, per, "warm"))
            durable, durable_cpu = best_of(
                d.proc.pid, d.target, lambda i: make_batches(n_batches, per, f"d{i}-")
            )
            single, single_cpu = best_of(
                d.proc.pid, d.target, lambda i: make_batches(6000, 1, f"s{i}-"), runs=2
            )
            single_go = best_go(d.proc.pid, go, d.target) if go else None
        finally:
            d.stop()
    print(
        f"event size ~{size} bytes, {n_batches} batches of {per} per run, best of 3, load {os.getloadavg()[0]:.1f}"
    )
    print("                           wall events/s   events per server CPU-s")
    print(f"do-nothing gRPC server : {null_rate:14,.0f}   {null_cpu:14,.0f}")
    print(f"durable ingest (fsync) : {durable:14,.0f}   {durable_cpu:14,.0f}   (target >= 100,000)")
    print(
        f"ratio durable / null   : {durable / null_rate:14.2f}   {durable_cpu / null_cpu:14.2f}   (target >= 0.25)"
    )
    print(f"one event per message  : {single:14,.0f}   {single_cpu:14,.0f}   (target >= 10,000)")
    if single_go and null_single_go:
        print(
            f"  same, Go client        : {single_go[0]:14,.0f}   {single_go[1]:14,.0f}   (target >= 10,000)"
        )
        print(
            f"  do-nothing, Go client  : {null_single_go[0]:14,.0f}   {null_single_go[1]:14,.0f}"
            "   (the gRPC server's own ceiling)"
        )
    else:
        print("  (Go not installed: the Go-client figures are left out)")


if __name__ == "__main__":
    main()
