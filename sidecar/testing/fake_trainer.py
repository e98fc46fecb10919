"""A stand-in trainer for the ``command`` hook, for tests and demos.

    python -m sidecar.testing.fake_trainer --dataset-dir D --output-dir O
        [--base-version V] [--mode ok|crash|hang|broken|silent] [--mode-file F]

``ok`` reads every dataset file, checks each row has the TRL fields and the
manifest's sha256 matches, and writes ``candidate.json`` with version
``<base>-<update_id>`` and the row counts as metrics. ``crash`` exits 3,
``hang`` sleeps forever, ``broken`` writes an unparseable candidate.json,
``silent`` exits 0 without a candidate.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

__all__ = ["main"]

MODES = ("ok", "crash", "hang", "broken", "silent")
REQUIRED = {
    "sft.jsonl": ("prompt", "completion"),
    "preferences.jsonl": ("prompt", "chosen", "rejected"),
    "kto.jsonl": ("prompt", "completion", "label"),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fake_trainer")
    p.add_argument("--dataset-dir", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--base-version", default="base")
    p.add_argument("--mode", default="ok", choices=MODES)
    p.add_argument("--mode-file", help="read the mode from this file when it exists")
    args = p.parse_args(argv)
    if args.mode_file and Path(args.mode_file).exists():
        args.mode = Path(args.mode_file).read_text().strip()
        if args.mode not in MODES:
            print(f"fake trainer: unknown mode {args.mode!r}", file=sys.stderr)
            return 2
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"fake trainer: mode={args.mode} dataset={args.dataset_dir}", flush=True)
    if args.mode == "crash":
        print("fake trainer: crashing on purpose", file=sys.stderr)
        return 3
    if args.mode == "hang":
        while True:
            time.sleep(3600)
    if args.mode == "broken":
        (out / "candidate.json").write_text('{"version": "oops", ')
        return 0
    if args.mode == "silent":
        return 0
    ds = Path(args.dataset_dir)
    manifest = json.loads((ds / "manifest.json").read_text())
    metrics: dict[str, float] = {}
    for name, fields in REQUIRED.items():
        data = (ds / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != manifest["files"][name]["sha256"]:
            print(f"fake trainer: {name} does not match its sha256", file=sys.stderr)
            return 4
        rows = [json.loads(line) for line in data.decode().splitlines()]
        for row in rows:
            missing = [f for f in fields if f not in row]
            if missing:
                print(f"fake trainer: {name} row misses {missing}", file=sys.stderr)
                return 5
        metrics[f"rows_{name.split('.')[0]}"] = float(len(rows))
    update_id = manifest["update_id"]
    candidate = {
        "version": f"{args.base_version or 'base'}-{update_id}",
        "artifact_uri": f"file://{out / 'adapter'}",
        "metrics": metrics,
    }
    (out / "candidate.json").write_text(json.dumps(candidate))
    print(f"fake trainer: wrote candidate {candidate['version']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
