"""The trainer's process: it dies with the daemon, a leftover is killed at start,
nothing a client sends is expanded twice into its argv, and the http hook
neither follows redirects to another host nor reads an endless answer."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web

from sidecar.config import StoreConfig
from sidecar.names import InvalidNameError
from sidecar.store import Store
from sidecar.testing import DaemonProcess, free_port
from sidecar.training import (
    CommandHook,
    HttpHook,
    LearningBatch,
    TrainingFailed,
    TrainingJob,
    write_snapshot,
)
from sidecar.training._procs import RunningTrainer, process_start_ticks
from sidecar.training._stage import _RUNNING_KEY
from tests.integration.test_learning_daemon import Client, traffic, write_config

# A trainer that starts a child of its own (a second process in its group),
# writes both pids, and then sleeps far longer than any test.
SLEEPER = """\
import os, subprocess, sys, time
out = sys.argv[1]
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(os.path.join(out, "pids.tmp"), "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
os.replace(os.path.join(out, "pids.tmp"), os.path.join(out, "pids"))
time.sleep(600)
"""


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting for its reaper is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_until(cond: Callable[[], bool], timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"not in {timeout}s: {what}"
        time.sleep(0.05)


def test_kill_9_of_the_daemon_takes_the_trainer_and_its_children_with_it(
    tmp_path: Path,
) -> None:
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    cfg = write_config(
        tmp_path / "c.yaml",
        learning={"sample_count": 1_000_000, "time_interval_seconds": 1_000_000},
        training={
            "hook": "command",
            "command": [sys.executable, str(script), "{output_dir}"],
            "timeout_seconds": 600,
        },
    )
    daemon = DaemonProcess(tmp_path / "data", config=cfg, http_port=0).start()
    client = Client(daemon.target)
    pids: list[int] = []
    try:
        client.send(traffic(80))
        client.wait(lambda s: s["sft_samples"] > 0)
        from atlas_sidecar_client.pb import admin_pb2

        resp = client.admin.TriggerLearning(
            admin_pb2.TriggerLearningRequest(reason="test"), timeout=10
        )
        assert resp.fired, resp.reason
        pid_file = daemon.data_dir / "training" / resp.update_id / "pids"
        wait_until(pid_file.exists, what="the trainer never started")
        pids = [int(p) for p in pid_file.read_text().split()]
        assert all(running(p) for p in pids)

        daemon.kill()  # SIGKILL: no shutdown code runs in the daemon
        wait_until(lambda: not any(running(p) for p in pids), what=f"trainer {pids} survived")
    finally:
        client.close()
        daemon.kill()
        for pid in pids:  # never leave a sleeper behind, whatever failed
            if running(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_trainer_left_running_is_killed_at_start_a_reused_pid_is_not(tmp_path: Path) -> None:
    data = tmp_path / "data"
    # the leftover: a process group (leader and child) that outlived its daemon
    leftover = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time;"
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
            "print(c.pid, flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    # an unrelated process whose pid is "recorded" with another start time
    # (what a reused pid looks like)
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
    )
    try:
        assert leftover.stdout is not None
        child = int(leftover.stdout.readline())
        ticks = process_start_ticks(leftover.pid)
        assert ticks is not None
        store = Store(StoreConfig(data_dir=data))
        store.open()
        with store.env.begin(write=True) as txn:
            txn.put(
                _RUNNING_KEY,
                RunningTrainer("upd-000001", leftover.pid, ticks).encode(),
                db=store.db("meta"),
            )
        store.close()

        daemon = DaemonProcess(data, http_port=0).start()
        daemon.stop()
        assert leftover.wait(30) == -signal.SIGKILL
        wait_until(lambda: not running(child), what="the leftover's child survived")

        # the same record naming the bystander's pid with a wrong start time
        store = Store(StoreConfig(data_dir=data))
        store.open()
        with store.env.begin(write=True) as txn:
            wrong = (process_start_ticks(bystander.pid) or 0) + 1
            txn.put(
                _RUNNING_KEY,
                RunningTrainer("upd-000002", bystander.pid, wrong).encode(),
                db=store.db("meta"),
            )
        store.close()
        daemon = DaemonProcess(data, http_port=0).start()
        daemon.stop()
        assert bystander.poll() is None, "a process that only shares the pid was killed"
    finally:
        for proc in (leftover, bystander):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


# -- argv and paths ------------------------------------------------------------


def job_in(tmp_path: Path, *, output_dir: Path, base_version: str = "v1") -> TrainingJob:
    snap = write_snapshot(
        tmp_path / "datasets",
        "upd-000001",
        LearningBatch((), ()),
        trigger="manual",
        reason="test",
        base_version="v1",
        created_ms=1,
    )
    return TrainingJob(
        update_id="upd-000001",
        dataset_dir=snap.path,
        output_dir=output_dir,
        base_version=base_version,
        manifest=snap.manifest,
        timeout_seconds=60,
    )


async def test_a_value_holding_a_placeholder_is_not_expanded_again(tmp_path: Path) -> None:
    # an operator's folder name that happens to hold a placeholder
    out = tmp_path / "{base_version}" / "{update_id}"
    argv_file = tmp_path / "argv"
    hook = CommandHook(
        [
            sys.executable,
            "-c",
            "import sys; open(sys.argv[1], 'w').write('\\n'.join(sys.argv[2:]))",
            str(argv_file),
            "--out={output_dir}",
            "--base={base_version}",
        ]
    )
    assert await hook.train(job_in(tmp_path, output_dir=out)) is None  # no candidate.json
    assert argv_file.read_text().splitlines() == [f"--out={out}", "--base=v1"]


@pytest.mark.parametrize("hostile", ["{output_dir}", "--config=/etc/passwd", "../../x", "a b"])
async def test_a_hostile_base_version_never_reaches_the_argv(tmp_path: Path, hostile: str) -> None:
    marker = tmp_path / "ran"
    hook = CommandHook([sys.executable, "-c", f"open({str(marker)!r}, 'w')", "{base_version}"])
    job = job_in(tmp_path, output_dir=tmp_path / "out", base_version=hostile)
    with pytest.raises(TrainingFailed, match="base_version"):
        await hook.train(job)
    assert not marker.exists()


@pytest.mark.parametrize("update_id", ["../escaped", "..", "a/../../b", "-rf"])
def test_a_dataset_folder_never_leaves_the_datasets_folder(tmp_path: Path, update_id: str) -> None:
    root = tmp_path / "data" / "datasets"
    root.mkdir(parents=True)
    with pytest.raises(InvalidNameError, match="update_id"):
        write_snapshot(
            root,
            update_id,
            LearningBatch((), ()),
            trigger="manual",
            reason="test",
            base_version="v1",
            created_ms=1,
        )
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["data", "datasets"]


# -- the http hook -------------------------------------------------------------


@pytest.fixture
async def servers() -> AsyncIterator[Callable[[web.Application, str], asyncio.Future[int]]]:
    runners: list[web.AppRunner] = []

    async def serve(app: web.Application, host: str) -> int:
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, host, port).start()
        runners.append(runner)
        return port

    yield serve  # type: ignore[misc]
    for runner in runners:
        await runner.cleanup()


async def test_http_hook_does_not_follow_a_redirect_to_another_host(
    tmp_path: Path, servers: Callable[[web.Application, str], asyncio.Future[int]]
) -> None:
    other_hits: list[str] = []

    async def other(request: web.Request) -> web.Response:
        other_hits.append(request.path)
        return web.json_response({"version": "stolen"})

    other_app = web.Application()
    other_app.router.add_post("/train", other)
    other_port = await servers(other_app, "127.0.0.1")

    async def redirect_away(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(f"http://localhost:{other_port}/train")

    async def redirect_here(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect("/final")

    async def final(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"version": f"v-{body['update_id']}"})

    app = web.Application()
    app.router.add_post("/away", redirect_away)
    app.router.add_post("/here", redirect_here)
    app.router.add_post("/final", final)
    port = await servers(app, "127.0.0.1")
    job = job_in(tmp_path, output_dir=tmp_path / "out")

    hook = HttpHook(f"http://127.0.0.1:{port}/away", retries=2, backoff_seconds=0.01)
    with pytest.raises(TrainingFailed, match="redirected to another host"):
        await hook.train(job)
    assert other_hits == []
    # a redirect on the same host is followed, with the body
    spec = await HttpHook(f"http://127.0.0.1:{port}/here").train(job)
    assert spec is not None and spec.version == "v-upd-000001"


@pytest.mark.parametrize("chunked", [True, False])
async def test_http_hook_reads_at_most_the_configured_bytes(
    tmp_path: Path,
    servers: Callable[[web.Application, str], asyncio.Future[int]],
    chunked: bool,
) -> None:
    sent = [0]

    async def huge(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse()
        if not chunked:
            resp.content_length = 1 << 30
        await resp.prepare(request)
        chunk = b"x" * 65536
        try:
            for _ in range((1 << 30) // len(chunk)):  # a gigabyte, if anyone reads it
                await resp.write(chunk)
                sent[0] += len(chunk)
        except (ConnectionResetError, RuntimeError):
            pass
        return resp

    app = web.Application()
    app.router.add_post("/train", huge)
    port = await servers(app, "127.0.0.1")
    hook = HttpHook(f"http://127.0.0.1:{port}/train", retries=0, max_response_bytes=4096)
    with pytest.raises(TrainingFailed, match="more than 4096 bytes"):
        await hook.train(job_in(tmp_path, output_dir=tmp_path / "out"))
    assert sent[0] < 1 << 30
