"""The stored shape of one rollout, and its conversion to the admin contract."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from atlas_sidecar_client.pb import admin_pb2
from google.protobuf.timestamp_pb2 import Timestamp

__all__ = ["ACTIVE_STATES", "TERMINAL_STATES", "RolloutRecord", "Transition"]

#: States a rollout is in progress in (the learning scheduler waits for them).
ACTIVE_STATES = frozenset({"PENDING", "VALIDATING", "SHADOW", "CANARY", "BLUE_GREEN", "PAUSED"})
TERMINAL_STATES = frozenset({"PROMOTED", "ROLLED_BACK", "ABORTED"})

_STATE_ENUM = {
    "PENDING": admin_pb2.ROLLOUT_STATE_PENDING,
    "VALIDATING": admin_pb2.ROLLOUT_STATE_VALIDATING,
    "SHADOW": admin_pb2.ROLLOUT_STATE_SHADOW,
    "CANARY": admin_pb2.ROLLOUT_STATE_CANARY,
    "BLUE_GREEN": admin_pb2.ROLLOUT_STATE_BLUE_GREEN,
    "PROMOTED": admin_pb2.ROLLOUT_STATE_PROMOTED,
    "ROLLED_BACK": admin_pb2.ROLLOUT_STATE_ROLLED_BACK,
    "ABORTED": admin_pb2.ROLLOUT_STATE_ABORTED,
    "PAUSED": admin_pb2.ROLLOUT_STATE_PAUSED,
}


def _ts(ms: int) -> Timestamp:
    t = Timestamp()
    t.FromMilliseconds(ms)
    return t


@dataclass(slots=True)
class Transition:
    from_state: str
    to_state: str
    stage_index: int
    at_ms: int
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class RolloutRecord:
    """Everything needed to resume a rollout after a restart.

    ``revision`` is the last traffic-split revision this rollout asked the
    control plane for; ``applied_revision`` the last one the control plane
    accepted. ``phase`` is the step inside a state (``load``, ``probe``...).
    """

    rollout_id: str
    candidate: str
    stable: str
    strategy: str
    state: str
    started_ms: int
    updated_ms: int
    state_started_ms: int
    stage_index: int = 0
    weight_bps: int = 0
    stage_started_ms: int = 0
    phase: str = ""
    phase_started_ms: int = 0
    artifact_uri: str = ""
    update_id: str = ""
    revision: int = 0
    applied_revision: int = 0
    cursor: int = 0
    analysis: dict[str, Any] = field(default_factory=dict)
    shadow: dict[str, Any] = field(default_factory=dict)
    probes: dict[str, str] = field(default_factory=dict)
    paused_from: str = ""
    hooks_pending: list[str] = field(default_factory=list)
    #: W3C traceparent current when the rollout started (the training run, for
    #: an automatic rollout): every transition's span continues it.
    traceparent: str = ""
    unload_version: str = ""
    unload_at_ms: int = 0
    transitions: list[Transition] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def to_json(self) -> bytes:
        doc = {name: getattr(self, name) for name in self.__slots__}
        doc["transitions"] = [asdict(t) for t in self.transitions]
        return json.dumps(doc, sort_keys=True, default=str).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> RolloutRecord:
        doc = json.loads(raw)
        doc["transitions"] = [Transition(**t) for t in doc.get("transitions", [])]
        return cls(**doc)

    def to_proto(self) -> admin_pb2.Rollout:
        return admin_pb2.Rollout(
            rollout_id=self.rollout_id,
            candidate_version=self.candidate,
            stable_version=self.stable,
            strategy=(
                admin_pb2.ROLLOUT_STRATEGY_BLUE_GREEN
                if self.strategy == "blue_green"
                else admin_pb2.ROLLOUT_STRATEGY_CANARY
            ),
            state=_STATE_ENUM[self.state],
            stage_index=self.stage_index,
            candidate_weight_bps=self.weight_bps,
            started_at=_ts(self.started_ms),
            updated_at=_ts(self.updated_ms),
            transitions=[
                admin_pb2.Transition(
                    from_state=_STATE_ENUM.get(t.from_state, admin_pb2.ROLLOUT_STATE_UNSPECIFIED),
                    to_state=_STATE_ENUM[t.to_state],
                    stage_index=t.stage_index,
                    at=_ts(t.at_ms),
                    reason=t.reason,
                    evidence_json=json.dumps(t.evidence, sort_keys=True, default=str),
                )
                for t in self.transitions
            ],
        )


def state_name(value: int) -> str:
    """``RolloutState`` value -> its short name (``CANARY``), for people and JSON."""
    try:
        return admin_pb2.RolloutState.Name(value).removeprefix("ROLLOUT_STATE_")  # type: ignore[arg-type]
    except ValueError:
        return str(value)
