"""The seam between the rollout engine and the control channel.

The rollout engine says what it wants (which versions are loaded, which
traffic split applies) and asks for probes; the control channel owns the
desired state durably, reconciles every connected inference server to it
and reports progress. Probe answers come back through the event log as
``Inference`` events with role PROBE and attributes ``probe_id`` and
``probe_index``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["ControlPlane", "DesiredState", "RouteSpec", "ShadowSpec"]


@dataclass(frozen=True, slots=True)
class RouteSpec:
    version: str
    weight_bps: int


@dataclass(frozen=True, slots=True)
class ShadowSpec:
    version: str
    mirror_bps: int


@dataclass(frozen=True, slots=True)
class DesiredState:
    """What every inference server should have. ``revision`` grows monotonically."""

    revision: int
    loaded: frozenset[str]
    routes: tuple[RouteSpec, ...]
    stable_version: str
    shadow: ShadowSpec | None = None
    lease_seconds: int = 30
    #: version -> artifact_uri, for LoadModel.
    artifacts: dict[str, str] = field(default_factory=dict)


class ControlPlane(Protocol):
    """What the rollout engine needs of the control channel."""

    async def apply(self, desired: DesiredState) -> None:
        """Stores ``desired`` durably and starts reconciling every server to it."""
        ...

    def desired(self) -> DesiredState | None: ...

    async def run_probe(self, version: str, prompts: Sequence[str]) -> str:
        """Sends RunProbe to one connected server; returns the probe_id."""
        ...

    def converged(self, revision: int) -> bool:
        """True when every connected server has applied ``revision``."""
        ...

    def connected_servers(self) -> int: ...
