"""Control: the directive channel to inference servers, reconciliation, adapters."""

from sidecar.control._plane import ControlPlane, DesiredState, RouteSpec, ShadowSpec

__all__ = ["ControlPlane", "DesiredState", "RouteSpec", "ShadowSpec"]
