"""The demo trainer: trains the next policy from a dataset snapshot.

Run by the sidecar's ``command`` trainer hook::

    python -m sidecar.demo.trainer --dataset-dir D --output-dir O --base-version V \\
        --models-dir M [--sabotage | --sabotage-run N]

It reads ``D/sft.jsonl`` (rows ``{"prompt", "completion", "reward", "source"}``)
and ``D/preferences.jsonl`` (rows ``{"prompt", "chosen", "rejected",
"margin", ...}``); replay rows (``source`` = ``replay``) are trained on like
new ones and counted apart. When ``D/kto.jsonl`` is there, its undesirable
rows (``label`` false) are pushed down too. It starts from the artifact of version ``V`` in
``M/V/``, writes the new artifact to ``M/<new version>/`` (never over an
existing one) and answers with ``O/candidate.json``::

    {"version": "v3", "artifact_uri": "file:///.../models/v3", "metrics": {...}}

``--sabotage`` trains a deliberately bad model (unlikelihood on the good
answers, preference pairs swapped); ``--sabotage-run N`` does so only for the
N-th training run recorded in ``M``, which is how the demo shows a rollback.

Exit codes: 0 done; 2 bad input (the message names the file, line and
field); 3 nothing to train on; 4 the base version has no artifact.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sidecar.demo._policy import Policy, PreferenceRow, SftRow

__all__ = ["DatasetError", "load_dataset", "main", "train"]


class DatasetError(ValueError):
    """A dataset row is malformed; the message names the file, line and field."""


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if not path.exists():
        return
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path.name}:{lineno}: not JSON: {exc.msg}") from exc
            if not isinstance(row, dict):
                raise DatasetError(f"{path.name}:{lineno}: expected an object")
            yield lineno, row


def _text(path: Path, lineno: int, row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value:
        raise DatasetError(f"{path.name}:{lineno}: field {key!r} must be a non-empty string")
    return value


def _number(path: Path, lineno: int, row: dict[str, Any], key: str, default: float) -> float:
    value = row.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DatasetError(f"{path.name}:{lineno}: field {key!r} must be a number")
    return float(value)


def load_negatives(folder: str | os.PathLike[str]) -> list[SftRow]:
    """The undesirable rows of ``kto.jsonl`` (``label`` false), weighted by how bad they were.

    Raises:
        DatasetError: a row is not JSON or misses a field.
    """
    path = Path(folder) / "kto.jsonl"
    out: list[SftRow] = []
    for lineno, row in _rows(path):
        label = row.get("label")
        if not isinstance(label, bool):
            raise DatasetError(f"{path.name}:{lineno}: field 'label' must be true or false")
        if label:
            continue
        reward = _number(path, lineno, row, "reward", 0.0)
        out.append(
            SftRow(
                _text(path, lineno, row, "prompt"),
                _text(path, lineno, row, "completion"),
                max(1.0 - reward, 0.0),
            )
        )
    return out


def load_dataset(
    folder: str | os.PathLike[str],
) -> tuple[list[SftRow], list[PreferenceRow], dict[str, int]]:
    """Reads ``sft.jsonl`` and ``preferences.jsonl``; returns rows and counts by source.

    Raises:
        DatasetError: a row is not JSON or misses a field.
    """
    root = Path(folder)
    counts = {"sft_new": 0, "sft_replay": 0, "pairs_new": 0, "pairs_replay": 0}
    sft: list[SftRow] = []
    path = root / "sft.jsonl"
    for lineno, row in _rows(path):
        reward = _number(path, lineno, row, "reward", 1.0)
        sft.append(
            SftRow(
                _text(path, lineno, row, "prompt"), _text(path, lineno, row, "completion"), reward
            )
        )
        counts["sft_replay" if row.get("source") == "replay" else "sft_new"] += 1
    prefs: list[PreferenceRow] = []
    path = root / "preferences.jsonl"
    for lineno, row in _rows(path):
        margin = _number(path, lineno, row, "margin", 1.0)
        prefs.append(
            PreferenceRow(
                _text(path, lineno, row, "prompt"),
                _text(path, lineno, row, "chosen"),
                _text(path, lineno, row, "rejected"),
                # A tiny margin is weak evidence, but still evidence.
                min(max(margin, 0.25), 1.0),
            )
        )
        counts["pairs_replay" if row.get("source") == "replay" else "pairs_new"] += 1
    return sft, prefs, counts


def _training_runs(models_dir: Path) -> int:
    n = 0
    for meta in models_dir.glob("*/policy.json"):
        try:
            if json.loads(meta.read_text()).get("trained_on") == "dataset":
                n += 1
        except (OSError, json.JSONDecodeError):
            continue
    return n


def _claim_version(models_dir: Path) -> tuple[str, Path]:
    """The next free ``v<N>`` folder, created atomically so two runs never share one."""
    taken = [int(p.name[1:]) for p in models_dir.glob("v*") if p.name[1:].isdigit() and p.is_dir()]
    n = max(taken, default=0) + 1
    while True:
        folder = models_dir / f"v{n}"
        try:
            folder.mkdir(parents=True)
            return folder.name, folder
        except FileExistsError:
            n += 1


def train(
    dataset_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    base_version: str,
    models_dir: str | os.PathLike[str],
    *,
    sabotage: bool = False,
    sabotage_run: int = 0,
    steps: int = 100,
    lr: float = 2.0,
) -> dict[str, Any]:
    """Trains one candidate; returns the ``candidate.json`` document it wrote.

    Raises:
        DatasetError: malformed input.
        FileNotFoundError: no artifact for ``base_version``.
        ValueError: nothing to train on.
    """
    models = Path(models_dir)
    base = Policy.load(models / base_version)
    sft, prefs, counts = load_dataset(dataset_dir)
    negatives = load_negatives(dataset_dir)
    if not sft and not prefs:
        raise ValueError("nothing to train on: sft.jsonl and preferences.jsonl are empty")
    run = _training_runs(models) + 1
    sabotaged = sabotage or run == sabotage_run
    version, folder = _claim_version(models)
    started = time.perf_counter()
    policy = base.copy(version)
    report = policy.fit(
        sft,
        prefs,
        steps=steps,
        lr=lr,
        unlearn=sabotaged,
        negatives=negatives,
        negative_weight=1.0,
    )
    policy.meta = {
        "base_version": base_version,
        "trained_on": "dataset",
        "training_run": run,
        "dataset_dir": str(Path(dataset_dir).resolve()),
        "sabotaged": sabotaged,
    }
    policy.save(folder)
    metrics: dict[str, float] = {
        **report.as_dict(),
        **{k: float(v) for k, v in counts.items()},
        "kto_negatives": float(len(negatives)),
        "training_run": float(run),
        "sabotaged": 1.0 if sabotaged else 0.0,
        "train_seconds": round(time.perf_counter() - started, 4),
    }
    doc = {"version": version, "artifact_uri": folder.resolve().as_uri(), "metrics": metrics}
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "candidate.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
    os.replace(tmp, out / "candidate.json")
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sidecar.demo.trainer", description="Train the next demo policy."
    )
    p.add_argument("--dataset-dir", required=True, help="folder with sft.jsonl, preferences.jsonl")
    p.add_argument("--output-dir", required=True, help="where candidate.json goes")
    p.add_argument("--base-version", required=True, help="the version to start from")
    p.add_argument(
        "--models-dir",
        default=os.environ.get("ATLAS_DEMO_MODELS_DIR", ""),
        help="folder of model versions (default $ATLAS_DEMO_MODELS_DIR)",
    )
    p.add_argument("--sabotage", action="store_true", help="train a deliberately bad model")
    p.add_argument(
        "--sabotage-run",
        type=int,
        default=0,
        metavar="N",
        help="sabotage only the N-th training run in the models dir (0: never)",
    )
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--lr", type=float, default=2.0, help="learning rate scale (default 2.0)")
    args = p.parse_args(argv)
    if not args.models_dir:
        print("trainer: --models-dir (or ATLAS_DEMO_MODELS_DIR) is required", file=sys.stderr)
        return 2
    try:
        doc = train(
            args.dataset_dir,
            args.output_dir,
            args.base_version,
            args.models_dir,
            sabotage=args.sabotage,
            sabotage_run=args.sabotage_run,
            steps=args.steps,
            lr=args.lr,
        )
    except DatasetError as exc:
        print(f"trainer: bad dataset: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(
            f"trainer: no artifact for base version {args.base_version!r}: {exc}", file=sys.stderr
        )
        return 4
    except ValueError as exc:
        print(f"trainer: {exc}", file=sys.stderr)
        return 3
    m = doc["metrics"]
    print(
        f"trained {doc['version']} from {args.base_version}: "
        f"{int(m['sft_rows'])} sft rows ({int(m['sft_replay'])} replay), "
        f"{int(m['preference_rows'])} pairs, loss {m['loss_before']:.3f} -> {m['loss_after']:.3f}"
        + (" [SABOTAGED]" if m["sabotaged"] else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
