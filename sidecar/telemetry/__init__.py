"""Telemetry: OpenTelemetry setup, the instruments every stage uses, the
per-version traffic view and the learning report.

``sidecar.telemetry.instruments`` depends on nothing else in the daemon, so
any stage (the store included) can import it; the stage classes here are
imported on first use for the same reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sidecar.telemetry._logging import configure_logging

if TYPE_CHECKING:
    from sidecar.telemetry._report import LearningMonitor
    from sidecar.telemetry._setup import Telemetry
    from sidecar.telemetry._traffic import TrafficView

__all__ = ["LearningMonitor", "Telemetry", "TrafficView", "configure_logging"]

_LAZY = {
    "LearningMonitor": "sidecar.telemetry._report",
    "Telemetry": "sidecar.telemetry._setup",
    "TrafficView": "sidecar.telemetry._traffic",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
