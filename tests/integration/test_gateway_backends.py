"""How each backend names a version in the body, and its adapter's admin calls over real HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sidecar.config import GatewayConfig
from sidecar.control.adapters import AdapterError
from sidecar.gateway import make_backend


def _body(backend: str, version: str, **cfg: Any) -> dict[str, Any]:
    b = make_backend(GatewayConfig(upstream="http://x", backend=backend, **cfg))  # type: ignore[arg-type]
    body: dict[str, Any] = {"model": "whatever", "messages": []}
    b.rewrite(body, version)
    return body


def test_each_backend_puts_the_version_where_its_server_reads_it() -> None:
    for backend in ("openai", "vllm", "lorax", "llama-router"):
        assert _body(backend, "v2")["model"] == "v2"
    assert _body("sglang", "v2", base_model="Qwen")["model"] == "Qwen:v2"
    assert _body("sglang", "Qwen", base_model="Qwen")["model"] == "Qwen"
    # llama-server single mode: always the whole list, the version's adapter at 1
    lora = _body("llama-lora", "b", versions=["a", "b", "c"])["lora"]
    assert lora == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}, {"id": 2, "scale": 0.0}]
    base = _body("llama-lora", "base", versions=["a", "b"], base_model="base")["lora"]
    assert [x["scale"] for x in base] == [0.0, 0.0]


class Admin:
    """Records admin calls; answers the way SGLang and LoRAX document."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail = False
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        for path in ("/load_lora_adapter", "/unload_lora_adapter", "/generate"):
            app.router.add_post(path, self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append((request.path, body))
        if self.fail:
            return web.json_response({"success": False, "message": "bad adapter"}, status=400)
        return web.json_response({"success": True, "message": "ok"})


@pytest.fixture
async def admin() -> AsyncIterator[Admin]:
    a = Admin()
    await a.start()
    yield a
    assert a.runner is not None
    await a.runner.cleanup()


async def test_sglang_adapter_loads_without_the_v1_prefix(admin: Admin) -> None:
    b = make_backend(GatewayConfig(upstream=admin.url, backend="sglang", base_model="Qwen"))
    adapter = b.adapter()
    assert adapter is not None
    try:
        assert await adapter.loaded() == {"Qwen"}
        await adapter.load("v2", "file:///models/v2")
        assert admin.calls[-1] == (
            "/load_lora_adapter",
            {"lora_name": "v2", "lora_path": "/models/v2"},
        )
        assert await adapter.loaded() == {"Qwen", "v2"}
        await adapter.unload("v2")
        assert await adapter.loaded() == {"Qwen"}
        admin.fail = True
        with pytest.raises(AdapterError, match="SGLang load 'v3'"):
            await adapter.load("v3", "/models/v3")
    finally:
        await adapter.close()


async def test_lorax_adapter_validates_and_warms_with_one_token(admin: Admin) -> None:
    adapter = make_backend(GatewayConfig(upstream=admin.url, backend="lorax")).adapter()
    assert adapter is not None
    try:
        await adapter.load("v2", "file:///models/v2")
        path, body = admin.calls[-1]
        assert path == "/generate"
        assert body["parameters"] == {"adapter_id": "/models/v2", "max_new_tokens": 1}
        assert await adapter.loaded() == {"v2"}
        admin.fail = True
        with pytest.raises(AdapterError, match="LoRAX load"):
            await adapter.load("v3", "/models/v3")
    finally:
        await adapter.close()


async def test_llama_single_mode_says_a_new_adapter_needs_a_restart(tmp_path: Path) -> None:
    adapter = make_backend(
        GatewayConfig(upstream="http://x", backend="llama-lora", versions=["a", "b"])
    ).adapter()
    assert adapter is not None
    assert await adapter.loaded() == {"a", "b"}
    await adapter.load("a", "")  # already there
    with pytest.raises(AdapterError, match="restart it with the adapter in --lora"):
        await adapter.load("c", "/models/c.gguf")
