"""Ingest's compiled path vs its pure-Python path, two daemons in the same run.

One daemon runs the compiled helpers (sidecar/_fastpath.c: batch decoding
and validation, the writer's rows), the other ``ATLAS_SIDECAR_PURE_PYTHON=1``
(upb parsing, EventValidator, re-serializing). Trials alternate between them,
each streaming the same kind of batches (100 events of about 340 bytes) on
one StreamEvents call and waiting for every ack.

The figure is the daemon's CPU time per ingested event, Python path over
compiled path (how many times less CPU the compiled path needs), taken from
the least CPU per event of each path's trials: contention on a shared machine
only ever adds to it. Wall rates are printed too.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import cpu_seconds, daemon, make_batches, stream
from sidecar._compiled import PURE_PYTHON_ENV, compiled_decoder, compiled_reason

BATCHES = 1000
PER = 100
TRIALS = 3


def main() -> None:
    if compiled_decoder() is None:
        print(f"compiled path unavailable: {compiled_reason()}")
        return
    best: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp_c, tempfile.TemporaryDirectory() as tmp_p:
        daemons = {
            "compiled": daemon(tmp_c).start(),
            "python": daemon(tmp_p, **{PURE_PYTHON_ENV: "1"}).start(),
        }
        try:
            for name, d in daemons.items():
                stream(d.target, make_batches(30, PER, f"warm-{name}"))
            for trial in range(TRIALS):
                for name, d in daemons.items():
                    assert d.proc is not None
                    batches = make_batches(BATCHES, PER, f"{name}{trial}-")
                    c0 = cpu_seconds(d.proc.pid)
                    r = stream(d.target, batches)
                    us = (cpu_seconds(d.proc.pid) - c0) / r.events * 1e6
                    old = best.get(name, (float("inf"), 0.0))
                    best[name] = (min(old[0], us), max(old[1], r.rate))
        finally:
            for d in daemons.values():
                d.stop()
    (c_us, c_rate), (p_us, p_rate) = best["compiled"], best["python"]
    print(f"{BATCHES} batches of {PER} per trial, {TRIALS} trials per path, alternating")
    print("                 daemon CPU us/event   best wall events/s")
    print(f"compiled path  : {c_us:12.2f}   {c_rate:18,.0f}")
    print(f"python path    : {p_us:12.2f}   {p_rate:18,.0f}")
    print(f"CPU per event, python / compiled: {p_us / c_us:.2f}x")


if __name__ == "__main__":
    main()
