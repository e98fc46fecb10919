"""A shortened ``atlas-sidecar demo``: real processes, a real learner, a sabotaged candidate.

Judged as the demo promises: the final stable version satisfies at least 80%
of users and at least 30 points more than the initial one; the sabotaged
candidate is rolled back before it gets more than 10% of traffic; every step
of the loop is in the report.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(360)]


def test_shortened_demo_closes_the_loop(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar.cli",
            "demo",
            "--data-dir",
            str(data),
            "--plain",
            "--promotions",
            "2",
            "--sabotage-run",
            "2",
            "--deadline",
            "240",
            "--settle",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    report_path = data / "report.json"
    assert report_path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert proc.returncode == 0, report["verdict"] + "\n" + proc.stdout[-3000:]
    assert report["ok"]
    assert "dashboard http://127.0.0.1:" in proc.stdout

    versions = report["versions"]
    initial = versions[report["initial_version"]]
    final = versions[report["final_stable"]]
    assert report["final_stable"] != report["initial_version"]
    assert final["outcome"] == "promoted"
    # what users felt while the final version served them ...
    live = report["final_stable_live_satisfaction"]
    assert live is not None and live >= 0.8, live
    assert live >= initial["live_satisfaction"] + 0.3
    # ... and the exact figure from the artifacts
    assert final["expected_satisfaction"] >= 0.8
    assert final["expected_satisfaction"] >= initial["expected_satisfaction"] + 0.3

    sabotaged = [v for v in versions.values() if v["sabotaged"]]
    assert len(sabotaged) == 1
    bad = sabotaged[0]
    assert bad["outcome"] in ("rolled_back", "aborted")
    assert bad["max_traffic_pct"] <= 10.0

    kinds = {step["kind"] for step in report["steps"]}
    for kind in (
        "trigger",
        "dataset",
        "training_started",
        "training_succeeded",
        "candidate_registered",
        "rollout_transition",
        "promoted",
        "rollback",
    ):
        assert kind in kinds, f"{kind} missing from the report's steps"
    bad_steps = {s["kind"] for s in report["steps"] if s["version"] == bad["version"]}
    assert "candidate_registered" in bad_steps and "rollback" in bad_steps

    md = (data / "report.md").read_text()
    assert "## Every step" in md and bad["version"] in md
    assert (data / "satisfaction.png").read_bytes()[:4] == b"\x89PNG"
    # the data dir stays for `atlas-sidecar status` / `export`
    assert (data / "sidecar" / "data.mdb").exists() or any((data / "sidecar").iterdir())
