"""The demo trainer as the ``command`` hook runs it: a real subprocess on real files."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.demo._policy import Policy
from sidecar.demo._users import UserPopulation
from sidecar.demo._world import World
from sidecar.scoring import score_feedback


def write_dataset(folder: Path, policy: Policy, world: World, n: int, seed: int) -> None:
    """A dataset snapshot in the sidecar's shapes, with replay rows mixed in."""
    users = UserPopulation(world, seed=seed)
    rng = random.Random(seed)
    sft, prefs, kto = [], [], []
    for i in range(n):
        ask = users.ask()
        choice = policy.act(ask.prompt.text, rng)
        reaction = users.react(ask, choice.answer)
        score = score_feedback([reaction.signal] if reaction.signal else [], reaction.rating)
        source = "replay" if i % 2 else "new"
        if score.has_feedback and score.reward >= 0.7:
            sft.append(
                {
                    "prompt": ask.prompt.text,
                    "completion": choice.answer,
                    "reward": score.reward,
                    "source": source,
                }
            )
        kto.append(
            {
                "prompt": ask.prompt.text,
                "completion": choice.answer,
                "label": score.reward >= 0.7,
                "reward": score.reward,
                "source": source,
            }
        )
        if reaction.correction:
            prefs.append(
                {
                    "prompt": ask.prompt.text,
                    "chosen": reaction.correction,
                    "rejected": choice.answer,
                    "margin": 0.7,
                    "reward": 0.9,
                    "source": source,
                }
            )
    folder.mkdir(parents=True)
    (folder / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    (folder / "preferences.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prefs))
    (folder / "kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kto))
    (folder / "manifest.json").write_text(json.dumps({"base_version": policy.version}))


def run_trainer(
    dataset: Path, out: Path, base: str, models: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar.demo.trainer",
            "--dataset-dir",
            str(dataset),
            "--output-dir",
            str(out),
            "--base-version",
            base,
            "--models-dir",
            str(models),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"OPENBLAS_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )


@pytest.fixture
def setup(tmp_path: Path) -> tuple[World, Policy, Path, Path]:
    world = World()
    base = world.initial_policy("v1")
    models = tmp_path / "models"
    base.save(models / "v1")
    dataset = tmp_path / "datasets" / "u1"
    write_dataset(dataset, base, world, 400, seed=21)
    return world, base, models, dataset


def test_trains_a_better_candidate_and_answers_with_candidate_json(
    setup: tuple[World, Policy, Path, Path], tmp_path: Path
) -> None:
    world, base, models, dataset = setup
    out = tmp_path / "out1"
    proc = run_trainer(dataset, out, "v1", models)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "candidate.json").read_text())
    assert doc["version"] == "v2"
    assert doc["artifact_uri"] == (models / "v2").resolve().as_uri()
    m = doc["metrics"]
    assert m["sabotaged"] == 0.0
    assert m["sft_new"] > 0 and m["sft_replay"] > 0
    assert m["pairs_new"] > 0 and m["pairs_replay"] > 0
    assert m["kto_negatives"] > 0
    assert m["loss_after"] < m["loss_before"]
    candidate = Policy.load(doc["artifact_uri"])
    assert candidate.meta["base_version"] == "v1"
    assert world.expected_satisfaction(candidate) > world.expected_satisfaction(base) + 0.15
    # the base artifact is untouched, and a second run gets a new version
    assert Policy.load(models / "v1").answers == base.answers
    proc = run_trainer(dataset, tmp_path / "out2", "v2", models)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "out2" / "candidate.json").read_text())["version"] == "v3"


def test_sabotaged_run_is_worse_and_says_so(
    setup: tuple[World, Policy, Path, Path], tmp_path: Path
) -> None:
    world, _base, models, dataset = setup
    good = run_trainer(dataset, tmp_path / "a", "v1", models, "--sabotage-run", "2")
    assert good.returncode == 0, good.stderr
    bad = run_trainer(dataset, tmp_path / "b", "v2", models, "--sabotage-run", "2")
    assert bad.returncode == 0, bad.stderr
    assert "SABOTAGED" in bad.stdout
    doc = json.loads((tmp_path / "b" / "candidate.json").read_text())
    assert doc["metrics"]["sabotaged"] == 1.0
    v2 = Policy.load(models / "v2")
    v3 = Policy.load(doc["artifact_uri"])
    assert world.expected_satisfaction(v3) < world.expected_satisfaction(v2) - 0.25


def test_bad_row_is_named_and_nothing_is_written(
    setup: tuple[World, Policy, Path, Path], tmp_path: Path
) -> None:
    _, _, models, dataset = setup
    with open(dataset / "preferences.jsonl", "a") as fh:
        fh.write(json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    out = tmp_path / "out"
    proc = run_trainer(dataset, out, "v1", models)
    assert proc.returncode == 2
    assert "preferences.jsonl:" in proc.stderr and "'rejected'" in proc.stderr
    assert not (out / "candidate.json").exists()


def test_missing_base_version_and_empty_dataset(
    setup: tuple[World, Policy, Path, Path], tmp_path: Path
) -> None:
    _, _, models, dataset = setup
    proc = run_trainer(dataset, tmp_path / "o1", "v9", models)
    assert proc.returncode == 4
    assert "v9" in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "sft.jsonl").write_text("")
    proc = run_trainer(empty, tmp_path / "o2", "v1", models)
    assert proc.returncode == 3
    assert "nothing to train on" in proc.stderr
