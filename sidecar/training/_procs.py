"""The trainer's process, as recorded in the store while it runs.

A pid alone names a process only while it lives; after a restart it may
belong to anything. So a run is recorded as (pid, start time in clock ticks
since boot, from ``/proc/<pid>/stat``), and a process is taken for the
recorded one only when both match.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass

__all__ = ["RunningTrainer", "alive", "kill_group", "process_start_ticks"]


@dataclass(frozen=True, slots=True)
class RunningTrainer:
    """A trainer's process group: its leader's pid (= the group id) and start time."""

    update_id: str
    pid: int
    start_ticks: int

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> RunningTrainer | None:
        try:
            doc = json.loads(raw)
            return cls(str(doc["update_id"]), int(doc["pid"]), int(doc["start_ticks"]))
        except (ValueError, KeyError, TypeError):
            return None


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    # the command name is in parentheses and may hold spaces or ')'
    return raw[raw.rfind(")") + 2 :].split()


def process_start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot); None when it does not exist."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    return int(fields[19])  # field 22 of proc(5), counting from the state (field 3)


def alive(run: RunningTrainer) -> bool:
    """Whether the recorded process still runs (a zombie does not count)."""
    fields = _stat_fields(run.pid)
    if fields is None or len(fields) < 20 or fields[0] in ("Z", "X"):
        return False
    return int(fields[19]) == run.start_ticks


def kill_group(run: RunningTrainer, *, wait_seconds: float = 10.0) -> bool:
    """SIGKILLs the recorded trainer's process group if its leader is still
    the recorded process; True when it was (and it is gone now)."""
    if not alive(run):
        return False
    try:
        os.killpg(run.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    deadline = time.monotonic() + wait_seconds
    while alive(run) and time.monotonic() < deadline:
        time.sleep(0.02)
    return True
