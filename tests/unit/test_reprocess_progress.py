"""``atlas-sidecar reprocess`` reports its progress on stderr, its summary on stdout."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from atlas_sidecar_client.pb import events_pb2

from sidecar.cli import main as cli_main
from sidecar.config import load_config
from sidecar.store import Store, encode_log_value, encode_u64
from sidecar.training._cli import progress_line, reprocess

REQUESTS = 40


def fill_log(data_dir: Path) -> int:
    """A log of answers, each with a rating one millisecond later; returns its length."""
    config = load_config(environ={}, overrides={"store": {"data_dir": str(data_dir)}})
    store = Store(config.store)
    store.open()
    rows: list[tuple[bytes, bytes]] = []
    t = 1_700_000_000_000
    for i in range(REQUESTS):
        inf = events_pb2.Inference(
            request_id=f"r{i}", model_version="v1", prompt=f"q{i}", response=f"a{i}"
        )
        fb = events_pb2.Feedback(request_id=f"r{i}", rating=(i % 5) / 4)
        for ev in (
            events_pb2.Event(event_id=f"i{i}", inference=inf),
            events_pb2.Event(event_id=f"f{i}", feedback=fb),
        ):
            rows.append((encode_u64(len(rows) + 1), encode_log_value(t, ev.SerializeToString())))
        t += 1
    with store.env.begin(write=True) as txn, txn.cursor(db=store.db("events")) as cur:
        cur.putmulti(rows, append=True)
    store.close()
    return len(rows)


def test_progress_is_reported_up_to_the_whole_log(tmp_path: Path) -> None:
    total = fill_log(tmp_path)
    config = load_config(
        environ={},
        overrides={"store": {"data_dir": str(tmp_path), "sync": False}},
    )
    calls: list[tuple[int, int]] = []
    summary = asyncio.run(
        reprocess(
            config,
            progress=lambda done, of, _elapsed: calls.append((done, of)),
            progress_seconds=0.0,
        )
    )
    assert calls, "no progress reported"
    assert {of for _, of in calls} == {total}
    done = [d for d, _ in calls]
    assert done == sorted(done)
    assert calls[-1] == (total, total)
    assert summary["events"] == total
    assert summary["samples"] == REQUESTS


def test_cli_prints_progress_to_stderr_and_the_summary_to_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    total = fill_log(tmp_path)
    assert cli_main(["reprocess", "--data-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["events"] == total
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"reprocess: {total:,} of {total:,} events (100%)"), err
    assert "done in" in last

    assert cli_main(["reprocess", "--data-dir", str(tmp_path), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["events"] == total
    assert err == ""


@pytest.mark.parametrize(
    ("done", "total", "elapsed", "expected"),
    [
        (
            120_000,
            1_000_000,
            12.0,
            "reprocess: 120,000 of 1,000,000 events (12%), 10,000 events/s, about 1 min 28 s left",
        ),
        (0, 500, 0.0, "reprocess: 0 of 500 events (0%), 0 events/s"),
        (500, 500, 2.5, "reprocess: 500 of 500 events (100%), 200 events/s, done in 2.5 s"),
        (
            9_000,
            90_000_000,
            1.0,
            "reprocess: 9,000 of 90,000,000 events (0%), 9,000 events/s, about 2 h 46 min left",
        ),
        (0, 0, 0.1, "reprocess: 0 of 0 events, 0 events/s, done in 0.1 s"),
    ],
)
def test_progress_line(done: int, total: int, elapsed: float, expected: str) -> None:
    assert progress_line(done, total, elapsed) == expected
