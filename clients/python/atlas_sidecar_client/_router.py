"""Router: which model version answers a request, and whether it is mirrored.

The rule is the same in every client library (DESIGN.md section 3; pinned by
``clients/testdata/routing_vectors.json``):

- key    = session_id or user_id or request_id (the first that is not empty)
- bucket = uint64_be(sha256(utf8(key))[0:8]) % 10000
- route  = the first route whose running sum of ``weight_bps`` exceeds the
  bucket; when the weights sum below the bucket, the split's stable version
  (or the first route when the split names no stable version)
- mirror = the shadow's ``mirror_bps`` > 0 and bucket < ``mirror_bps``

A sticky key keeps a session (or user) on one version for the whole split and
moves it only when the weights cross its bucket, so raising a canary from 5 %
to 10 % keeps the first 5 % where they were.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from atlas_sidecar_client._proto.atlas.sidecar.v1 import control_pb2

__all__ = ["Route", "RouteDecision", "Router", "TrafficSplit", "routing_bucket"]

BUCKETS = 10_000


def routing_bucket(key: str) -> int:
    """``uint64_be(sha256(utf8(key))[0:8]) % 10000``."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


@dataclass(frozen=True, slots=True)
class Route:
    version: str
    weight_bps: int


@dataclass(frozen=True, slots=True)
class TrafficSplit:
    """One traffic split, as the sidecar sent it (``SetTrafficSplit``).

    ``lease_seconds`` = 0 means the split never falls back on its own.
    """

    revision: int
    routes: tuple[Route, ...]
    stable_version: str = ""
    shadow_version: str = ""
    mirror_bps: int = 0
    lease_seconds: float = 0.0

    def __post_init__(self) -> None:
        for i, r in enumerate(self.routes):
            if r.weight_bps < 0:
                raise ValueError(f"routes[{i}].weight_bps must be >= 0, got {r.weight_bps}")
        if not 0 <= self.mirror_bps <= BUCKETS:
            raise ValueError(f"mirror_bps must be in 0..{BUCKETS}, got {self.mirror_bps}")
        if self.lease_seconds < 0:
            raise ValueError(f"lease_seconds must be >= 0, got {self.lease_seconds}")

    @property
    def fallback_version(self) -> str:
        """The version used when the weights do not cover a bucket, or the lease ran out."""
        if self.stable_version:
            return self.stable_version
        return self.routes[0].version if self.routes else ""

    @classmethod
    def single(cls, version: str, *, revision: int = 0) -> TrafficSplit:
        """All traffic to one version (what a server starts with)."""
        return cls(revision=revision, routes=(Route(version, BUCKETS),), stable_version=version)

    @classmethod
    def from_proto(cls, msg: control_pb2.SetTrafficSplit) -> TrafficSplit:
        has_shadow = msg.HasField("shadow")
        return cls(
            revision=msg.revision,
            routes=tuple(Route(r.version, r.weight_bps) for r in msg.routes),
            stable_version=msg.stable_version,
            shadow_version=msg.shadow.version if has_shadow else "",
            mirror_bps=msg.shadow.mirror_bps if has_shadow else 0,
            lease_seconds=float(msg.lease_seconds),
        )

    def to_proto(self) -> control_pb2.SetTrafficSplit:
        msg = control_pb2.SetTrafficSplit(
            revision=self.revision,
            routes=[
                control_pb2.Route(version=r.version, weight_bps=r.weight_bps) for r in self.routes
            ],
            lease_seconds=int(self.lease_seconds),
            stable_version=self.stable_version,
        )
        if self.shadow_version:
            msg.shadow.version = self.shadow_version
            msg.shadow.mirror_bps = self.mirror_bps
        return msg

    def versions(self) -> frozenset[str]:
        """Versions that can receive traffic (weight > 0, or a mirror share)."""
        out = {r.version for r in self.routes if r.weight_bps > 0}
        if self.shadow_version and self.mirror_bps > 0:
            out.add(self.shadow_version)
        return frozenset(out)


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where one request goes.

    ``mirror_version`` is empty when the request is not mirrored; otherwise
    the request should also be sent to that version, its answer recorded with
    role SHADOW under the same ``request_id`` (that is how the sidecar pairs
    it with the live answer; a server that must give it its own id puts the
    live request's id in the attribute ``mirror_of``) and never shown to the
    user. ``fallback`` is True when the
    lease ran out and the stable version was chosen for that reason.
    """

    version: str
    bucket: int
    mirror_version: str = ""
    fallback: bool = False

    @property
    def mirror(self) -> bool:
        return bool(self.mirror_version)


def _decide(split: TrafficSplit, bucket: int) -> tuple[str, str]:
    total = 0
    version = split.fallback_version
    for r in split.routes:
        total += r.weight_bps
        if total > bucket:
            version = r.version
            break
    mirror = ""
    if split.shadow_version and split.mirror_bps > 0 and bucket < split.mirror_bps:
        mirror = split.shadow_version
    return version, mirror


class Router:
    """Chooses a model version per request from the current traffic split.

    Thread-safe and lock-free on the hot path: ``route`` reads one immutable
    split. ``apply`` ignores a split whose revision is older than the one held
    (splits are idempotent by revision).

    Lease: while the sidecar is connected the split holds. After
    :meth:`sidecar_lost`, once ``lease_seconds`` have passed without
    :meth:`sidecar_connected`, every request goes to the split's stable
    version and nothing is mirrored, until the sidecar is back.
    ``ControlLoop`` calls both for you.
    """

    def __init__(
        self,
        split: TrafficSplit | None = None,
        *,
        default_version: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._split = split
        self._default = default_version
        self._clock = clock
        self._lost_at: float | None = None
        self._lock = threading.Lock()
        self.fallbacks = 0

    # -- the split ---------------------------------------------------------

    @property
    def split(self) -> TrafficSplit | None:
        return self._split

    @property
    def revision(self) -> int:
        split = self._split
        return split.revision if split is not None else 0

    def apply(self, split: TrafficSplit | control_pb2.SetTrafficSplit) -> bool:
        """Installs ``split`` unless an equal or newer revision is held.

        Returns True when the split was installed.
        """
        if isinstance(split, control_pb2.SetTrafficSplit):
            split = TrafficSplit.from_proto(split)
        with self._lock:
            current = self._split
            if current is not None and split.revision <= current.revision and current.revision:
                return False
            self._split = split
            return True

    # -- the lease ---------------------------------------------------------

    def sidecar_connected(self) -> None:
        self._lost_at = None

    def sidecar_lost(self, at: float | None = None) -> None:
        """Starts the lease clock (a second call keeps the first time)."""
        if self._lost_at is None:
            self._lost_at = self._clock() if at is None else at

    @property
    def lease_expired(self) -> bool:
        split = self._split
        lost = self._lost_at
        if split is None or lost is None or split.lease_seconds <= 0:
            return False
        return self._clock() - lost > split.lease_seconds

    # -- the hot path ------------------------------------------------------

    def route(
        self, request_id: str = "", *, session_id: str = "", user_id: str = ""
    ) -> RouteDecision:
        """Chooses the version for one request (sticky on session, then user, then request id)."""
        key = session_id or user_id or request_id
        bucket = routing_bucket(key)
        split = self._split
        if split is None:
            return RouteDecision(self._default, bucket)
        if self._lost_at is not None and self.lease_expired:
            self.fallbacks += 1
            return RouteDecision(split.fallback_version, bucket, fallback=True)
        version, mirror = _decide(split, bucket)
        return RouteDecision(version, bucket, mirror)
