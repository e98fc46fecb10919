"""Daemon memory after ingesting 1,000,000 events (target RSS <= 150 MB).

Prints the daemon's VmRSS and its anonymous part right after the last ack,
and again once every processor and the traffic view have read the whole log
(they lag behind a burst this fast). File-backed pages of the LMDB map are
shared with the page cache and counted in VmRSS only while mapped; the
daemon unmaps the ones it has read every store.release_mapped_pages_seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import daemon, make_batches, rss_mb, stream

STATUS = [str(Path(sys.executable).parent / "atlas-sidecar"), "status", "--json", "--target"]


def caught_up(target: str) -> bool:
    doc = json.loads(subprocess.run([*STATUS, target], capture_output=True, check=True).stdout)
    d = doc["details"]
    lags = [p["lag"] for p in d["processing"]["processors"].values()]
    return not any(lags) and not d["telemetry"]["view_lag_events"]


def main() -> None:
    total, per = 1_000_000, 100
    chunk = 1000  # batches per stream call, so the client never holds 1M events
    with tempfile.TemporaryDirectory() as tmp:
        d = daemon(tmp).start()
        assert d.proc is not None
        try:
            before = rss_mb(d.proc.pid)
            sent = 0
            for c in range(total // (per * chunk)):
                sent += stream(d.target, make_batches(chunk, per, f"c{c}-")).events
            after = rss_mb(d.proc.pid)
            waited = time.monotonic()
            while not caught_up(d.target) and time.monotonic() - waited < 600:
                time.sleep(2)
            settled = rss_mb(d.proc.pid)
            waited = time.monotonic() - waited
        finally:
            d.stop()
    print(
        f"events ingested {sent:,}; daemon RSS at start {before[0]:.0f} MB, after {after[0]:.0f} MB "
        f"(anonymous {after[1]:.0f} MB), once processed ({waited:.0f} s later) {settled[0]:.0f} MB "
        f"(anonymous {settled[1]:.0f} MB)   (target <= 150 MB)"
    )


if __name__ == "__main__":
    main()
