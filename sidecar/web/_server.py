"""The HTTP side: /healthz and /api/status (metrics and the dashboard mount here too)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from sidecar.errors import PortInUseError

__all__ = ["WebServer"]


class WebServer:
    """A small aiohttp server. Other stages add routes before :meth:`start`."""

    def __init__(self, listen: str, status: Callable[[], dict[str, Any]]) -> None:
        self._listen = listen
        self._status = status
        self.app = web.Application()
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/api/status", self._api_status)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _api_status(self, request: web.Request) -> web.Response:
        return web.json_response(self._status())

    async def start(self) -> None:
        if self._runner is not None:
            return
        host, _, port = self._listen.rpartition(":")
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host or "127.0.0.1", int(port), reuse_port=False)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise PortInUseError(
                f"cannot listen for HTTP on {self._listen} (server.http_listen): {exc.strerror}"
            ) from exc
        self._runner = runner
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else int(port)

    async def shutdown(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
