"""Logging and (later) OpenTelemetry setup."""

from sidecar.telemetry._logging import configure_logging

__all__ = ["configure_logging"]
