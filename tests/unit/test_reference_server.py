"""The reference inference server's behaviour configuration (the process itself runs in e2e)."""

from __future__ import annotations

import asyncio
import inspect
import json
import random
import time
from pathlib import Path

import pytest

from sidecar.testing.reference_server import (
    PRESETS,
    Behaviour,
    ReferenceServer,
    base_answer,
    load_behaviours,
    main,
    parser,
)


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


def test_a_probe_takes_the_versions_latency(tmp_path: Path) -> None:
    """The client library times probes around the handler: an instant answer
    would report ~0 ms for every version, and the sidecar's median-latency
    check would compare timing noise."""
    common = ["--target", "127.0.0.1:1", "--server-id", "p", "--state-file", str(tmp_path / "s")]
    args = parser().parse_args([*common, "--seed", "7"])
    behaviours = {"v1": Behaviour(latency_ms=20.0), "v2": Behaviour(latency_ms=80.0)}

    async def timed(server: ReferenceServer, version: str) -> tuple[float, float]:
        # a fresh seeded server draws the latency first (as _generate does)
        drawn = random.Random(7).lognormvariate(0.0, 0.25) * behaviours[version].latency_ms
        t0 = time.perf_counter()
        answer: object = server._answer_probe(version, "how do I sort two lists in go?")
        if inspect.isawaitable(answer):  # the ControlLoop takes either
            answer = await answer
        assert answer
        return (time.perf_counter() - t0) * 1000.0, drawn

    async def run() -> None:
        for version in ("v1", "v2"):
            server = ReferenceServer(args, behaviours)
            took, drawn = await timed(server, version)
            # a lower bound only: a slow machine can add time, never remove it
            assert took >= drawn * 0.99, (version, took, drawn)

    asyncio.run(run())
