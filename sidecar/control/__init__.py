"""Control: the directive channel to inference servers, reconciliation, adapters."""

from sidecar.control._channel import (
    ControlChannel,
    ControlServicer,
    ProbeStatus,
    ReplicaStatus,
    validate_desired,
)
from sidecar.control._plane import ControlPlane, DesiredState, RouteSpec, ShadowSpec

__all__ = [
    "ControlChannel",
    "ControlPlane",
    "ControlServicer",
    "DesiredState",
    "ProbeStatus",
    "ReplicaStatus",
    "RouteSpec",
    "ShadowSpec",
    "validate_desired",
]
