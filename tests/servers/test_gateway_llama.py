"""The gateway in front of a real llama-server (router mode) and a real daemon.

Two versions routed by the sidecar's split, a third loaded at run time through
the gateway's adapter, streamed and whole answers recorded with their request
ids, mirrored answers recorded as SHADOW, feedback reaching the sidecar, and a
killed upstream answered with a 502 while the gateway stays up.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from atlas_sidecar_client import Router
from atlas_sidecar_client.pb import events_pb2

from sidecar.app import SidecarApp
from sidecar.config import GatewayConfig
from sidecar.control._plane import DesiredState, RouteSpec, ShadowSpec
from sidecar.gateway import Gateway
from sidecar.testing import LlamaServerProcess, free_port
from tests._helpers import logged, wait_until
from tests.conftest import make_config, target_of

PROMPT = "Name a colour."


@pytest.fixture
async def rig(
    tmp_path: Path, llama_binary: Path, base_model: Path, adapters: dict[str, Path]
) -> AsyncIterator[tuple[SidecarApp, LlamaServerProcess, Gateway]]:
    server = LlamaServerProcess.router(
        tmp_path / "llama",
        {"base": None, "v1": adapters["a"]},
        base=base_model,
        binary=llama_binary,
        models_max=4,
    )
    app = SidecarApp(
        make_config(
            tmp_path / "data",
            control={"retry_initial_seconds": 0.05, "retry_max_seconds": 0.2},
        )
    )
    gw: Gateway | None = None
    with server:
        for name in ("base", "v1"):
            server.load(name)
        await app.start()
        try:
            gw = Gateway(
                GatewayConfig(
                    upstream=server.url,
                    backend="llama-router",
                    presets_file=server.presets_path,
                    base_model="base",
                    listen=f"127.0.0.1:{free_port()}",
                    sidecar=target_of(app),
                    server_id="llama-0",
                    chunk_idle_seconds=60,
                )
            )
            await gw.start()
            await wait_until(
                lambda: app.control.connected_servers() == 1, what="the gateway's Hello"
            )
            yield app, server, gw
        finally:
            if gw is not None:
                await gw.stop()
            await app.shutdown()


async def _apply(app: SidecarApp, gw: Gateway, **desired: Any) -> None:
    d = DesiredState(revision=app.control.next_revision(), **desired)
    await app.control.apply(d)
    await wait_until(lambda: gw.router.revision >= d.revision, timeout=120, what="the split")


def _body(**extra: Any) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 12,
        "temperature": 0,
        **extra,
    }


async def test_two_versions_split_by_the_sidecar_and_a_third_loaded_at_run_time(
    rig: tuple[SidecarApp, LlamaServerProcess, Gateway], adapters: dict[str, Path]
) -> None:
    app, server, gw = rig
    await _apply(
        app,
        gw,
        loaded=frozenset({"base", "v1"}),
        routes=(RouteSpec("base", 5000), RouteSpec("v1", 5000)),
        stable_version="base",
    )
    reference = Router(gw.router.split)
    url = f"http://127.0.0.1:{gw.port}/v1/chat/completions"
    answers: dict[str, set[str]] = {}
    async with aiohttp.ClientSession() as http:
        for i in range(12):
            session = f"user-{i}"
            async with http.post(url, json=_body(), headers={"x-session-id": session}) as r:
                assert r.status == 200, await r.text()
                version = r.headers["x-atlas-version"]
                assert version == reference.route(session_id=session).version
                doc = await r.json()
            answers.setdefault(version, set()).add(doc["choices"][0]["message"]["content"])
    assert set(answers) == {"base", "v1"}
    # greedy: one answer per version, and the adapter changes it
    assert all(len(a) == 1 for a in answers.values()), answers
    assert answers["base"] != answers["v1"]

    # A new version, rolled out by the sidecar: the gateway's adapter adds its
    # preset and loads it in the running server.
    await _apply(
        app,
        gw,
        loaded=frozenset({"base", "v1", "v2"}),
        routes=(RouteSpec("v2", 10_000),),
        stable_version="base",
        artifacts={"v2": f"file://{adapters['b']}"},
    )
    await wait_until(lambda: server.models().get("v2") == "loaded", timeout=120, what="v2 loaded")
    async with aiohttp.ClientSession() as http, http.post(url, json=_body()) as r:
        assert r.status == 200 and r.headers["x-atlas-version"] == "v2"
        v2 = (await r.json())["choices"][0]["message"]["content"]
    assert v2 not in answers["base"]


async def test_answers_streamed_or_not_are_recorded_mirrors_as_shadow_and_feedback_arrives(
    rig: tuple[SidecarApp, LlamaServerProcess, Gateway],
) -> None:
    app, _server, gw = rig
    await _apply(
        app,
        gw,
        loaded=frozenset({"base", "v1"}),
        routes=(RouteSpec("base", 10_000),),
        stable_version="base",
        shadow=ShadowSpec("v1", 10_000),
    )
    base = f"http://127.0.0.1:{gw.port}"
    async with aiohttp.ClientSession() as http:
        async with http.post(
            base + "/v1/chat/completions", json=_body(), headers={"x-request-id": "whole-1"}
        ) as r:
            assert r.status == 200 and r.headers["x-request-id"] == "whole-1"
            whole = (await r.json())["choices"][0]["message"]["content"]
        # llama-server closes the connection after a streamed answer: several in a
        # row go through the gateway's one resend on a dead pooled connection.
        for i in range(4):
            async with http.post(
                base + "/v1/chat/completions",
                json=_body(stream=True),
                headers={"x-request-id": f"stream-{i}"},
            ) as r:
                assert r.status == 200
                raw = await r.read()
            assert raw.rstrip().endswith(b"data: [DONE]")
        async with http.post(
            base + "/v1/feedback", json={"request_id": "whole-1", "signal": "THUMBS_UP"}
        ) as r:
            assert r.status == 202
    await wait_until(
        lambda: gw.counters["mirrors"] + gw.counters["mirrors_dropped"] >= 5,
        timeout=120,
        what="the mirrors",
    )
    await gw.events.aflush(30)
    events = logged(app)
    rows = [e.inference for e in events if e.WhichOneof("payload") == "inference"]
    by_id: dict[str, list[Any]] = {}
    for row in rows:
        by_id.setdefault(row.request_id, []).append(row)
    primary = {r.model_version: r for r in by_id["whole-1"] if r.role == events_pb2.PRIMARY}
    shadow = [r for r in by_id["whole-1"] if r.role == events_pb2.SHADOW]
    assert primary["base"].response == whole and whole
    assert [s.model_version for s in shadow] == ["v1"] and shadow[0].response != whole
    streamed = next(r for r in by_id["stream-0"] if r.role == events_pb2.PRIMARY)
    assert streamed.response and streamed.attributes["stream"] == "true"
    assert "ttft_ms" in streamed.attributes
    assert all(f"stream-{i}" in by_id for i in range(4))
    fb = [e.feedback for e in events if e.WhichOneof("payload") == "feedback"]
    assert [(f.request_id, f.signal) for f in fb] == [("whole-1", events_pb2.THUMBS_UP)]


async def test_a_killed_upstream_is_a_502_and_the_gateway_stays_up(
    rig: tuple[SidecarApp, LlamaServerProcess, Gateway],
) -> None:
    _app, server, gw = rig
    server.stop()
    base = f"http://127.0.0.1:{gw.port}"
    async with aiohttp.ClientSession() as http:
        async with http.post(base + "/v1/chat/completions", json=_body()) as r:
            assert r.status == 502
            assert "failed" in (await r.json())["error"]["message"]
        async with http.get(base + "/atlas/gateway/status") as r:
            status = await r.json()
    # The status came back: the gateway is still serving.
    assert status["counters"]["upstream_errors"] >= 1
