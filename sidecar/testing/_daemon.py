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

__all__ = ["DaemonProcess", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    ) -> None:
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
        self._log: IO[bytes] | None = None

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
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.PIPE, stderr=self._log, env=env)
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                rc = self.proc.wait(5)
                raise RuntimeError(
                    f"daemon exited with {rc} before serving; log: {self.log_path}\n"
                    + self.log_path.read_text()[-3000:]
                )
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("event") == "ready":
                self.ready = msg
                return self
        self.kill()
        raise TimeoutError(f"daemon did not become ready in {timeout}s; log: {self.log_path}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait; returns the exit code."""
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

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
