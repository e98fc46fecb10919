"""HTTP: /healthz, /api/*, /metrics, /dashboard."""

from sidecar.web._server import WebServer

__all__ = ["WebServer"]
