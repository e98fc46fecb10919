"""The daemon as a user runs it: a real process, signals, ports, the CLI."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from atlas_sidecar_client import EventStream

from sidecar.testing import DaemonProcess, free_port, write_test_tokens

CLI = [sys.executable, "-m", "sidecar.cli"]


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_sigterm_commits_acks_and_exits_zero(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "d").start()
    stream = EventStream(daemon.target, linger_ms=1)
    for i in range(3000):
        stream.record_inference(f"r{i}", "v1", prompt="hello", response="world")
    assert stream.flush(30)
    started = time.monotonic()
    rc = daemon.stop(timeout=15)
    assert rc == 0
    assert time.monotonic() - started < 10  # within the default grace period
    stream.close(1)
    restarted = DaemonProcess(tmp_path / "d").start()
    try:
        out = run_cli("status", "--target", restarted.target, "--json")
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["events"] == {"accepted": 3000, "duplicates": 0, "rejected": 0}
        assert doc["store"]["log_events"] == 3000
    finally:
        restarted.stop()


def test_refuses_a_taken_port(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        daemon = DaemonProcess(tmp_path / "d", port=port)
        with pytest.raises(RuntimeError, match="exited with 1") as err:
            daemon.start()
        assert f"cannot listen on 127.0.0.1:{port}" in str(err.value)


def test_refuses_a_port_taken_by_another_sidecar(tmp_path: Path) -> None:
    first = DaemonProcess(tmp_path / "a").start()
    try:
        second = DaemonProcess(tmp_path / "b", port=first.port)
        with pytest.raises(RuntimeError, match="cannot listen on"):
            second.start()
    finally:
        first.stop()


def test_refuses_a_data_dir_held_by_another_sidecar(tmp_path: Path) -> None:
    first = DaemonProcess(tmp_path / "d").start()
    try:
        second = DaemonProcess(tmp_path / "d")
        with pytest.raises(RuntimeError, match="held by another sidecar"):
            second.start()
    finally:
        first.stop()


def test_unix_socket_listener(tmp_path: Path) -> None:
    sock = tmp_path / "sidecar.sock"
    daemon = DaemonProcess(tmp_path / "d", extra_args=["--listen", f"unix:{sock}"]).start()
    try:
        stream = EventStream(f"unix:{sock}")
        stream.record_feedback("r1", rating=1.0)
        assert stream.flush(20)
        assert stream.stats.accepted == 1
        stream.close()
    finally:
        daemon.stop()


def test_validate_config_names_the_bad_key(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("store:\n  commit_window_ms: 2\nserver:\n  listen: 127.0.0.1:6000\n")
    out = run_cli("validate-config", str(good))
    assert out.returncode == 0 and "ok" in out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("store:\n  commit_window_ms: -1\n  colour: blue\n")
    out = run_cli("validate-config", str(bad))
    assert out.returncode == 1
    assert "store.commit_window_ms" in out.stderr
    assert "store.colour" in out.stderr


def test_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "config.example.yaml"
    out = run_cli("validate-config", str(example))
    assert out.returncode == 0, out.stderr


def test_serve_with_a_bad_env_key_stops_before_binding(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.run(
        [*CLI, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**__import__("os").environ, "ATLAS_SIDECAR__INGEST__MAX_ATTRIBUTES": "many"},
    )
    assert proc.returncode == 2
    assert "ingest.max_attributes" in proc.stderr


def test_status_against_no_daemon_is_a_clear_error() -> None:
    out = run_cli("status", "--target", f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert out.returncode == 1
    assert "cannot reach the daemon" in out.stderr


def test_help_teaches() -> None:
    out = run_cli("serve", "--help")
    assert out.returncode == 0
    assert "ATLAS_SIDECAR__" in out.stdout and "--data-dir" in out.stdout


def test_auth_the_cli_takes_a_token_and_sighup_rereads_the_tokens_file(tmp_path: Path) -> None:
    # Only SIGHUP rereads the file here: the periodic check is an hour away.
    daemon = DaemonProcess(
        tmp_path / "d",
        auth=True,
        env={"ATLAS_SIDECAR__AUTH__RELOAD_INTERVAL_SECONDS": "3600"},
    ).start()
    try:
        out = run_cli("status", "--target", daemon.target, "--timeout", "5")
        assert out.returncode == 1
        assert "UNAUTHENTICATED" in out.stderr and "--token" in out.stderr
        out = run_cli("status", "--target", daemon.target, "--token", daemon.tokens["ingest"])
        assert out.returncode == 1 and "PERMISSION_DENIED" in out.stderr
        out = run_cli("status", "--target", daemon.target, "--json", "--token", daemon.token)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["details"]["auth"]["enabled"] is True
        assert daemon.token not in daemon.log_path.read_text()  # never logged
        assert daemon.tokens_file is not None
        new = write_test_tokens(daemon.tokens_file)
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            out = run_cli("status", "--target", daemon.target, "--token", new["read"])
            if out.returncode == 0:
                break
            time.sleep(0.1)
        assert out.returncode == 0, out.stderr
        out = run_cli("status", "--target", daemon.target, "--token", daemon.token)
        assert out.returncode == 1 and "UNAUTHENTICATED" in out.stderr
    finally:
        daemon.stop()
