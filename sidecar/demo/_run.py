"""``atlas-sidecar demo``: a short real session.

Starts the daemon as a subprocess, streams inference records and feedback
through the client library, prints ``atlas-sidecar status``, stops the
daemon with SIGTERM. (The full learning loop replaces this as the later
stages land.)
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from atlas_sidecar_client import EventStream, Signal

from sidecar.testing import DaemonProcess

__all__ = ["run_demo"]


def run_demo(data_dir: str | None = None, events: int = 20_000) -> int:
    root = Path(data_dir or "./var/demo")
    root.mkdir(parents=True, exist_ok=True)
    daemon = DaemonProcess(root / "sidecar", log_path=root / "sidecar.log")
    print(f"starting the sidecar (data in {daemon.data_dir}, log in {daemon.log_path}) ...")
    daemon.start()
    print(f"  gRPC {daemon.target}   HTTP {daemon.http_url}/api/status")
    rng = random.Random(7)
    signals = [Signal.COPY, Signal.SHARE, Signal.RETRY, Signal.DISMISS, Signal.ENGAGE]
    try:
        stream = EventStream(daemon.target)
        started = time.perf_counter()
        n = 0
        while n < events:
            rid = f"req-{n}"
            stream.record_inference(
                rid,
                "v1",
                prompt=f"question {n % 50}",
                response=f"answer {n % 7}",
                latency_ms=rng.uniform(20, 200),
                user_id=f"u{n % 100}",
            )
            n += 1
            if rng.random() < 0.6 and n < events:
                stream.record_feedback(rid, signal=rng.choice(signals), user_id=f"u{n % 100}")
                n += 1
            if n % 5000 == 0:
                print(f"  streamed {n:,} events, {stream.stats.accepted:,} acked durable")
        ok = stream.flush(60)
        elapsed = time.perf_counter() - started
        stream.close()
        print(
            f"streamed {n:,} events in {elapsed:.2f}s; all acked: {ok}; "
            f"accepted {stream.stats.accepted:,}, duplicates {stream.stats.duplicates}, "
            f"rejected {stream.stats.rejected}"
        )
        print("\n$ atlas-sidecar status")
        from sidecar.cli import main as cli_main

        cli_main(["status", "--target", daemon.target])
    finally:
        rc = daemon.stop()
        print(f"\nsidecar stopped (exit code {rc}); data left in {daemon.data_dir}")
    return 0 if rc == 0 else 1
