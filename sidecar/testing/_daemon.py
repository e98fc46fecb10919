"""Runs ``atlas-sidecar serve`` as a real subprocess on free loopback ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

__all__ = ["TEST_TOKEN_ROLES", "DaemonProcess", "ReadyProcess", "free_port", "write_test_tokens"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ReadyProcess:
    """A child process that prints one JSON line ``{"event": "ready", ...}`` on
    stdout once it serves (the daemon, the demo's server and users do).

    ``start()`` waits for that line and returns it; ``stop()`` sends SIGTERM and
    waits (SIGKILL after ``timeout``); ``kill()`` is the crash case.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: str | os.PathLike[str],
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.env = dict(os.environ if env is None else env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready: dict[str, Any] = {}
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = 30.0) -> dict[str, Any]:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()/kill()
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=self._log, env=self.env
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                rc = self.proc.wait(5)
                raise RuntimeError(
                    f"{self.name} exited with {rc} before it was ready; log: {self.log_path}\n"
                    + self.log_path.read_text()[-3000:]
                )
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict) and msg.get("event") == "ready":
                self.ready = msg
                return msg
        self.kill()
        raise TimeoutError(f"{self.name} was not ready in {timeout}s; log: {self.log_path}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait; returns the exit code (SIGKILL after ``timeout``)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._close()
        return rc

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close()

    def _close(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None


#: The roles of the tokens :func:`write_test_tokens` makes, by entry name.
TEST_TOKEN_ROLES: dict[str, list[str]] = {
    "all": ["ingest", "server", "operator", "read"],
    # What an inference server needs: send events and keep its control stream.
    "inference": ["ingest", "server"],
    "ingest": ["ingest"],
    "server": ["server"],
    "operator": ["operator"],
    "read": ["read"],
}


def write_test_tokens(path: Path) -> dict[str, str]:
    """A tokens file with one fresh token per entry of TEST_TOKEN_ROLES; name -> token."""
    import yaml

    from sidecar.auth import hash_token, new_token

    tokens = {name: new_token() for name in TEST_TOKEN_ROLES}
    doc = {
        "tokens": [
            {"name": f"test-{name}", "sha256": hash_token(tokens[name]), "roles": roles}
            for name, roles in TEST_TOKEN_ROLES.items()
        ]
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc))
    os.chmod(tmp, 0o600)
    tmp.replace(path)
    return tokens


class DaemonProcess:
    """A sidecar daemon in its own process; ``start()`` waits until it serves.

    The daemon prints one JSON line ``{"event": "ready", ...}`` on stdout once
    every port is bound; that is what ``start()`` waits for.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        http_port: int | None = None,
        config: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        log_path: str | os.PathLike[str] | None = None,
        auth: bool = False,
    ) -> None:
        """``auth=True`` writes a tokens file beside the data dir and serves
        with it: :attr:`token` holds every role, :attr:`tokens` one per role."""
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.http_port = http_port if http_port is not None else free_port()
        self.config = config
        self.env = dict(env or {})
        self.extra_args = list(extra_args)
        self.log_path = (
            Path(log_path) if log_path else self.data_dir.parent / f"{self.data_dir.name}.log"
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready: dict[str, Any] = {}
        self._child: ReadyProcess | None = None
        self.tokens: dict[str, str] = {}
        self.tokens_file: Path | None = None
        if auth:
            self.tokens_file = self.data_dir.parent / f"{self.data_dir.name}.tokens.yaml"
            self.tokens = write_test_tokens(self.tokens_file)
            self.env.setdefault("ATLAS_SIDECAR__AUTH__TOKENS_FILE", str(self.tokens_file))

    def relaunch(self) -> DaemonProcess:
        """A new process, not started, on the same data dir, ports, config and tokens."""
        again = DaemonProcess(
            self.data_dir,
            port=self.port,
            http_port=self.http_port,
            config=self.config,
            env=self.env,
            extra_args=self.extra_args,
            log_path=self.log_path,
        )
        again.tokens, again.tokens_file = dict(self.tokens), self.tokens_file
        return again

    @property
    def token(self) -> str:
        """A token with every role ("" without auth)."""
        return self.tokens.get("all", "")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def argv(self) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "sidecar.cli",
            "serve",
            "--listen",
            self.target,
            "--http-listen",
            f"127.0.0.1:{self.http_port}" if self.http_port else "",
            "--data-dir",
            str(self.data_dir),
        ]
        if self.config:
            argv += ["--config", str(self.config)]
        return argv + self.extra_args

    def start(self, timeout: float = 30.0) -> DaemonProcess:
        self._child = ReadyProcess("daemon", self.argv(), self.log_path, {**os.environ, **self.env})
        try:
            self.ready = self._child.start(timeout)
        finally:
            self.proc = self._child.proc
        return self

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait; returns the exit code."""
        return self._child.stop(timeout) if self._child is not None else 0

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        if self._child is not None:
            self._child.kill()

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
