"""Ingest throughput with telemetry on vs. off, measured in the same run.

Two real daemons (subprocesses) on loopback, one with ``telemetry.enabled``
false. Each trial streams the same batches (100 events, inference + feedback)
through StreamEvents and waits for every ack; the trials alternate off/on so
machine noise hits both alike. Prints the median rate of each and the cost of
telemetry as a percentage (the figure to compare; the budget is 10 %).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
from atlas_sidecar_client.pb import events_pb2, ingest_pb2_grpc

from sidecar.testing import DaemonProcess

BATCH = 100
BATCHES = 400  # 40k events per trial
TRIALS = 5
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _batches(tag: str) -> list[events_pb2.EventBatch]:
    out = []
    for b in range(BATCHES):
        events = []
        for i in range(BATCH):
            n = b * BATCH + i
            eid = f"{tag}-{n:08d}"
            if i % 4 == 3:
                ev = events_pb2.Event(
                    event_id=eid,
                    feedback=events_pb2.Feedback(request_id=f"{tag}-{n - 1:08d}", signal=1),
                )
            else:
                ev = events_pb2.Event(
                    event_id=eid,
                    inference=events_pb2.Inference(
                        request_id=eid,
                        model_version="v1" if n % 10 else "v2",
                        prompt="What is the capital of France? " * 4,
                        response="Paris is the capital of France. " * 6,
                        latency_ms=42.0,
                    ),
                )
            events.append(ev)
        out.append(events_pb2.EventBatch(events=events))
    return out


def _trial(target: str, batches: list[events_pb2.EventBatch]) -> float:
    with grpc.insecure_channel(target) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        started = time.perf_counter()
        # The producer's trace context rides along, as an instrumented client's would.
        acks = stub.StreamEvents(iter(batches), metadata=(("traceparent", TRACEPARENT),))
        accepted = sum(ack.accepted for ack in acks)
        elapsed = time.perf_counter() - started
    assert accepted == BATCH * BATCHES, accepted
    return accepted / elapsed


def _wait_view_idle(daemon: DaemonProcess) -> None:
    """The traffic view catches up between trials, so work it deferred during
    one trial never lands in the next (the other daemon's) trial."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with urllib.request.urlopen(daemon.http_url + "/api/status", timeout=10) as resp:
            details = json.load(resp)["details"]
        if details.get("telemetry", {}).get("view_lag_events", 0) == 0:
            return
        time.sleep(0.2)
    raise TimeoutError("the traffic view did not catch up")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bench-telemetry-") as tmp:
        root = Path(tmp)
        off = DaemonProcess(root / "off", env={"ATLAS_SIDECAR__TELEMETRY__ENABLED": "false"})
        on = DaemonProcess(root / "on", env={"ATLAS_SIDECAR__TELEMETRY__ENABLED": "true"})
        rates: dict[str, list[float]] = {"off": [], "on": []}
        with off, on:
            _trial(off.target, _batches("warm-off"))
            _trial(on.target, _batches("warm-on"))
            _wait_view_idle(on)
            for t in range(TRIALS):
                for name, daemon in (("off", off), ("on", on)):
                    rates[name].append(_trial(daemon.target, _batches(f"{name}{t}")))
                    _wait_view_idle(daemon)
        r_off, r_on = statistics.median(rates["off"]), statistics.median(rates["on"])
    cost = (r_off - r_on) / r_off * 100
    print(
        f"ingest events/s: telemetry off {r_off:,.0f}, on {r_on:,.0f} "
        f"(median of {TRIALS}, {BATCH} events/batch)"
    )
    print(f"telemetry cost: {cost:.1f} % of ingest throughput (budget 10 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
