"""The middleware inside a real vLLM (CPU): ``vllm serve ... --middleware
atlas_sidecar_client.vllm.AtlasMiddleware`` with ``ATLAS_SIDECAR_ADDR`` at a real
daemon in the test.

A request is routed and recorded in the daemon under its request id (vLLM uses
the same id for its completion), ``/v1/feedback`` on vLLM's port reaches the
daemon, and the sidecar loads an adapter through vLLM's own runtime LoRA routes
and moves sessions to it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from atlas_sidecar_client.pb import events_pb2

from sidecar.app import SidecarApp
from sidecar.control._plane import DesiredState, RouteSpec
from sidecar.testing import VllmServeProcess, free_port
from tests._helpers import control_app, logged, wait_until
from tests.vllm.conftest import sse_text

PROMPT = "Name a colour."
SERVER_ID = "vllm-mw"


@pytest.fixture(scope="module")
def daemon_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory, daemon_port: int) -> Iterator[VllmServeProcess]:
    server = VllmServeProcess(
        tmp_path_factory.mktemp("vllm-mw"),
        middleware=["atlas_sidecar_client.vllm.AtlasMiddleware"],
        env={
            "ATLAS_SIDECAR_ADDR": f"127.0.0.1:{daemon_port}",
            "ATLAS_SIDECAR_SERVER_ID": SERVER_ID,
            "ATLAS_SIDECAR_BASE_MODEL": "base",
        },
    )
    with server:
        print(f"\nvLLM (with the middleware) ready in {server.start_seconds:.1f} s")
        yield server


@pytest.fixture
async def daemon(
    tmp_path: Path, vllm: VllmServeProcess, daemon_port: int
) -> AsyncIterator[SidecarApp]:
    # On the port vLLM's middleware dials; a new daemon per test, the same port.
    app = control_app(tmp_path / "data", daemon_port)
    await app.start()
    try:
        yield app
    finally:
        await app.shutdown()
        vllm.unload_adapters()


def _body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "base",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 16,
        "temperature": 0,
        **extra,
    }


def _rows(app: SidecarApp, kind: str) -> list[Any]:
    return [getattr(e, kind) for e in logged(app) if e.WhichOneof("payload") == kind]


async def test_a_request_is_routed_recorded_under_its_id_and_feedback_reaches_the_daemon(
    daemon: SidecarApp, vllm: VllmServeProcess
) -> None:
    url = vllm.url
    async with aiohttp.ClientSession() as http:
        async with http.post(
            url + "/v1/chat/completions",
            json=_body(),
            headers={"x-request-id": "mw-1", "x-session-id": "s-1"},
        ) as r:
            assert r.status == 200, await r.text()
            assert r.headers["x-request-id"] == "mw-1"
            assert r.headers["x-atlas-version"] == "base"
            doc = await r.json()
        whole = doc["choices"][0]["message"]["content"]
        assert whole and "mw-1" in doc["id"]
        async with http.post(
            url + "/v1/chat/completions",
            json=_body(stream=True),
            headers={"x-request-id": "mw-2", "x-session-id": "s-1"},
        ) as r:
            assert r.status == 200 and r.headers["x-request-id"] == "mw-2"
            raw = await r.read()
        assert raw.rstrip().endswith(b"data: [DONE]") and sse_text(raw) == whole
        async with http.post(
            url + "/v1/feedback", json={"request_id": "mw-1", "signal": "THUMBS_UP"}
        ) as r:
            assert r.status == 202
        async with http.post(url + "/v1/feedback", json={"request_id": "mw-1"}) as r:
            assert r.status == 400  # no signal, rating, correction or dwell
        # vLLM's own routes still answer through the middleware.
        async with http.get(url + "/v1/models") as r:
            assert r.status == 200 and (await r.json())["data"][0]["id"] == "base"

    def recorded() -> bool:
        ids = {i.request_id for i in _rows(daemon, "inference")}
        return {"mw-1", "mw-2"} <= ids and bool(_rows(daemon, "feedback"))

    await wait_until(recorded, timeout=60, what="the middleware's events in the daemon")
    infs = {i.request_id: i for i in _rows(daemon, "inference")}
    assert infs["mw-1"].model_version == "base" and infs["mw-1"].response == whole
    assert infs["mw-1"].prompt == f"user: {PROMPT}" and infs["mw-1"].session_id == "s-1"
    assert infs["mw-1"].attributes["capture"] == "vllm-middleware"
    assert infs["mw-2"].response == whole and infs["mw-2"].attributes["stream"] == "true"
    fbs = _rows(daemon, "feedback")
    assert [(f.request_id, f.signal) for f in fbs] == [("mw-1", events_pb2.THUMBS_UP)]
    # The middleware's control loop said Hello from inside vLLM.
    await wait_until(lambda: daemon.control.connected_servers() == 1, what="the Hello")
    assert [r.server_id for r in daemon.control.replicas()] == [SERVER_ID]


async def test_the_sidecar_loads_an_adapter_through_vllms_routes_and_moves_sessions_to_it(
    daemon: SidecarApp, vllm: VllmServeProcess, adapters: dict[str, Path]
) -> None:
    url = vllm.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json=_body()) as r:
            assert r.status == 200 and r.headers["x-atlas-version"] == "base"
            base = (await r.json())["choices"][0]["message"]["content"]
        await wait_until(
            lambda: daemon.control.connected_servers() == 1, timeout=60, what="the Hello"
        )
        d = DesiredState(
            revision=daemon.control.next_revision(),
            loaded=frozenset({"base", "v1"}),
            routes=(RouteSpec("v1", 10_000),),
            stable_version="base",
            artifacts={"v1": f"file://{adapters['a']}"},
        )
        await daemon.control.apply(d)
        await wait_until(
            lambda: daemon.control.converged(d.revision), timeout=180, what="v1 loaded and routed"
        )
        assert vllm.models()["v1"] == str(adapters["a"])
        async with http.post(
            url, json=_body(), headers={"x-request-id": "mw-v1", "x-session-id": "s-2"}
        ) as r:
            assert r.status == 200 and r.headers["x-atlas-version"] == "v1"
            doc = await r.json()
        assert doc["model"] == "v1"
        assert doc["choices"][0]["message"]["content"] != base
        # Rolled back: the split goes to base first, then v1 is unloaded from vLLM.
        back = DesiredState(
            revision=daemon.control.next_revision(),
            loaded=frozenset({"base"}),
            routes=(RouteSpec("base", 10_000),),
            stable_version="base",
        )
        await daemon.control.apply(back)
        await wait_until(
            lambda: (
                daemon.control.converged(back.revision)
                and "v1" not in daemon.control.replicas()[0].loaded
            ),
            timeout=180,
            what="v1 unloaded",
        )
        assert set(vllm.models()) == {"base"}
        async with http.post(url, json=_body(), headers={"x-session-id": "s-2"}) as r:
            assert r.status == 200 and r.headers["x-atlas-version"] == "base"
            assert (await r.json())["choices"][0]["message"]["content"] == base

    def recorded() -> bool:
        return any(i.request_id == "mw-v1" for i in _rows(daemon, "inference"))

    await wait_until(recorded, timeout=60, what="the v1 answer in the daemon")
    row = next(i for i in _rows(daemon, "inference") if i.request_id == "mw-v1")
    assert row.model_version == "v1" and row.response == doc["choices"][0]["message"]["content"]
