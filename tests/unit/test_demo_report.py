"""The demo report: every step listed, satisfaction per version, a chart with markers."""

from __future__ import annotations

import json
from pathlib import Path

from sidecar.demo._report import VersionSummary, build_report, windows, write_report

T0 = 1_800_000_000.0


def _history() -> list[dict[str, object]]:
    ms = lambda s: int((T0 + s) * 1000)  # noqa: E731
    return [
        {"kind": "trigger", "time_ms": ms(10), "trigger": "sample_count", "update_id": "u1"},
        {"kind": "trigger_suppressed", "time_ms": ms(11), "reason": "rollout active"},
        {"kind": "dataset", "time_ms": ms(11), "update_id": "u1", "counts": {"sft": 5, "dpo": 7}},
        {"kind": "training_started", "time_ms": ms(11), "update_id": "u1"},
        {"kind": "training_succeeded", "time_ms": ms(12), "update_id": "u1", "version": "v2"},
        {"kind": "candidate_registered", "time_ms": ms(12), "version": "v2"},
        {
            "kind": "rollout_transition",
            "time_ms": ms(13),
            "version": "v2",
            "from_state": "VALIDATING",
            "to_state": "CANARY",
            "stage_index": 1,
            "reason": "probes pass | 12/12",
        },
        {"kind": "promoted", "time_ms": ms(20), "version": "v2"},
        {"kind": "rollback", "time_ms": ms(40), "version": "v3", "reason": "feedback worse"},
    ]


def _stats() -> list[dict[str, object]]:
    out = []
    for s in range(60):
        versions = {"v1": [10, 4]} if s < 20 else {"v2": [9, 8], "v3": [1, 0]}
        out.append({"t": T0 + s + 1, "versions": versions})
    return out


def test_report_lists_every_step_and_satisfaction_per_version(tmp_path: Path) -> None:
    report = build_report(
        started=T0,
        finished=T0 + 61,
        history=_history(),
        stats=_stats(),
        versions={"v2": VersionSummary("v2", "v1", "promoted", expected_satisfaction=0.9)},
        initial_version="v1",
        final_stable="v2",
        ok=True,
        verdict="done",
    )
    kinds = [s["kind"] for s in report.steps]
    assert kinds == [
        "trigger",
        "dataset",
        "training_started",
        "training_succeeded",
        "candidate_registered",
        "rollout_transition",
        "promoted",
        "rollback",
    ]
    assert report.suppressed == 1
    assert report.versions["v1"].live_satisfaction == 0.4
    assert abs((report.versions["v2"].live_satisfaction or 0) - 8 / 9) < 1e-9
    assert report.versions["v3"].max_served_pct == 10.0
    assert report.final_stable_live is not None and report.final_stable_live > 0.85
    md, js, png = write_report(report, tmp_path)
    text = md.read_text()
    for kind in kinds:
        assert f"| {kind} |" in text
    assert "probes pass / 12/12" in text  # a | in a reason cannot break the table
    doc = json.loads(js.read_text())
    assert doc["ok"] and doc["final_stable"] == "v2"
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_windows_group_seconds_and_keep_gaps() -> None:
    stats = [
        {"t": T0 + 1, "versions": {"v1": [3, 1]}},
        {"t": T0 + 2, "versions": {"v1": [2, 2]}},
        {"t": T0 + 13, "versions": {"v2": [4, 4]}},
    ]
    out = windows(stats, 5.0)
    assert out[0][1] == {"v1": [5, 3]}
    assert out[1][1] == {}
    assert out[-1][1] == {"v2": [4, 4]}
