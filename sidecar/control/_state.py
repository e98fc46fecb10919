"""The control channel's stored state: desired state, replicas, probes.

Layout:
- ``meta: control/desired`` -> JSON of the :class:`DesiredState`.
- ``directives: replica/<server_id>`` -> JSON of one replica: what it reported
  (loaded versions, split revision, capabilities) and its outbox of
  unacknowledged directives (serialized ``Directive`` messages, in order).
- ``directives: probe/<probe_id>`` -> JSON of one probe request and its state.

Everything here is plain data; the writer thread only serializes it.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from atlas_sidecar_client.pb import control_pb2

from sidecar.control._plane import DesiredState, RouteSpec, ShadowSpec

__all__ = [
    "DESIRED_KEY",
    "PROBE_PREFIX",
    "REPLICA_PREFIX",
    "Pending",
    "ProbeRecord",
    "Replica",
    "desired_from_json",
    "desired_to_json",
    "split_versions",
]

DESIRED_KEY = b"control/desired"
REPLICA_PREFIX = b"replica/"
PROBE_PREFIX = b"probe/"


def desired_to_json(d: DesiredState) -> bytes:
    doc = {
        "revision": d.revision,
        "loaded": sorted(d.loaded),
        "routes": [[r.version, r.weight_bps] for r in d.routes],
        "stable_version": d.stable_version,
        "shadow": [d.shadow.version, d.shadow.mirror_bps] if d.shadow else None,
        "lease_seconds": d.lease_seconds,
        "artifacts": dict(sorted(d.artifacts.items())),
    }
    return json.dumps(doc, sort_keys=True).encode()


def desired_from_json(raw: bytes) -> DesiredState:
    doc = json.loads(raw)
    shadow = doc.get("shadow")
    return DesiredState(
        revision=int(doc["revision"]),
        loaded=frozenset(doc["loaded"]),
        routes=tuple(RouteSpec(v, int(w)) for v, w in doc["routes"]),
        stable_version=doc["stable_version"],
        shadow=ShadowSpec(shadow[0], int(shadow[1])) if shadow else None,
        lease_seconds=int(doc["lease_seconds"]),
        artifacts=dict(doc.get("artifacts") or {}),
    )


def split_versions(d: DesiredState) -> frozenset[str]:
    """Versions that receive traffic under ``d`` (must be loaded first)."""
    out = {r.version for r in d.routes if r.weight_bps > 0}
    if d.shadow is not None and d.shadow.mirror_bps > 0:
        out.add(d.shadow.version)
    return frozenset(out)


@dataclass
class Pending:
    """One directive sent (or to be sent) and not yet acknowledged."""

    directive: control_pb2.Directive
    #: load | unload | split | probe
    kind: str
    #: version (load, unload), revision (split) or probe_id (probe).
    key: str
    attempts: int = 0
    retry_at_ms: int = 0
    last_error: str = ""
    #: Sent on the current stream and not yet answered (not stored).
    in_flight: bool = False

    @property
    def directive_id(self) -> str:
        return self.directive.directive_id

    def to_doc(self) -> dict[str, Any]:
        return {
            "data": base64.b64encode(self.directive.SerializeToString()).decode(),
            "kind": self.kind,
            "key": self.key,
            "attempts": self.attempts,
            "retry_at_ms": self.retry_at_ms,
            "last_error": self.last_error,
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Pending:
        d = control_pb2.Directive.FromString(base64.b64decode(doc["data"]))
        return cls(
            directive=d,
            kind=doc["kind"],
            key=doc["key"],
            attempts=int(doc.get("attempts", 0)),
            retry_at_ms=int(doc.get("retry_at_ms", 0)),
            last_error=doc.get("last_error", ""),
        )


@dataclass
class Replica:
    """One inference-server replica, by ``server_id``."""

    server_id: str
    loaded: set[str] = field(default_factory=set)
    split_revision: int = 0
    capabilities: frozenset[str] = frozenset()
    #: directive_id -> Pending, in the order they must be sent.
    pending: dict[str, Pending] = field(default_factory=dict)
    last_seen_ms: int = 0
    applied: int = 0
    failed: int = 0
    last_error: str = ""

    @property
    def key(self) -> bytes:
        return REPLICA_PREFIX + self.server_id.encode()

    def pending_of(self, kind: str, key: str | None = None) -> Pending | None:
        for p in self.pending.values():
            if p.kind == kind and (key is None or p.key == key):
                return p
        return None

    def to_json(self) -> bytes:
        doc = {
            "server_id": self.server_id,
            "loaded": sorted(self.loaded),
            "split_revision": self.split_revision,
            "capabilities": sorted(self.capabilities),
            "pending": [p.to_doc() for p in self.pending.values()],
            "last_seen_ms": self.last_seen_ms,
            "applied": self.applied,
            "failed": self.failed,
            "last_error": self.last_error,
        }
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Replica:
        doc = json.loads(raw)
        pending = [Pending.from_doc(p) for p in doc.get("pending", [])]
        return cls(
            server_id=doc["server_id"],
            loaded=set(doc.get("loaded", [])),
            split_revision=int(doc.get("split_revision", 0)),
            capabilities=frozenset(doc.get("capabilities", [])),
            pending={p.directive_id: p for p in pending},
            last_seen_ms=int(doc.get("last_seen_ms", 0)),
            applied=int(doc.get("applied", 0)),
            failed=int(doc.get("failed", 0)),
            last_error=doc.get("last_error", ""),
        )


@dataclass
class ProbeRecord:
    """A ``RunProbe`` request: queued, sent to one replica, then done or failed."""

    probe_id: str
    version: str
    prompts: list[str]
    created_ms: int
    #: queued (no replica yet) | sent | done
    state: str = "queued"
    server_id: str = ""
    ok: bool = False
    error: str = ""
    done_ms: int = 0

    @property
    def key(self) -> bytes:
        return PROBE_PREFIX + self.probe_id.encode()

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "probe_id": self.probe_id,
                "version": self.version,
                "prompts": self.prompts,
                "created_ms": self.created_ms,
                "state": self.state,
                "server_id": self.server_id,
                "ok": self.ok,
                "error": self.error,
                "done_ms": self.done_ms,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ProbeRecord:
        doc = json.loads(raw)
        return cls(
            probe_id=doc["probe_id"],
            version=doc["version"],
            prompts=list(doc["prompts"]),
            created_ms=int(doc["created_ms"]),
            state=doc.get("state", "queued"),
            server_id=doc.get("server_id", ""),
            ok=bool(doc.get("ok", False)),
            error=doc.get("error", ""),
            done_ms=int(doc.get("done_ms", 0)),
        )
