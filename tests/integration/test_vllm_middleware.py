"""The vLLM middleware in a real ASGI server (uvicorn) in front of a vLLM-shaped app.

The app answers like vLLM's OpenAI routes (``model`` picks the adapter; its
runtime LoRA routes load and unload); the real vLLM is ``make test-vllm``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvicorn
from atlas_sidecar_client import EventStream, Route, TrafficSplit
from atlas_sidecar_client.pb import events_pb2
from atlas_sidecar_client.vllm import AtlasMiddleware
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route as HttpRoute

from sidecar.app import SidecarApp
from sidecar.testing import free_port
from tests._helpers import logged, wait_until
from tests.conftest import make_config, target_of


def vllm_like() -> tuple[Starlette, dict[str, Any]]:
    seen: dict[str, Any] = {"models": [], "loaded": {"base"}}

    async def chat(request: Request) -> Any:
        body = await request.json()
        model = body["model"]
        seen["models"].append(model)
        if model not in seen["loaded"]:
            return JSONResponse({"error": {"message": f"model {model} does not exist"}}, 404)
        if body.get("stream"):

            async def gen() -> AsyncIterator[bytes]:
                for piece in ("from ", model):
                    d = {"choices": [{"index": 0, "delta": {"content": piece}}]}
                    yield b"data: " + json.dumps(d).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"

            return StreamingResponse(gen(), media_type="text/event-stream")
        msg = {"role": "assistant", "content": f"from {model}"}
        return JSONResponse({"choices": [{"index": 0, "message": msg, "finish_reason": "stop"}]})

    async def load(request: Request) -> Any:
        body = await request.json()
        seen["loaded"].add(body["lora_name"])
        return PlainTextResponse("Success")

    async def unload(request: Request) -> Any:
        body = await request.json()
        seen["loaded"].discard(body["lora_name"])
        return PlainTextResponse("Success")

    app = Starlette(
        routes=[
            HttpRoute("/v1/chat/completions", chat, methods=["POST"]),
            HttpRoute("/v1/load_lora_adapter", load, methods=["POST"]),
            HttpRoute("/v1/unload_lora_adapter", unload, methods=["POST"]),
        ]
    )
    return app, seen


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[SidecarApp, AtlasMiddleware, str, dict]]:
    daemon = SidecarApp(make_config(tmp_path / "data"))
    await daemon.start()
    app, seen = vllm_like()
    events = EventStream(target_of(daemon))
    mw = AtlasMiddleware(
        app, sidecar=target_of(daemon), server_id="vllm-0", base_model="base", events=events
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(mw, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    await wait_until(lambda: server.started, what="uvicorn serving")
    try:
        yield daemon, mw, f"http://127.0.0.1:{port}", seen
    finally:
        server.should_exit = True
        await task
        if mw.control is not None:
            await mw.control.stop()
        await events.aclose(5)
        await daemon.shutdown()


async def test_the_middleware_routes_records_and_takes_feedback(
    served: tuple[SidecarApp, AtlasMiddleware, str, dict],
) -> None:
    daemon, mw, url, seen = served
    body = {"model": "x", "messages": [{"role": "user", "content": "hello"}]}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            url + "/v1/chat/completions", json=body, headers={"x-request-id": "q1"}
        ) as r:
            assert r.status == 200
            assert r.headers["x-atlas-version"] == "base"
            assert (await r.json())["choices"][0]["message"]["content"] == "from base"
        # The sidecar's split arrives through the ControlLoop the middleware runs.
        await asyncio.wait_for(mw.control.wait_connected(), 20)  # type: ignore[union-attr]
        seen["loaded"].add("v2")
        mw.router.apply(
            TrafficSplit(revision=3, routes=(Route("v2", 10_000),), stable_version="base")
        )
        async with http.post(
            url + "/v1/chat/completions",
            json={**body, "stream": True},
            headers={"x-request-id": "q2"},
        ) as r:
            assert r.headers["x-atlas-version"] == "v2"
            raw = await r.read()
        assert raw.endswith(b"data: [DONE]\n\n")
        async with http.post(
            url + "/v1/feedback", json={"request_id": "q2", "signal": "COPY"}
        ) as r:
            assert r.status == 202
        async with http.post(url + "/v1/feedback", json={"request_id": "q2", "signal": "??"}) as r:
            assert r.status == 400
    assert seen["models"] == ["base", "v2"]
    await mw.events.aflush(10)
    rows = logged(daemon)
    infs = {
        e.inference.request_id: e.inference for e in rows if e.WhichOneof("payload") == "inference"
    }
    assert infs["q1"].response == "from base" and infs["q1"].prompt == "user: hello"
    assert infs["q2"].model_version == "v2" and infs["q2"].response == "from v2"
    assert infs["q2"].attributes["stream"] == "true"
    fbs = [e.feedback for e in rows if e.WhichOneof("payload") == "feedback"]
    assert [(f.request_id, f.signal) for f in fbs] == [("q2", events_pb2.COPY)]


async def test_the_sidecar_loads_adapters_through_vllms_own_routes(
    served: tuple[SidecarApp, AtlasMiddleware, str, dict],
) -> None:
    from sidecar.control._state import DesiredState, RouteSpec

    daemon, mw, url, seen = served
    async with (
        aiohttp.ClientSession() as http,
        http.post(url + "/v1/chat/completions", json={"model": "m", "messages": []}) as r,
    ):
        assert r.status == 200
    await asyncio.wait_for(mw.control.wait_connected(), 20)  # type: ignore[union-attr]
    await daemon.control.apply(
        DesiredState(
            revision=daemon.control.next_revision(),
            loaded=frozenset({"base", "v9"}),
            routes=(RouteSpec("base", 9000), RouteSpec("v9", 1000)),
            stable_version="base",
            artifacts={"v9": "file:///models/v9"},
        )
    )
    await wait_until(lambda: "v9" in seen["loaded"], what="LoadModel through vLLM's route")
    await wait_until(lambda: mw.router.revision > 0, what="the split installed")
    assert {r.version for r in mw.router.split.routes} == {"base", "v9"}  # type: ignore[union-attr]
