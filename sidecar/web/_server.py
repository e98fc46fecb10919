"""The HTTP side: /healthz, /api/status, /metrics, /api/report, /api/rollout, /dashboard."""

from __future__ import annotations

import json
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from atlas_sidecar_client.openai import MAX_FEEDBACK_BYTES

from sidecar.errors import PortInUseError

__all__ = ["STATIC_DIR", "WebServer"]

#: The dashboard's assets, shipped in the package (no CDN).
STATIC_DIR = Path(__file__).parent / "static"

_PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str, allow_nan=False)


class WebServer:
    """A small aiohttp server. Other stages add routes before :meth:`start`.

    ``metrics`` renders the Prometheus text exposition (``/metrics`` answers
    404 without it); ``report`` and ``rollout`` render ``/api/report`` and
    ``/api/rollout`` (503 naming what is missing without them).
    """

    def __init__(
        self,
        listen: str,
        status: Callable[[], dict[str, Any]] | None,
        *,
        metrics: Callable[[], bytes] | None = None,
        report: Callable[[], dict[str, Any]] | None = None,
        rollout: Callable[[], dict[str, Any]] | None = None,
        refresh_seconds: float = 5.0,
        feedback: Callable[[bytes], Awaitable[web.Response]] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        key: str = "server.http_listen",
    ) -> None:
        self._listen = listen
        self._ssl = ssl_context
        self._key = key
        self._status = status
        self._metrics = metrics
        self._report = report
        self._rollout = rollout
        self._refresh = refresh_seconds
        self._feedback = feedback
        self.app = web.Application()
        r = self.app.router
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        if status is None:  # metrics_only
            r.add_get("/metrics", self._metrics_handler)
            return
        r.add_get("/healthz", self._healthz)
        r.add_get("/api/status", self._api_status)
        r.add_get("/metrics", self._metrics_handler)
        r.add_get("/api/report", self._api_report)
        r.add_get("/api/rollout", self._api_rollout)
        r.add_get("/api/dashboard-config", self._api_dashboard_config)
        r.add_get("/dashboard", self._dashboard)
        r.add_post("/v1/feedback", self._feedback_handler)
        r.add_get("/", self._root)
        r.add_static("/static/", STATIC_DIR, follow_symlinks=False)

    @classmethod
    def metrics_only(
        cls,
        listen: str,
        metrics: Callable[[], bytes] | None,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> WebServer:
        """A listener serving /metrics and nothing else, open (server.metrics_listen)."""
        return cls(
            listen, None, metrics=metrics, ssl_context=ssl_context, key="server.metrics_listen"
        )

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _api_status(self, request: web.Request) -> web.Response:
        assert self._status is not None
        return web.json_response(self._status())

    async def _metrics_handler(self, request: web.Request) -> web.Response:
        if self._metrics is None:
            raise web.HTTPNotFound(text="metrics are off (telemetry.enabled: false)\n")
        body = self._metrics()
        return web.Response(body=body, headers={"Content-Type": _PROMETHEUS_TEXT})

    async def _api_report(self, request: web.Request) -> web.Response:
        if self._report is None:
            raise web.HTTPServiceUnavailable(text="the learning monitor is not running\n")
        return web.json_response(self._report(), dumps=_dumps)

    async def _api_rollout(self, request: web.Request) -> web.Response:
        if self._rollout is None:
            raise web.HTTPServiceUnavailable(text="the learning monitor is not running\n")
        return web.json_response(self._rollout(), dumps=_dumps)

    async def _feedback_handler(self, request: web.Request) -> web.Response:
        if self._feedback is None:
            raise web.HTTPNotFound(text="feedback is not taken here\n")
        return await self._feedback(await request.content.read(MAX_FEEDBACK_BYTES + 1))

    async def _api_dashboard_config(self, request: web.Request) -> web.Response:
        return web.json_response({"refresh_seconds": self._refresh})

    async def _dashboard(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "dashboard.html")

    async def _root(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/dashboard")

    async def start(self) -> None:
        if self._runner is not None:
            return
        host, _, port = self._listen.rpartition(":")
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        site = web.TCPSite(
            runner, host or "127.0.0.1", int(port), reuse_port=False, ssl_context=self._ssl
        )
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise PortInUseError(
                f"cannot listen for HTTP on {self._listen} ({self._key}): {exc.strerror}"
            ) from exc
        self._runner = runner
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else int(port)

    async def shutdown(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
