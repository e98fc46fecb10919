"""An in-memory control plane for unit tests of the rollout engine (and users' tests)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from sidecar.control import DesiredState, validate_desired

__all__ = ["FakeControlPlane", "SentProbe"]


@dataclass(slots=True)
class SentProbe:
    version: str
    probe_id: str
    prompts: list[str]


@dataclass
class FakeControlPlane:
    """Records what the engine asks for; every server applies at once unless told not to.

    ``converge=False`` models inference servers that never apply (silent);
    ``applied_at`` holds ``time.perf_counter()`` of each ``apply`` call.
    """

    converge: bool = True
    servers: int = 1
    history: list[DesiredState] = field(default_factory=list)
    applied_at: list[float] = field(default_factory=list)
    probes: list[SentProbe] = field(default_factory=list)
    _desired: DesiredState | None = None

    async def apply(self, desired: DesiredState) -> None:
        validate_desired(desired)
        if self._desired is not None and desired.revision <= self._desired.revision:
            raise ValueError(f"revision {desired.revision} is not above {self._desired.revision}")
        self._desired = desired
        self.history.append(desired)
        self.applied_at.append(time.perf_counter())

    def desired(self) -> DesiredState | None:
        return self._desired

    async def run_probe(self, version: str, prompts: Sequence[str]) -> str:
        probe_id = f"probe-{len(self.probes) + 1}"
        self.probes.append(SentProbe(version, probe_id, list(prompts)))
        return probe_id

    def converged(self, revision: int) -> bool:
        return self.converge and self._desired is not None and self._desired.revision >= revision

    def connected_servers(self) -> int:
        return self.servers

    def weight_bps(self, version: str) -> int:
        """The current split's weight of ``version`` (0 when absent)."""
        if self._desired is None:
            return 0
        return sum(r.weight_bps for r in self._desired.routes if r.version == version)
