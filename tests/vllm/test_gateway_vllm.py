"""The gateway (``--backend vllm``) in front of a real vLLM (CPU) and a real daemon.

The sidecar's desired state loads adapter v1 through the gateway's adapter
(vLLM's runtime LoRA API) and splits sessions between the base model and v1;
streamed and whole answers are recorded with their request ids; a version name
reused with a new artifact is swapped in place (``load_inplace``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from atlas_sidecar_client import Router
from atlas_sidecar_client.pb import events_pb2

from sidecar.app import SidecarApp
from sidecar.config import GatewayConfig
from sidecar.control._plane import DesiredState, RouteSpec
from sidecar.gateway import Gateway
from sidecar.testing import VllmServeProcess, free_port
from tests._helpers import logged, wait_until
from tests.conftest import make_config, target_of
from tests.vllm.conftest import sse_text

PROMPT = "Name a colour."


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServeProcess]:
    with VllmServeProcess(tmp_path_factory.mktemp("vllm")) as server:
        print(f"\nvLLM ready in {server.start_seconds:.1f} s")
        yield server


@pytest.fixture
async def rig(tmp_path: Path, vllm: VllmServeProcess) -> AsyncIterator[tuple[SidecarApp, Gateway]]:
    app = SidecarApp(
        make_config(
            tmp_path / "data",
            control={"retry_initial_seconds": 0.05, "retry_max_seconds": 0.2},
        )
    )
    gw: Gateway | None = None
    await app.start()
    try:
        gw = Gateway(
            GatewayConfig(
                upstream=vllm.url,
                backend="vllm",
                base_model="base",
                listen=f"127.0.0.1:{free_port()}",
                sidecar=target_of(app),
                server_id="vllm-gw",
                chunk_idle_seconds=120,
            )
        )
        await gw.start()
        await wait_until(lambda: app.control.connected_servers() == 1, what="the gateway's Hello")
        yield app, gw
    finally:
        if gw is not None:
            await gw.stop()
        await app.shutdown()
        # The module's vLLM outlives the test: leave it with no adapter loaded.
        vllm.unload_adapters()


async def _apply(app: SidecarApp, gw: Gateway, **desired: Any) -> None:
    d = DesiredState(revision=app.control.next_revision(), **desired)
    await app.control.apply(d)
    await wait_until(lambda: gw.router.revision >= d.revision, timeout=180, what="the split")


def _body(**extra: Any) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 16,
        "temperature": 0,
        **extra,
    }


def _ms(values: list[float]) -> str:
    return f"p50 {statistics.median(values):.0f} ms, max {max(values):.0f} ms (n={len(values)})"


async def test_the_sidecar_loads_v1_and_splits_sessions_between_base_and_v1(
    rig: tuple[SidecarApp, Gateway], vllm: VllmServeProcess, adapters: dict[str, Path]
) -> None:
    app, gw = rig
    await _apply(
        app,
        gw,
        loaded=frozenset({"base", "v1"}),
        routes=(RouteSpec("base", 5000), RouteSpec("v1", 5000)),
        stable_version="base",
        artifacts={"v1": f"file://{adapters['a']}"},
    )
    # Loaded through the gateway's adapter: vLLM lists v1 with its folder.
    models = vllm.models()
    assert set(models) == {"base", "v1"} and models["v1"] == str(adapters["a"])
    reference = Router(gw.router.split)
    url = f"http://127.0.0.1:{gw.port}/v1/chat/completions"
    answers: dict[str, set[str]] = {}
    versions: dict[str, str] = {}
    whole_ms: list[float] = []
    async with aiohttp.ClientSession() as http:
        for i in range(12):
            session, rid = f"user-{i}", f"whole-{i}"
            t0 = time.perf_counter()
            async with http.post(
                url, json=_body(), headers={"x-session-id": session, "x-request-id": rid}
            ) as r:
                assert r.status == 200, await r.text()
                assert r.headers["x-request-id"] == rid
                version = r.headers["x-atlas-version"]
                assert version == reference.route(session_id=session).version
                doc = await r.json()
            whole_ms.append((time.perf_counter() - t0) * 1000)
            assert doc["model"] == version
            versions[rid] = version
            answers.setdefault(version, set()).add(doc["choices"][0]["message"]["content"])
        assert set(answers) == {"base", "v1"}
        # greedy: one answer per version, and the adapter changes it
        assert all(len(a) == 1 for a in answers.values()), answers
        assert answers["base"] != answers["v1"]

        streamed: dict[str, str] = {}
        ttft: list[float] = []
        for i in range(4):
            session, rid = f"user-{i}", f"stream-{i}"
            t0 = time.perf_counter()
            async with http.post(
                url,
                json=_body(stream=True),
                headers={"x-session-id": session, "x-request-id": rid},
            ) as r:
                assert r.status == 200
                assert r.headers["content-type"].startswith("text/event-stream")
                version = r.headers["x-atlas-version"]
                assert version == reference.route(session_id=session).version
                raw = b""
                async for chunk in r.content.iter_any():
                    if not raw:
                        ttft.append((time.perf_counter() - t0) * 1000)
                    raw += chunk
            assert raw.rstrip().endswith(b"data: [DONE]")
            versions[rid] = version
            streamed[rid] = sse_text(raw)
            # The same greedy answer, streamed or whole.
            assert {streamed[rid]} == answers[version]
        # The same requests straight to vLLM, for the gateway's share of the latency.
        direct_ms: list[float] = []
        for i in range(12):
            t0 = time.perf_counter()
            model = versions[f"whole-{i}"]
            async with http.post(vllm.url + "/v1/chat/completions", json=_body(model=model)) as r:
                assert r.status == 200
                assert {(await r.json())["choices"][0]["message"]["content"]} == answers[model]
            direct_ms.append((time.perf_counter() - t0) * 1000)
    print(
        f"\n16 tokens through the gateway: {_ms(whole_ms)}; straight to vLLM: {_ms(direct_ms)};"
        f" streamed through the gateway, time to first chunk: {_ms(ttft)}"
    )

    await gw.events.aflush(30)
    rows = {
        e.inference.request_id: e.inference
        for e in logged(app)
        if e.WhichOneof("payload") == "inference"
    }
    assert set(rows) == set(versions)
    for rid, version in versions.items():
        row = rows[rid]
        assert row.model_version == version and row.role == events_pb2.PRIMARY
        assert row.prompt == f"user: {PROMPT}" and not row.error
        assert row.latency_ms > 0
        if rid.startswith("stream-"):
            assert row.response == streamed[rid]
            assert row.attributes["stream"] == "true" and "ttft_ms" in row.attributes
        else:
            assert {row.response} == answers[version]
        assert row.attributes["finish_reason"] in ("stop", "length")


async def test_a_reused_version_name_with_a_new_artifact_is_swapped_in_place(
    rig: tuple[SidecarApp, Gateway], vllm: VllmServeProcess, adapters: dict[str, Path]
) -> None:
    app, gw = rig
    await _apply(
        app,
        gw,
        loaded=frozenset({"base", "v1"}),
        routes=(RouteSpec("v1", 10_000),),
        stable_version="base",
        artifacts={"v1": f"file://{adapters['a']}"},
    )
    url = f"http://127.0.0.1:{gw.port}/v1/chat/completions"

    async def answer(http: aiohttp.ClientSession, model: str = "") -> tuple[str, str]:
        async with http.post(url, json=_body(model=model)) as r:
            assert r.status == 200, await r.text()
            doc = await r.json()
            return r.headers["x-atlas-version"], doc["choices"][0]["message"]["content"]

    adapter = gw.backend.adapter()
    assert adapter is not None
    try:
        async with aiohttp.ClientSession() as http:
            assert (await answer(http))[0] == "v1"
            from_a = (await answer(http))[1]
            # The same artifact again: already loaded, nothing to do.
            await adapter.load("v1", f"file://{adapters['a']}")
            assert vllm.models()["v1"] == str(adapters["a"])
            # A new artifact under the same name: vLLM refuses a plain load (400,
            # already loaded); the adapter sees the other folder and loads in place.
            await adapter.load("v1", f"file://{adapters['b']}")
            assert vllm.models()["v1"] == str(adapters["b"])
            assert f"Loaded new LoRA adapter: name 'v1', path '{adapters['b']}'" in vllm.tail(10**8)
            version, from_b = await answer(http)
            assert version == "v1" and from_b != from_a
            # v1 now answers as adapter b does under a name of its own.
            await adapter.load("vb", f"file://{adapters['b']}")
            status, doc = vllm.request("POST", "/v1/chat/completions", {**_body(), "model": "vb"})
            assert status == 200, doc
            assert doc["choices"][0]["message"]["content"] == from_b
    finally:
        await adapter.close()
