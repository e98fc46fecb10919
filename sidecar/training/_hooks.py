"""Trainer hooks: how a dataset snapshot reaches a trainer.

- ``command``: runs an argv template as a subprocess in its own process
  group, on a leash (``_leash.py``) that kills the group when the daemon
  dies, even by ``kill -9``; stdout and stderr to ``<output_dir>/trainer.log``,
  killed after the timeout; exit code 0 is required. Each placeholder is
  substituted once: a value is never searched for placeholders again.
- ``http``: POSTs the manifest (plus ``dataset_dir``/``output_dir``) as JSON,
  retrying connection errors and 5xx answers with backoff. Redirects are
  followed only to the same scheme, host and port; at most
  ``training.http_max_response_bytes`` of an answer are read.
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
import re
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from yarl import URL

from sidecar._private import make_private_dir, open_private
from sidecar.config import TrainingConfig
from sidecar.errors import SidecarError
from sidecar.names import check_name
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
#: The wrapper every command trainer runs under (a file of its own, run by path).
LEASH = Path(__file__).with_name("_leash.py")
#: Same-origin redirects followed by the http hook before it gives up.
MAX_REDIRECTS = 5


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
    #: Awaited with the trainer's pid once its process runs (the stage records
    #: it, so that a restart can find and kill a trainer left behind).
    on_started: Callable[[int], Awaitable[None]] | None = None


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


_PLACEHOLDER = re.compile(r"\{(dataset_dir|output_dir|base_version|update_id)\}")


def render_argv(template: Sequence[str], job: TrainingJob) -> list[str]:
    """The template with each placeholder replaced by its value, in one pass:
    a value that itself holds ``{output_dir}`` stays as it is.

    Raises:
        TrainingFailed: the update id or base version is not a valid name
            (it would be read as an option, or escape its folder).
    """
    for name, value in (("update_id", job.update_id), ("base_version", job.base_version)):
        reason = check_name(name, value)
        if reason is not None and not (name == "base_version" and not value):
            raise TrainingFailed(f"not starting the trainer: {reason}")
    values = {
        "dataset_dir": str(job.dataset_dir),
        "output_dir": str(job.output_dir),
        "base_version": job.base_version,
        "update_id": job.update_id,
    }
    return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], arg) for arg in template]


class CommandHook:
    name = "command"

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        self._argv = list(argv)
        self._env = dict(env) if env is not None else None

    async def train(self, job: TrainingJob) -> CandidateSpec | None:
        argv = render_argv(self._argv, job)
        env = {**os.environ, **(self._env or {}), "ATLAS_UPDATE_ID": job.update_id}
        if shutil.which(argv[0], path=env.get("PATH")) is None:
            raise TrainingFailed(f"cannot start trainer {argv[0]!r}: not found or not executable")
        make_private_dir(job.output_dir)
        # The leash is forked from the event loop's thread, which lives as
        # long as the daemon: PR_SET_PDEATHSIG fires when the forking thread
        # ends, not only the process.
        leashed = [sys.executable, "-I", "-S", str(LEASH), str(os.getpid()), "--", *argv]
        with open_private(job.output_dir / LOG_FILE, "ab") as logf:
            log_start = logf.tell()
            try:
                proc = await asyncio.create_subprocess_exec(
                    *leashed,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=logf,
                    stderr=logf,
                    cwd=job.output_dir,
                    env=env,
                    start_new_session=True,
                )
            except OSError as exc:
                raise TrainingFailed(f"cannot start trainer {argv[0]!r}: {exc.strerror}") from exc
            try:
                if job.on_started is not None:
                    await job.on_started(proc.pid)
                rc = await asyncio.wait_for(proc.wait(), timeout=job.timeout_seconds)
            except TimeoutError:
                _kill_group(proc.pid)
                await proc.wait()
                raise TrainingFailed(
                    f"trainer timed out after {job.timeout_seconds:g} s "
                    "(training.timeout_seconds) and was killed"
                ) from None
            except BaseException:  # cancelled (shutdown), or the record failed
                _kill_group(proc.pid)
                with contextlib.suppress(Exception):
                    await asyncio.shield(proc.wait())
                raise
        if rc != 0:
            how = f"killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
            said = _last_line(job.output_dir / LOG_FILE, log_start)
            raise TrainingFailed(
                f"trainer {how}{f': {said}' if said else ''}; see {job.output_dir / LOG_FILE}"
            )
        return read_candidate_file(job.output_dir / CANDIDATE_FILE)


def _last_line(path: Path, start: int, limit: int = 300) -> str:
    """The last non-empty line this run wrote to its log (at most ``limit`` characters):
    a trainer's own account of why it failed goes into the recorded reason."""
    try:
        with open(path, "rb") as f:
            f.seek(max(start, f.seek(0, os.SEEK_END) - 8192))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1][:limit] if lines else ""


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class HttpHook:
    name = "http"

    def __init__(
        self,
        url: str,
        *,
        retries: int = 3,
        backoff_seconds: float = 0.5,
        max_response_bytes: int = 1 << 20,
    ) -> None:
        self._url = url
        self._retries = retries
        self._backoff = backoff_seconds
        self._max_bytes = max_response_bytes

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
                    status, text = await self._post(session, body)
                except TimeoutError:
                    raise TrainingFailed(
                        f"trainer endpoint {self._url} did not answer in "
                        f"{job.timeout_seconds:g} s (training.timeout_seconds)"
                    ) from None
                except aiohttp.ClientError as exc:
                    last = f"{type(exc).__name__}: {exc}"
                    continue
                if 200 <= status < 300:
                    return _candidate_from_body(text, job.output_dir)
                last = f"HTTP {status}: {text[:200]}"
                if status < 500:
                    break
        raise TrainingFailed(f"trainer endpoint {self._url} failed: {last}")

    async def _post(self, session: aiohttp.ClientSession, body: dict[str, Any]) -> tuple[int, str]:
        """POSTs ``body``, following redirects only within the same origin;
        returns (status, text of at most ``max_response_bytes``).

        Raises:
            TrainingFailed: a redirect to another origin, too many redirects,
                or an answer over the size limit (none of them is retried).
        """
        url = URL(self._url)
        for _ in range(MAX_REDIRECTS + 1):
            async with session.post(url, json=body, allow_redirects=False) as resp:
                if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                    target = url.join(URL(resp.headers["Location"]))
                    if target.origin() != url.origin():
                        raise TrainingFailed(
                            f"trainer endpoint {self._url} redirected to another host "
                            f"({target.origin()}); not followed"
                        )
                    url = target
                    continue
                return resp.status, await self._read(resp)
        raise TrainingFailed(
            f"trainer endpoint {self._url} redirected more than {MAX_REDIRECTS} times"
        )

    async def _read(self, resp: aiohttp.ClientResponse) -> str:
        limit = self._max_bytes
        over = TrainingFailed(
            f"trainer endpoint {self._url} answered more than {limit} bytes "
            "(training.http_max_response_bytes)"
        )
        if resp.content_length is not None and resp.content_length > limit:
            raise over
        raw = await resp.content.read(limit + 1)
        if len(raw) > limit:
            raise over
        return raw.decode(resp.get_encoding() if resp.charset else "utf-8", errors="replace")


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
        return HttpHook(
            config.http_url,
            retries=config.http_retries,
            max_response_bytes=config.http_max_response_bytes,
        )
    return None
