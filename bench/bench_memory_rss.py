"""Daemon memory after ingesting 1,000,000 events (target RSS <= 150 MB).

Prints the daemon's VmRSS and its anonymous part; file-backed pages of the
LMDB map are shared with the page cache and counted in VmRSS only when touched.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import daemon, make_batches, rss_mb, stream


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
        finally:
            d.stop()
    print(
        f"events ingested {sent:,}; daemon RSS at start {before[0]:.0f} MB, after {after[0]:.0f} MB "
        f"(anonymous {after[1]:.0f} MB)   (target <= 150 MB)"
    )


if __name__ == "__main__":
    main()
