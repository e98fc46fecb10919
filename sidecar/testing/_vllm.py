"""A small HTTP server with vLLM's runtime LoRA routes, for adapter tests.

It answers the way vLLM documents: 200 with a text body on success; 400
(missing field, already loaded), 404 (unknown adapter) and 500 with
``{"error": {"message", "type", "param", "code"}}``. ``fail_next`` makes the
next load or unload answer 500.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["FakeVllmServer"]


def _error(status: int, kind: str, message: str) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.json_response(body, status=status)


@dataclass
class FakeVllmServer:
    """``await server.start()`` binds 127.0.0.1 on a free port; ``url`` is its base URL."""

    base_model: str = "base"
    adapters: dict[str, str] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    fail_next: int = 0
    _runner: web.AppRunner | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/load_lora_adapter", self._load)
        app.router.add_post("/v1/unload_lora_adapter", self._unload)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]

    async def shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _body(self, request: web.Request, route: str) -> dict[str, Any] | web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "BadRequestError", "the body is not JSON")
        self.requests.append((route, body))
        if self.fail_next > 0:
            self.fail_next -= 1
            return _error(500, "InternalServerError", "CUDA out of memory")
        return dict(body)

    async def _load(self, request: web.Request) -> web.Response:
        body = await self._body(request, "load")
        if isinstance(body, web.Response):
            return body
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return _error(
                400, "BadRequestError", "Both 'lora_name' and 'lora_path' must be provided."
            )
        if name in self.adapters and body.get("load_inplace") is True:
            self.adapters[name] = path
            return web.Response(text=f"Success: LoRA adapter '{name}' replaced in place.")
        if name in self.adapters:
            return _error(
                400, "BadRequestError", f"The lora adapter '{name}' has already been loaded."
            )
        self.adapters[name] = path
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload(self, request: web.Request) -> web.Response:
        body = await self._body(request, "unload")
        if isinstance(body, web.Response):
            return body
        name = body.get("lora_name")
        if not name:
            return _error(
                400, "BadRequestError", "'lora_name' needs to be provided to unload a LoRA adapter."
            )
        if name not in self.adapters:
            return _error(404, "NotFoundError", f"The lora adapter '{name}' cannot be found.")
        del self.adapters[name]
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def _models(self, request: web.Request) -> web.Response:
        data = [{"id": self.base_model, "object": "model", "parent": None, "root": self.base_model}]
        data += [
            {"id": name, "object": "model", "parent": self.base_model, "root": path}
            for name, path in sorted(self.adapters.items())
        ]
        return web.json_response({"object": "list", "data": data})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)
