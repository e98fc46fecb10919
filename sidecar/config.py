"""Typed configuration: defaults < YAML file < ``ATLAS_SIDECAR__*`` env < flags.

Every tunable number is a key here with the default and a note on what it
trades off. The configuration is read once, at start-up; a bad key or value
stops the daemon before it binds a port, with a message naming the key
(``store.commit_window_ms: ...``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from sidecar.errors import ConfigError

__all__ = [
    "ENV_PREFIX",
    "AdapterConfig",
    "ControlConfig",
    "IngestConfig",
    "ServerConfig",
    "SidecarConfig",
    "StoreConfig",
    "load_config",
]

ENV_PREFIX = "ATLAS_SIDECAR__"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServerConfig(_Section):
    # gRPC listen addresses: host:port for TCP, unix:/path for a socket.
    listen: list[str] = Field(default_factory=lambda: ["127.0.0.1:50051"])
    # HTTP address for /metrics, /api and /dashboard; empty disables it.
    http_listen: str = "127.0.0.1:9464"
    # Largest gRPC message accepted; larger ones get RESOURCE_EXHAUSTED.
    # Bigger batches amortize per-message cost but hold more memory per stream.
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # Open StreamEvents calls allowed at once; more get RESOURCE_EXHAUSTED.
    max_concurrent_streams: int = Field(default=64, ge=1)
    # Seconds SIGTERM/SIGINT waits for in-flight batches to commit and ack.
    grace_seconds: float = Field(default=10.0, gt=0)

    @field_validator("listen", mode="before")
    @classmethod
    def _split_listen(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one listen address is required")
        for addr in value:
            if addr.startswith("unix:"):
                continue
            host, sep, port = addr.rpartition(":")
            if not sep or not host or not port.isdigit() or int(port) > 65535:
                raise ValueError(f"{addr!r} is not host:port or unix:/path")
        return value


class StoreConfig(_Section):
    # Where the LMDB environment, datasets and logs live.
    data_dir: Path = Path("./var/atlas-sidecar")
    # Initial LMDB map size. The file is sparse, so large costs nothing; the
    # map doubles on demand up to map_size_max_bytes.
    map_size_bytes: int = Field(default=1 << 30, ge=1 << 20)
    # Ceiling for map growth. Reaching it answers RESOURCE_EXHAUSTED.
    map_size_max_bytes: int = Field(default=1 << 40, ge=1 << 20)
    # Group commit: the writer takes every queued batch up to this many events
    # into one fsync'd transaction. Larger means fewer fsyncs, longer commits.
    commit_max_events: int = Field(default=8192, ge=1)
    # How long the writer waits for more batches before committing. Zero
    # commits at once (lowest latency); a little more saves fsyncs under load.
    commit_window_ms: float = Field(default=0.5, ge=0, le=1000)
    # fsync each commit. Off survives a process crash but not an OS crash.
    sync: bool = True
    # Events older than this are trimmed from the log (0: keep forever).
    retention_seconds: float = Field(default=7 * 86400, ge=0)
    # Upper bound on events kept in the log (0: no bound).
    retention_max_events: int = Field(default=50_000_000, ge=0)
    # How long an event_id is remembered for dedupe. It cannot exceed the
    # log's retention: an id is forgotten when its event is trimmed.
    dedupe_window_seconds: float = Field(default=86400, ge=0)
    # How often retention runs, and how many events it deletes per transaction
    # (bigger is faster but holds the writer longer).
    retention_interval_seconds: float = Field(default=60, gt=0)
    retention_batch: int = Field(default=10_000, ge=100)


class IngestConfig(_Section):
    # Limits per event; an event over one is rejected with the field named.
    max_id_bytes: int = Field(default=256, ge=8)
    max_text_bytes: int = Field(default=256 * 1024, ge=16)
    max_attributes: int = Field(default=64, ge=0)
    max_attribute_key_bytes: int = Field(default=128, ge=1)
    max_attribute_value_bytes: int = Field(default=4096, ge=1)
    max_logprobs: int = Field(default=32768, ge=0)
    # Batches of one stream being committed at once. More hides commit latency
    # behind reading; fewer bounds memory per stream.
    max_inflight_batches: int = Field(default=64, ge=1)


# -- control channel (sidecar/control) -----------------------------------------


class AdapterConfig(_Section):
    # Drive a model server that cannot run the client library: "vllm" (its
    # runtime LoRA API), "triton" (the Triton / KServe v2 repository gRPC API,
    # also served by MLServer), or "none" (servers connect themselves).
    kind: Literal["none", "vllm", "triton"] = "none"
    # vllm: base URL such as http://127.0.0.1:8000; triton: gRPC host:port.
    url: str = ""
    # The replica id the adapter reports in its Hello.
    server_id: str = "adapter"
    # Triton repository to load from ("" = any).
    repository_name: str = ""
    # Seconds one admin call (load, unload, list) may take. Big models load
    # slowly; a short limit fails them, a long one notices a hung server late.
    timeout_seconds: float = Field(default=120.0, gt=0)
    # How often the adapter re-reads what the server has loaded; a change it
    # did not make (the server restarted) reconnects with a fresh Hello so the
    # sidecar reconciles it. Short notices sooner; long polls the server less.
    resync_seconds: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _check_url(self) -> AdapterConfig:
        if self.kind != "none" and not self.url:
            raise ValueError(f"url is required when kind is {self.kind!r}")
        return self


class ControlConfig(_Section):
    # Seconds a new ControlService.Connect stream may take to send its Hello
    # before it is closed. Short frees a stuck stream sooner; long tolerates a
    # slow server start.
    hello_timeout_seconds: float = Field(default=10.0, gt=0)
    # A directive the server answered with ok=false is sent again after this
    # many seconds, doubling per failure up to retry_max_seconds. Short
    # retries recover fast from a transient failure; long ones spare a server
    # that keeps failing.
    retry_initial_seconds: float = Field(default=1.0, gt=0)
    retry_max_seconds: float = Field(default=60.0, gt=0)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)


class SidecarConfig(_Section):
    server: ServerConfig = Field(default_factory=ServerConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if len(path) < 2:
            raise ConfigError(f"{name}: expected {ENV_PREFIX}SECTION__KEY")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _format_error(exc: ValidationError, origin: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        lines.append(f"{key}: {err['msg']}")
    return f"invalid configuration ({origin}):\n  " + "\n  ".join(lines)


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> SidecarConfig:
    """Builds the configuration: defaults < file < environment < overrides.

    Raises:
        ConfigError: the file cannot be read or parsed, or a key is unknown or
            invalid; the message names every bad key.
    """
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = loaded
    env = _env_overrides(os.environ if environ is None else environ)
    if env:
        origin += " + environment"
    data = _deep_merge(data, env)
    if overrides:
        data = _deep_merge(data, overrides)
    try:
        return SidecarConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, origin)) from exc
