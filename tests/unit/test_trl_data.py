"""The TRL trainer's reading of a snapshot (pure Python: no torch needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sidecar.training import LearningBatch, write_snapshot
from sidecar.training._trl_data import (
    DatasetError,
    Settings,
    ThinDataError,
    choose_method,
    load_rows,
)


def write(folder: Path, **files: list[dict[str, object]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def pairs(n: int, source: str = "new") -> list[dict[str, object]]:
    return [
        {"prompt": f"q{i}", "chosen": f"Summary: a{i}", "rejected": f"a{i}", "source": source}
        for i in range(n)
    ]


def test_rows_are_split_the_same_way_every_time_and_counted_by_source(tmp_path: Path) -> None:
    sft = [
        {"prompt": f"s{i}", "completion": "c", "source": "replay" if i % 2 else "new"}
        for i in range(40)
    ]
    folder = write(tmp_path / "d", sft=sft, preferences=pairs(50))
    a, b = load_rows(folder), load_rows(folder)
    assert [r["prompt"] for r in a.held_pairs] == [r["prompt"] for r in b.held_pairs]
    assert 0 < len(a.held_pairs) < 25 and len(a.pairs) + len(a.held_pairs) == 50
    assert a.counts["sft_replay"] == 20 and a.counts["sft_new"] == 20
    # replay rows first in the forgetting holdout
    sources = [r["source"] for r in a.held_sft]
    assert sources == sorted(sources, key=lambda s: s != "replay")
    assert not {r["prompt"] for r in a.pairs} & {r["prompt"] for r in a.held_pairs}


def test_too_few_pairs_for_dpo_says_how_many_there_are_and_are_needed(tmp_path: Path) -> None:
    rows = load_rows(write(tmp_path / "d", preferences=pairs(3)))
    with pytest.raises(
        ThinDataError, match=r"too little data for DPO: \d+ preference pairs.*at least 8"
    ):
        choose_method(rows, "dpo", 8)
    with pytest.raises(ThinDataError, match="too little data for any method"):
        choose_method(rows, "auto", 8)


def test_auto_prefers_pairs_then_kto_then_sft(tmp_path: Path) -> None:
    kto = [{"prompt": f"k{i}", "completion": "c", "label": i % 2 == 0} for i in range(40)]
    sft = [{"prompt": f"s{i}", "completion": "c"} for i in range(40)]
    assert (
        choose_method(load_rows(write(tmp_path / "a", preferences=pairs(40), kto=kto)), "auto", 8)
        == "dpo"
    )
    assert (
        choose_method(load_rows(write(tmp_path / "b", preferences=pairs(2), kto=kto)), "auto", 8)
        == "kto"
    )
    assert choose_method(load_rows(write(tmp_path / "c", sft=sft)), "auto", 8) == "sft"


def test_a_malformed_row_is_named_by_file_line_and_field(tmp_path: Path) -> None:
    folder = write(tmp_path / "d", preferences=pairs(2))
    with (folder / "preferences.jsonl").open("a") as f:
        f.write('{"prompt": "q", "chosen": ""}\n')
    with pytest.raises(DatasetError, match=r"preferences.jsonl:3: field 'chosen'"):
        load_rows(folder)
    (folder / "preferences.jsonl").write_text("{not json\n")
    with pytest.raises(DatasetError, match=r"preferences.jsonl:1: not JSON"):
        load_rows(folder)
    with pytest.raises(DatasetError, match="not a dataset snapshot"):
        load_rows(tmp_path / "empty")


def test_a_snapshot_changed_after_the_daemon_wrote_it_is_refused(tmp_path: Path) -> None:
    snap = write_snapshot(
        tmp_path / "datasets",
        "upd-000001",
        LearningBatch((), ()),
        trigger="manual",
        reason="test",
        base_version="base",
        created_ms=1,
    )
    assert load_rows(snap.path).counts["train_pairs"] == 0
    with (snap.path / "sft.jsonl").open("a") as f:
        f.write('{"prompt": "p", "completion": "c"}\n')
    with pytest.raises(DatasetError, match=r"sft\.jsonl: sha256 does not match manifest\.json"):
        load_rows(snap.path)


def test_settings_refuse_unknown_keys_and_wrong_types() -> None:
    assert Settings.from_mapping({"steps": "12", "beta": 0.2}).steps == 12
    with pytest.raises(ValueError, match="unknown trainer settings: stepz"):
        Settings.from_mapping({"stepz": 1})
    with pytest.raises(ValueError, match="steps: expected int"):
        Settings.from_mapping({"steps": "many"})
