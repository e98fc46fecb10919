"""The reference inference server's behaviour configuration (the process itself runs in e2e)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sidecar.testing.reference_server import PRESETS, Behaviour, base_answer, load_behaviours, main


def test_behaviours_from_presets_and_file(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"v3": {"preset": "bad", "probe_error_rate": 0.0}, "v4": "good"}))
    got = load_behaviours(["v2=bad"], str(path))
    assert got["v2"] == PRESETS["bad"]
    assert got["v4"] == PRESETS["good"]
    assert got["v3"].errors("primary") == PRESETS["bad"].error_rate
    assert got["v3"].errors("shadow") == PRESETS["bad"].error_rate
    assert got["v3"].errors("probe") == 0.0


@pytest.mark.parametrize(
    ("doc", "pairs", "needle"),
    [
        ({"v2": {"preset": "meh"}}, [], "v2.preset"),
        ({"v2": {"latency": 3}}, [], "unknown field(s) ['latency']"),
        ({"v2": {"error_rate": 2}}, [], "error_rate: must be in [0, 1]"),
        ({"v2": {"feedback": "mixed"}}, [], "feedback: expected"),
        ({}, ["v2"], "--behaviour 'v2'"),
        ({}, ["v2=great"], "--behaviour 'v2=great'"),
    ],
)
def test_bad_behaviour_names_the_field(
    tmp_path: Path, doc: dict[str, object], pairs: list[str], needle: str
) -> None:
    path = tmp_path / "b.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError) as err:
        load_behaviours(pairs, str(path))
    assert needle in str(err.value)


def test_bad_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--target", "127.0.0.1:1", "--server-id", "p", "--state-file", str(tmp_path / "s")]
    assert main([*common, "--rps", "0"]) == 2
    assert "--rps" in capsys.readouterr().err
    assert main([*common, "--behaviour", "v2=great"]) == 2
    assert "v2=great" in capsys.readouterr().err


def test_versions_answer_the_same_base_text() -> None:
    assert base_answer("how do I sort two lists in go?") == (
        "to sort two lists in go first read the input then apply the standard steps "
        "and check the result"
    )
    assert Behaviour(suffix="x").suffix == "x"
