"""The snapshot as the TRL trainer reads it: rows checked, split, counted.

Pure Python (no torch), so the daemon's tests and mypy see it whole.

- ``sft.jsonl``: ``prompt``, ``completion`` (+ ``reward``, ``source``);
- ``preferences.jsonl``: ``prompt``, ``chosen``, ``rejected`` (+ ``margin``);
- ``kto.jsonl``: ``prompt``, ``completion``, ``label`` (true: desirable).

Replay rows (``source`` = ``replay``) are trained on like new ones: they are the
past the replay ratio brings back, and they are what the forgetting figure is
measured on. A fixed share of the rows, chosen by a hash of the prompt (the same
rows on every run over the same snapshot), is held out of training: held-out
pairs give the reward accuracy and margin, held-out SFT rows (replay ones first)
the loss before and after.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = [
    "METHODS",
    "DatasetError",
    "Rows",
    "Settings",
    "ThinDataError",
    "choose_method",
    "load_rows",
]

METHODS = ("dpo", "kto", "sft")


class DatasetError(ValueError):
    """A row is malformed; the message names the file, line and field."""


class ThinDataError(ValueError):
    """Too little data for the method; the message says how much there is and needs."""


@dataclass
class Rows:
    sft: list[dict[str, Any]] = field(default_factory=list)
    pairs: list[dict[str, Any]] = field(default_factory=list)
    kto: list[dict[str, Any]] = field(default_factory=list)
    held_sft: list[dict[str, Any]] = field(default_factory=list)
    held_pairs: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class Settings:
    """What a run does; the ``--config`` file (YAML or JSON) sets any of these."""

    models_dir: str = ""
    steps: int = 12
    learning_rate: float = 5e-4
    batch_size: int = 4
    lora_r: int = 8
    lora_alpha: int = 16
    beta: float = 0.1
    #: DPO only: weight of TRL's "sft" loss (NLL of the chosen answer) beside the
    #: "sigmoid" DPO loss; 0 for plain DPO. Plain DPO mostly pushes the rejected answer
    #: down: on SmolLM2 it stopped the rejected openings but never produced the chosen one.
    dpo_sft_weight: float = 1.0
    max_length: int = 256
    #: fewest training rows of the chosen kind (pairs for DPO) a run accepts
    min_rows: int = 8
    holdout_share: float = 0.2
    threads: int = 2
    seed: int = 0
    #: llama.cpp's convert_lora_to_gguf.py; empty: the cached one, if any
    gguf_converter: str = ""

    @classmethod
    def from_mapping(cls, doc: Mapping[str, Any]) -> Settings:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(doc) - set(known))
        if unknown:
            raise ValueError(f"unknown trainer settings: {', '.join(unknown)}")
        s = cls()
        for key, value in doc.items():
            default = getattr(s, key)
            try:
                setattr(s, key, type(default)(value))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{key}: expected {type(default).__name__}") from exc
        return s


def _lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if not path.exists():
        return
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path.name}: not UTF-8 text: {exc.reason}") from exc
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path.name}:{lineno}: not JSON: {exc.msg}") from exc
        if not isinstance(row, dict):
            raise DatasetError(f"{path.name}:{lineno}: expected a JSON object")
        yield lineno, row


def _need_text(path: Path, lineno: int, row: dict[str, Any], *keys: str) -> None:
    for key in keys:
        value = row.get(key)
        if not isinstance(value, str) or not value.strip():
            raise DatasetError(f"{path.name}:{lineno}: field {key!r} must be a non-empty string")


def _held(prompt: str, share: float) -> bool:
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return h / 2**64 < share


def check_manifest(folder: Path) -> None:
    """Each file against the sha256 and row count the daemon wrote into ``manifest.json``
    (a snapshot damaged or edited after it was written is not trained on).

    Raises:
        DatasetError: the manifest is unreadable, or a file does not match it.
    """
    path = folder / "manifest.json"
    if not path.exists():
        return
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest.get("files", {})
        assert isinstance(files, dict)
    except (ValueError, AssertionError, AttributeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"manifest.json: not a valid manifest: {exc}") from exc
    for name, entry in files.items():
        if not isinstance(entry, dict) or "sha256" not in entry:
            continue
        try:
            data = (folder / name).read_bytes()
        except FileNotFoundError:
            raise DatasetError(f"{name}: listed in manifest.json but missing") from None
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise DatasetError(
                f"{name}: sha256 does not match manifest.json (damaged or changed since "
                "the daemon wrote it)"
            )


def load_rows(folder: Path, *, holdout_share: float = 0.2) -> Rows:
    """Reads and checks the three files; splits off the holdout.

    Raises:
        DatasetError: not a snapshot, a file does not match the manifest, a row
            is not JSON or misses a field.
    """
    if not (folder / "manifest.json").exists() and not any(
        (folder / n).exists() for n in ("sft.jsonl", "preferences.jsonl", "kto.jsonl")
    ):
        raise DatasetError(f"{folder}: not a dataset snapshot (no manifest.json, no .jsonl)")
    check_manifest(folder)
    out = Rows()
    c = {
        "sft_new": 0,
        "sft_replay": 0,
        "pairs_new": 0,
        "pairs_replay": 0,
        "kto_desirable": 0,
        "kto_undesirable": 0,
    }
    path = folder / "sft.jsonl"
    for lineno, row in _lines(path):
        _need_text(path, lineno, row, "prompt", "completion")
        c["sft_replay" if row.get("source") == "replay" else "sft_new"] += 1
        (out.held_sft if _held(row["prompt"], holdout_share) else out.sft).append(row)
    path = folder / "preferences.jsonl"
    for lineno, row in _lines(path):
        _need_text(path, lineno, row, "prompt", "chosen", "rejected")
        c["pairs_replay" if row.get("source") == "replay" else "pairs_new"] += 1
        (out.held_pairs if _held(row["prompt"], holdout_share) else out.pairs).append(row)
    path = folder / "kto.jsonl"
    for lineno, row in _lines(path):
        _need_text(path, lineno, row, "prompt", "completion")
        if not isinstance(row.get("label"), bool):
            raise DatasetError(f"{path.name}:{lineno}: field 'label' must be true or false")
        c["kto_desirable" if row["label"] else "kto_undesirable"] += 1
        # KTO rows are not held out: the held-out prompts are those of sft and pairs.
        if not _held(row["prompt"], holdout_share):
            out.kto.append(row)
    # Replay rows first: the forgetting figure is about what the model knew before.
    out.held_sft.sort(key=lambda r: r.get("source") != "replay")
    c["train_sft"], c["train_pairs"], c["train_kto"] = len(out.sft), len(out.pairs), len(out.kto)
    c["holdout_sft"], c["holdout_pairs"] = len(out.held_sft), len(out.held_pairs)
    out.counts = c
    return out


def choose_method(rows: Rows, requested: str, min_rows: int) -> str:
    """The method to run: ``requested``, or for ``auto`` the first of DPO (pairs),
    KTO (labelled answers), SFT (good answers) with enough training rows.

    Raises:
        ThinDataError: too few rows for the requested method, or for every method.
    """
    have = {"dpo": len(rows.pairs), "kto": len(rows.kto), "sft": len(rows.sft)}
    what = {"dpo": "preference pairs", "kto": "KTO rows", "sft": "SFT rows"}
    if requested != "auto":
        if have[requested] < min_rows:
            raise ThinDataError(
                f"too little data for {requested.upper()}: {have[requested]} "
                f"{what[requested]} to train on (need at least {min_rows}; "
                f"{rows.counts.get('holdout_pairs', 0)} pairs and "
                f"{rows.counts.get('holdout_sft', 0)} SFT rows are held out)"
            )
        return requested
    for method in METHODS:
        if have[method] >= min_rows:
            return method
    raise ThinDataError(
        "too little data for any method: "
        + ", ".join(f"{have[m]} {what[m]}" for m in METHODS)
        + f" to train on (need at least {min_rows} of one kind)"
    )
