"""What the daemon writes is for its own user only, whatever the umask.

A daemon runs under umask 022 (the usual default, which makes files 0644
and folders 0755), takes traffic, exports a dataset and runs a command
trainer; every folder it made is then 0700 and every file 0600, the
trainer's own output too, and its Unix socket is 0660.
"""

from __future__ import annotations

import grp
import logging
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from atlas_sidecar_client import EventStream
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.app import SidecarApp
from sidecar.config import load_config
from sidecar.errors import ConfigError
from tests._helpers import MANUAL_LEARNING, trigger_learning, wait_until
from tests.conftest import make_config, target_of

#: A trainer that writes a file of its own and answers with a candidate.
TRAINER = """
import json, os, sys
out = sys.argv[1]
open(os.path.join(out, "adapter.bin"), "wb").write(b"weights")
json.dump({"version": "v2", "artifact_uri": "file://" + out}, open(os.path.join(out, "candidate.json"), "w"))
"""


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _tree(root: Path) -> tuple[dict[Path, int], dict[Path, int]]:
    dirs = {root: _mode(root)}
    files: dict[Path, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            dirs[Path(dirpath, d)] = _mode(Path(dirpath, d))
        for f in filenames:
            files[Path(dirpath, f)] = _mode(Path(dirpath, f))
    return dirs, files


async def test_every_folder_is_0700_and_every_file_0600(tmp_path: Path, umask_022: None) -> None:
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    data = tmp_path / "data"
    app = SidecarApp(
        make_config(
            data,
            **MANUAL_LEARNING,
            training={"hook": "command", "command": [sys.executable, str(script), "{output_dir}"]},
        )
    )
    await app.start()
    try:
        stream = EventStream(target_of(app))
        for i in range(4):
            stream.record_inference(f"r{i}", "v1", prompt=f"question {i}", response=f"answer {i}")
            stream.record_feedback(f"r{i}", rating=1.0)
        assert await stream.aflush(20)
        await stream.aclose()
        await wait_until(lambda: app.training.status()["samples"] == 4)
        uid = await trigger_learning(app, "modes")
    finally:
        await app.shutdown()
    dirs, files = _tree(data)
    names = {p.relative_to(data).as_posix() for p in files}
    # The test reaches every kind of file the daemon and its trainer write.
    assert {"LOCK", "INITIALIZED", "lmdb/data.mdb", "lmdb/lock.mdb"} <= names
    assert f"datasets/{uid}/manifest.json" in names
    assert f"datasets/{uid}/sft.jsonl" in names
    assert f"training/{uid}/trainer.log" in names
    assert f"training/{uid}/adapter.bin" in names
    assert {p: oct(m) for p, m in dirs.items() if m != 0o700} == {}
    assert {p: oct(m) for p, m in files.items() if m != 0o600} == {}


async def test_files_of_an_older_store_are_tightened_and_a_shared_dir_is_named(
    tmp_path: Path, umask_022: None, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    app = SidecarApp(make_config(data))
    await app.start()
    await app.shutdown()
    os.chmod(data, 0o755)
    os.chmod(data / "lmdb" / "data.mdb", 0o644)
    with caplog.at_level(logging.WARNING, logger="sidecar.store"):
        app = SidecarApp(make_config(data))
        await app.start()
        await app.shutdown()
    assert _mode(data / "lmdb" / "data.mdb") == 0o600
    warned = [r.getMessage() for r in caplog.records if "has mode" in r.getMessage()]
    assert warned and "0755" in warned[0] and str(data) in warned[0]
    assert _mode(data) == 0o755  # reported, not changed behind the operator's back


async def test_unix_socket_is_0660_and_its_group_is_configurable(
    tmp_path: Path, umask_022: None
) -> None:
    sock = tmp_path / "s.sock"
    gid = os.getgid()
    group = grp.getgrgid(gid).gr_name
    config = load_config(
        environ={},
        overrides={
            "server": {
                "listen": [f"unix:{sock}"],
                "http_listen": "",
                "unix_socket_group": group,
            },
            "store": {"data_dir": str(tmp_path / "data")},
        },
    )
    app = SidecarApp(config)
    await app.start()
    try:
        assert _mode(sock) == 0o660
        assert sock.stat().st_gid == gid
        async with grpc.aio.insecure_channel(f"unix:{sock}") as ch:
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await app.shutdown()


async def test_an_unknown_socket_group_stops_the_start_naming_the_key(tmp_path: Path) -> None:
    config = load_config(
        environ={},
        overrides={
            "server": {
                "listen": [f"unix:{tmp_path / 's.sock'}"],
                "http_listen": "",
                "unix_socket_group": "no-such-group-here",
            },
            "store": {"data_dir": str(tmp_path / "data")},
        },
    )
    app = SidecarApp(config)
    with pytest.raises(ConfigError, match=r"server\.unix_socket_group: no group named"):
        await app.start()
