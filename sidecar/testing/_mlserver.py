"""A real MLServer in its own virtual environment, for the Triton adapter's tests.

MLServer pins ``protobuf<7``, which the daemon's environment does not, so it
gets a virtual environment of its own (created once, then reused: a stamp
file records what was installed). It runs with ``parallel_workers: 0``
(its parallel workers crash where uvloop is installed) and
``load_models_at_startup: false``, so models load only when asked.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from sidecar.testing._daemon import free_port

__all__ = ["MLSERVER_REQUIREMENTS", "MLServerProcess", "ensure_mlserver_venv"]

MLSERVER_REQUIREMENTS = ("mlserver==1.7.1", "protobuf<7")

_MODEL = '''\
from mlserver import MLModel
from mlserver.codecs import StringCodec
from mlserver.types import InferenceRequest, InferenceResponse


class EchoModel(MLModel):
    """Answers every request with its own name: enough to tell versions apart."""

    async def load(self) -> bool:
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        out = StringCodec.encode_output("output", [self.name])
        return InferenceResponse(model_name=self.name, outputs=[out])
'''


def ensure_mlserver_venv(path: Path, *, timeout: float = 900.0) -> Path:
    """Creates (once) a virtualenv at ``path`` with MLServer; returns its ``mlserver``.

    Raises:
        RuntimeError: the environment could not be created; the message holds
            the end of pip's output.
    """
    path = Path(path)
    stamp = path / ".atlas-installed"
    wanted = "\n".join(MLSERVER_REQUIREMENTS)
    binary = path / "bin" / "mlserver"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test runs wait for one install
        if stamp.exists() and stamp.read_text() == wanted and binary.exists():
            return binary
        steps = [
            [sys.executable, "-m", "venv", "--clear", str(path)],
            [str(path / "bin" / "python"), "-m", "pip", "install", "-q", *MLSERVER_REQUIREMENTS],
        ]
        for argv in steps:
            try:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                raise RuntimeError(f"{' '.join(argv)} took more than {timeout} s") from exc
            if done.returncode != 0:
                tail = (done.stdout + done.stderr)[-3000:]
                raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{tail}")
        stamp.write_text(wanted)
    return binary


class MLServerProcess:
    """``mlserver start`` on free loopback ports, with one echo model per name.

    ``start()`` returns once the gRPC repository API answers; ``grpc_target``
    is ``127.0.0.1:<port>``.
    """

    def __init__(self, mlserver: Path, workdir: Path, models: Sequence[str]) -> None:
        self.mlserver = mlserver
        self.workdir = Path(workdir)
        self.models = list(models)
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.metrics_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mlserver.log"

    def _write_repository(self) -> Path:
        repo = self.workdir / "repository"
        repo.mkdir(parents=True, exist_ok=True)
        settings = {
            "debug": False,
            "host": "127.0.0.1",
            "http_port": self.http_port,
            "grpc_port": self.grpc_port,
            "metrics_port": self.metrics_port,
            "parallel_workers": 0,
            "load_models_at_startup": False,
        }
        (repo / "settings.json").write_text(json.dumps(settings))
        for name in self.models:
            folder = repo / name
            folder.mkdir(exist_ok=True)
            (folder / "echo_model.py").write_text(_MODEL)
            (folder / "model-settings.json").write_text(
                json.dumps({"name": name, "implementation": "echo_model.EchoModel"})
            )
        return repo

    def start(self, timeout: float = 120.0) -> None:
        """Starts MLServer and waits for its gRPC port.

        Raises:
            RuntimeError: it exited or did not answer in time (the message
                holds the end of its log).
        """
        import grpc

        from sidecar.control.adapters import triton_pb2 as pb
        from sidecar.control.adapters import triton_pb2_grpc as pb_grpc

        repo = self._write_repository()
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        self.proc = subprocess.Popen(
            [str(self.mlserver), "start", str(repo)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.grpc_target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mlserver exited ({self.proc.returncode}):\n{self._tail()}")
                try:
                    stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=2)
                    return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"mlserver did not answer on {self.grpc_target} in {timeout} s:\n{self._tail()}"
                    )
                time.sleep(0.2)

    def _tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stops MLServer (SIGTERM, then SIGKILL after 10 s). Safe twice."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
