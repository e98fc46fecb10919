"""The demo's live view and its stop rules, fed with what the monitor would have seen."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest

from sidecar.demo._run import DemoSettings, _Monitor, _Quality, _View, sidecar_config
from sidecar.demo._world import World


def _monitor(tmp_path: Path) -> _Monitor:
    models = tmp_path / "models"
    for v, sabotaged in (("v2", False), ("v3", True)):
        (models / v).mkdir(parents=True)
        doc = {"sabotaged": sabotaged, "trained_on": "dataset", "base_version": "v1"}
        (models / v / "policy.json").write_text(json.dumps(doc))
    now = time.time()
    (tmp_path / "users.jsonl").write_text(
        json.dumps({"t": now, "versions": {"v1": [10, 4], "v2": [10, 9]}}) + "\n"
    )
    mon = _Monitor("127.0.0.1:1", "", "http://127.0.0.1:1", tmp_path / "users.jsonl", models)
    mon._read_stats()
    mon.obs.details = {"learning": {"stable_version": "v2", "samples": 1234}}
    mon.obs.status = {"accepted": 5678, "rejected": 0}
    mon.obs.server = {"split": {"routes": [["v2", 9000], ["v3", 1000]], "shadow": ["", 0]}}

    def rollout(v: str, state: str, bps: int, at: float) -> dict[str, object]:
        return {
            "rollout_id": f"r-{v}",
            "candidate_version": v,
            "stable_version": "v1",
            "state": state,
            "stage_index": 0,
            "candidate_weight_bps": bps,
            "updated": at,
            "transitions": [{"from": "SHADOW", "to": state, "stage": 0, "reason": "why"}],
        }

    mon.obs.rollouts = [rollout("v3", "CANARY", 1000, now), rollout("v2", "PROMOTED", 10000, 1)]
    mon._track()
    return mon


def test_live_view_shows_every_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mon = _monitor(tmp_path)
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    _View(True, "http://127.0.0.1:9/dashboard", 3).render(mon, 42.0)
    text = out.getvalue()
    assert "dashboard: http://127.0.0.1:9/dashboard" in text
    assert "5,678 accepted" in text
    assert "v3 CANARY stage 0 (10% of traffic) vs stable v1" in text
    assert "v2 90% | v3 10%" in text
    assert "v1 0.40 (n=10)" in text and "v2 0.90 (n=10)" in text
    assert "promoted 1/3 (v2)" in text
    assert "trainer wrote v3 from v1 (sabotaged on purpose)" in text


def test_stop_rules_see_promotions_and_the_sabotaged_candidate(tmp_path: Path) -> None:
    mon = _monitor(tmp_path)
    assert mon.promoted() == ["v2"]
    assert not mon.sabotage_rolled_back() and not mon.sabotage_promoted()
    mon.obs.rollouts[0]["state"] = "ROLLED_BACK"
    assert mon.sabotage_rolled_back()
    assert mon.obs.max_weight_bps == {"v3": 1000, "v2": 10000}


def test_config_keeps_only_keys_the_sidecar_knows(tmp_path: Path) -> None:
    settings = DemoSettings(config_overrides={"rollout": {"no_such_key": 1}, "nope": {"a": 1}})
    cfg = sidecar_config(settings, tmp_path / "models")
    assert "nope" not in cfg and "no_such_key" not in cfg["rollout"]
    assert cfg["training"]["hook"] == "command"
    assert "{dataset_dir}" in cfg["training"]["command"]
    assert cfg["rollout"]["auto_start"] is True
    from sidecar.config import load_config

    path = tmp_path / "sidecar.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    loaded = load_config(path, environ={})
    assert loaded.learning.sample_count == settings.sample_count


def test_goal_clears_the_live_bar_by_its_sampling_error(tmp_path: Path) -> None:
    """The final version's live satisfaction is a sample of the settle time's
    answers: a version expected just over 0.8 would read under 0.8 about half
    the time, so the demo keeps learning until the expected figure clears the
    bar by three standard errors of that sample."""
    models = tmp_path / "models"
    World().initial_policy("v1").save(models / "v1")
    # the e2e test's settings: 10 s of settling at 60 questions/s
    quality = _Quality(models, DemoSettings(settle_s=10.0))
    n = 60.0 * 10.0 / 2.0  # half of them, in case the next candidate takes a share
    assert quality.target >= 0.8 + 3.0 * (0.8 * 0.2 / n) ** 0.5
    assert quality.target >= quality.expected("v1") + 0.3
    assert quality.target <= 0.9  # reachable by the demo's learner
    # nothing measured live, nothing to clear
    assert _Quality(models, DemoSettings(settle_s=0.0)).target == pytest.approx(0.8)
