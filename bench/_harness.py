"""Shared pieces of the ingest benchmarks: real processes on loopback."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from atlas_sidecar_client import uuid7
from atlas_sidecar_client.pb import events_pb2, ingest_pb2_grpc

from sidecar.testing import DaemonProcess, free_port

ROOT = Path(__file__).resolve().parent.parent


def make_batches(n_batches: int, per_batch: int, prefix: str = "") -> list[events_pb2.EventBatch]:
    """Events of about 300 bytes each (an inference record with short texts)."""
    out = []
    for b in range(n_batches):
        events = []
        for i in range(per_batch):
            if i % 3 == 2:
                ev = events_pb2.Event(
                    event_id=uuid7(),
                    feedback=events_pb2.Feedback(
                        request_id=f"{prefix}req-{b}-{i - 1}",
                        signal=events_pb2.COPY,
                        rating=0.8,
                        user_id="user-1234",
                        attributes={"task_id": "support"},
                    ),
                )
            else:
                ev = events_pb2.Event(
                    event_id=uuid7(),
                    inference=events_pb2.Inference(
                        request_id=f"{prefix}req-{b}-{i}",
                        model_version="model-v12",
                        prompt="How do I reset my password on the account settings page?" * 2,
                        response="Open Settings, choose Security, then Reset password." * 2,
                        latency_ms=123.4,
                        user_id="user-1234",
                        session_id="sess-99",
                        attributes={"task_id": "support"},
                    ),
                )
            ev.time.GetCurrentTime()
            events.append(ev)
        out.append(events_pb2.EventBatch(events=events))
    return out


@dataclass
class StreamResult:
    events: int
    seconds: float
    latencies_ms: list[float]

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    def p(self, q: float) -> float:
        lat = sorted(self.latencies_ms)
        return lat[min(len(lat) - 1, int(q * len(lat)))]


def stream(
    target: str, batches: list[events_pb2.EventBatch], interval: float = 0.0
) -> StreamResult:
    """Sends batches on one StreamEvents call, paced every ``interval`` s (0: as fast as possible)."""
    sent: list[float] = []
    lock = threading.Lock()

    def gen() -> Iterator[events_pb2.EventBatch]:
        start = time.perf_counter()
        for i, b in enumerate(batches):
            if interval:
                delay = start + i * interval - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            with lock:
                sent.append(time.perf_counter())
            yield b

    with grpc.insecure_channel(target) as ch:
        stub = ingest_pb2_grpc.IngestServiceStub(ch)
        t0 = time.perf_counter()
        lat = []
        n = 0
        for i, ack in enumerate(stub.StreamEvents(gen())):
            now = time.perf_counter()
            with lock:
                lat.append((now - sent[i]) * 1000)
            n += ack.accepted + ack.duplicates + len(ack.rejected)
        return StreamResult(n, time.perf_counter() - t0, lat)


class NullServer:
    """A do-nothing IngestService (acks at once, stores nothing) on uvloop + grpc.aio."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> NullServer:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("_null_server.py")), str(self.port)],
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == b"ready"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


def loadgen_binary() -> Path | None:
    """Builds the Go load generator (clients/go/cmd/atlas-loadgen) into .tools/bin.

    None when Go is not installed. A Go client costs the machine little CPU
    per message, so the server's own ceiling shows; the Python client on the
    same 2 cores takes about as much CPU per message as the server.
    """
    if shutil.which("go") is None:
        return None
    out = ROOT / ".tools" / "bin" / "atlas-loadgen"
    subprocess.run(
        ["go", "build", "-o", str(out), "./cmd/atlas-loadgen"],
        cwd=ROOT / "clients" / "go",
        check=True,
    )
    return out


def loadgen(
    binary: Path, target: str, events: int, batch: int, rate: float = 0, prefix: str = "loadgen-"
) -> dict[str, float]:
    """One atlas-loadgen run; its JSON result."""
    out = subprocess.run(
        [
            str(binary),
            "-target",
            target,
            "-events",
            str(events),
            "-batch",
            str(batch),
            "-rate",
            str(rate),
            "-prefix",
            prefix,
            "-json",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return dict(json.loads(out))


def daemon(tmp: str, **env: str) -> DaemonProcess:
    return DaemonProcess(Path(tmp) / "data", http_port=0, env=env)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, RssAnon) in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["RssAnon"].split()[0]) / 1024


def median(xs: list[float]) -> float:
    return statistics.median(xs)


__all__ = [
    "NullServer",
    "StreamResult",
    "daemon",
    "loadgen",
    "loadgen_binary",
    "make_batches",
    "median",
    "os",
    "rss_mb",
    "stream",
    "tempfile",
]
