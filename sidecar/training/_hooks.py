"""Trainer hooks: how a dataset snapshot reaches a trainer.

- ``command``: runs an argv template as a subprocess (its own process group),
  stdout and stderr to ``<output_dir>/trainer.log``, killed after the
  timeout; exit code 0 is required.
- ``http``: POSTs the manifest (plus ``dataset_dir``/``output_dir``) as JSON,
  retrying connection errors and 5xx answers with backoff.
- ``none``: export only (the stage skips training).

The trainer answers with ``<output_dir>/candidate.json`` (``version``,
``artifact_uri``, ``metrics``), with a JSON body carrying the same fields
(http), or by calling ``AdminService.RegisterCandidate`` with the update id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from sidecar.config import TrainingConfig
from sidecar.errors import SidecarError
from sidecar.training._registry import InvalidCandidateError, validate_candidate

__all__ = [
    "CandidateSpec",
    "CommandHook",
    "HttpHook",
    "TrainerHook",
    "TrainingFailed",
    "TrainingJob",
    "make_hook",
    "read_candidate_file",
]

CANDIDATE_FILE = "candidate.json"
LOG_FILE = "trainer.log"


class TrainingFailed(SidecarError):
    """A training run did not produce a usable candidate; the message says why."""


@dataclass(frozen=True, slots=True)
class TrainingJob:
    update_id: str
    dataset_dir: Path
    output_dir: Path
    base_version: str
    manifest: Mapping[str, Any]
    timeout_seconds: float


@dataclass(frozen=True, slots=True)
class CandidateSpec:
    version: str
    artifact_uri: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)


class TrainerHook(Protocol):
    name: str

    async def train(self, job: TrainingJob) -> CandidateSpec | None:
        """Runs one training job. Returns the candidate, or None when the
        trainer registers it itself. Raises TrainingFailed with the reason."""
        ...


def parse_candidate(doc: Any, where: str) -> CandidateSpec:
    if not isinstance(doc, dict):
        raise TrainingFailed(f"{where}: expected a JSON object with version, artifact_uri")
    try:
        metrics = validate_candidate(
            doc.get("version", ""), doc.get("artifact_uri", ""), doc.get("metrics", {}) or {}
        )
    except InvalidCandidateError as exc:
        raise TrainingFailed(f"{where}: {exc}") from exc
    return CandidateSpec(str(doc["version"]), str(doc.get("artifact_uri", "")), metrics)


def read_candidate_file(path: Path) -> CandidateSpec | None:
    """The candidate in ``path``; None when the file does not exist.

    Raises:
        TrainingFailed: the file is unreadable, not JSON, or misses a field.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TrainingFailed(f"{CANDIDATE_FILE}: cannot read: {exc.strerror}") from exc
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise TrainingFailed(f"{CANDIDATE_FILE}: not valid JSON: {exc}") from exc
    return parse_candidate(doc, CANDIDATE_FILE)


def render_argv(template: Sequence[str], job: TrainingJob) -> list[str]:
    values = {
        "{dataset_dir}": str(job.dataset_dir),
        "{output_dir}": str(job.output_dir),
        "{base_version}": job.base_version,
        "{update_id}": job.update_id,
    }
    out = []
    for arg in template:
        for key, value in values.items():
            arg = arg.replace(key, value)
        out.append(arg)
    return out


class CommandHook:
    name = "command"

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        self._argv = list(argv)
        self._env = dict(env) if env is not None else None

    async def train(self, job: TrainingJob) -> CandidateSpec | None:
        argv = render_argv(self._argv, job)
        job.output_dir.mkdir(parents=True, exist_ok=True)
        with open(job.output_dir / LOG_FILE, "ab") as logf:  # noqa: ASYNC230 - opening is instant
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=logf,
                    stderr=logf,
                    cwd=job.output_dir,
                    env={**os.environ, **(self._env or {}), "ATLAS_UPDATE_ID": job.update_id},
                    start_new_session=True,
                )
            except OSError as exc:
                raise TrainingFailed(f"cannot start trainer {argv[0]!r}: {exc.strerror}") from exc
            try:
                rc = await asyncio.wait_for(proc.wait(), timeout=job.timeout_seconds)
            except TimeoutError:
                _kill_group(proc.pid)
                await proc.wait()
                raise TrainingFailed(
                    f"trainer timed out after {job.timeout_seconds:g} s "
                    "(training.timeout_seconds) and was killed"
                ) from None
            except asyncio.CancelledError:
                _kill_group(proc.pid)
                with contextlib.suppress(Exception):
                    await asyncio.shield(proc.wait())
                raise
        if rc != 0:
            how = f"killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
            raise TrainingFailed(f"trainer {how}; see {job.output_dir / LOG_FILE}")
        return read_candidate_file(job.output_dir / CANDIDATE_FILE)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class HttpHook:
    name = "http"

    def __init__(self, url: str, *, retries: int = 3, backoff_seconds: float = 0.5) -> None:
        self._url = url
        self._retries = retries
        self._backoff = backoff_seconds

    async def train(self, job: TrainingJob) -> CandidateSpec | None:
        body = {
            **job.manifest,
            "dataset_dir": str(job.dataset_dir),
            "output_dir": str(job.output_dir),
            "base_version": job.base_version,
            "update_id": job.update_id,
        }
        timeout = aiohttp.ClientTimeout(total=job.timeout_seconds)
        last = ""
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for attempt in range(self._retries + 1):
                if attempt:
                    await asyncio.sleep(self._backoff * 2 ** (attempt - 1))
                try:
                    async with session.post(self._url, json=body) as resp:
                        text = await resp.text()
                        if 200 <= resp.status < 300:
                            return _candidate_from_body(text, job.output_dir)
                        last = f"HTTP {resp.status}: {text[:200]}"
                        if resp.status < 500:
                            break
                except TimeoutError:
                    raise TrainingFailed(
                        f"trainer endpoint {self._url} did not answer in "
                        f"{job.timeout_seconds:g} s (training.timeout_seconds)"
                    ) from None
                except aiohttp.ClientError as exc:
                    last = f"{type(exc).__name__}: {exc}"
        raise TrainingFailed(f"trainer endpoint {self._url} failed: {last}")


def _candidate_from_body(text: str, output_dir: Path) -> CandidateSpec | None:
    try:
        doc = json.loads(text) if text.strip() else None
    except ValueError:
        doc = None
    if isinstance(doc, dict) and "version" in doc:
        return parse_candidate(doc, "trainer response")
    return read_candidate_file(output_dir / CANDIDATE_FILE)


def make_hook(config: TrainingConfig) -> TrainerHook | None:
    if config.hook == "command":
        return CommandHook(config.command)
    if config.hook == "http":
        return HttpHook(config.http_url, retries=config.http_retries)
    return None
