"""The gateway through real HTTP and a real daemon, in front of a small OpenAI-style upstream.

The upstream here is a few aiohttp routes that answer like an OpenAI server
(whole and streamed answers, log-probabilities, an unknown model, a stall);
the real servers are in tests/servers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from atlas_sidecar_client import Route, Router, TrafficSplit
from atlas_sidecar_client.pb import events_pb2

from sidecar.app import SidecarApp
from sidecar.config import GatewayConfig
from sidecar.gateway import Gateway
from sidecar.testing import free_port
from tests._helpers import logged, wait_until
from tests.conftest import make_config, target_of


class Upstream:
    """An OpenAI-style server: answers ``version=<model>``; ``stall`` models never finish."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.known = {"v1", "v2", "v3", "stall", "slow"}
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.cancelled = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self.runner.addresses[0][1])

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": m} for m in sorted(self.known)]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        model = body.get("model", "")
        if model not in self.known:
            return web.json_response(
                {"error": {"message": f"model '{model}' not found"}}, status=404
            )
        text = f"version={model}"
        chat = request.path.endswith("chat/completions")
        if not body.get("stream"):
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
                if body.get("logprobs"):
                    choice["logprobs"] = {"content": [{"token": "x", "logprob": -0.5}] * 3}
            else:
                choice["text"] = text
                if body.get("logprobs"):
                    choice["logprobs"] = {"token_logprobs": [-0.25, -0.75]}
            return web.json_response({"id": "x", "choices": [choice]})
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        try:
            for i, piece in enumerate(["version=", model]):
                if model == "stall" and i == 1:
                    await asyncio.sleep(3600)
                if model == "slow":
                    await asyncio.sleep(0.2)
                delta = {"index": 0, "delta": {"content": piece}}
                await out.write(b"data: " + orjson.dumps({"choices": [delta]}) + b"\n\n")
            done = {"index": 0, "delta": {}, "finish_reason": "stop"}
            await out.write(b"data: " + orjson.dumps({"choices": [done]}) + b"\n\n")
            await out.write(b"data: [DONE]\n\n")
            await out.write_eof()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return out


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[tuple[SidecarApp, Upstream, Gateway]]:
    app = SidecarApp(make_config(tmp_path / "data"))
    await app.start()
    upstream = Upstream()
    await upstream.start()
    gw = Gateway(
        GatewayConfig(
            upstream=upstream.url,
            listen=f"127.0.0.1:{free_port()}",
            sidecar=target_of(app),
            versions=["v1"],
            chunk_idle_seconds=0.5,
            max_concurrent_mirrors=4,
        )
    )
    await gw.start()
    try:
        yield app, upstream, gw
    finally:
        await gw.stop()
        await upstream.stop()
        await app.shutdown()


def _url(gw: Gateway, path: str) -> str:
    return f"http://127.0.0.1:{gw.port}{path}"


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": "whatever", "messages": [{"role": "user", "content": "hi"}], **extra}


async def test_an_answer_is_routed_recorded_and_carries_its_ids(
    rig: tuple[SidecarApp, Upstream, Gateway],
) -> None:
    app, upstream, gw = rig
    async with aiohttp.ClientSession() as http:
        async with http.post(
            _url(gw, "/v1/chat/completions"),
            json=_chat(logprobs=True, user="alice"),
            headers={"x-request-id": "req-1"},
        ) as r:
            assert r.status == 200
            assert r.headers["x-request-id"] == "req-1"
            assert r.headers["x-atlas-version"] == "v1"
            doc = await r.json()
        assert doc["choices"][0]["message"]["content"] == "version=v1"
        async with http.post(_url(gw, "/v1/completions"), json={"prompt": "p"}) as r:
            assert r.status == 200
            generated = r.headers["x-request-id"]
            assert len(generated) == 36 and generated[14] == "7"  # a UUIDv7
    assert upstream.headers[0]["x-request-id"] == "req-1"
    assert upstream.requests[0]["model"] == "v1"  # rewritten to the routed version
    await gw.events.aflush(10)
    events = {e.inference.request_id: e.inference for e in logged(app)}
    first = events["req-1"]
    assert first.model_version == "v1" and first.response == "version=v1"
    assert first.prompt == "user: hi" and first.user_id == "alice"
    assert list(first.token_logprobs) == [-0.5, -0.5, -0.5]
    assert first.attributes["finish_reason"] == "stop"
    assert events[generated].response == "version=v1"


async def test_a_split_routes_by_the_sticky_key_as_the_router_does(
    rig: tuple[SidecarApp, Upstream, Gateway],
) -> None:
    _app, upstream, gw = rig
    split = TrafficSplit(
        revision=5, routes=(Route("v1", 5000), Route("v2", 5000)), stable_version="v1"
    )
    gw.router.apply(split)
    reference = Router(split)
    async with aiohttp.ClientSession() as http:
        for i in range(30):
            session = f"s{i}"
            async with http.post(
                _url(gw, "/v1/chat/completions"), json=_chat(), headers={"x-session-id": session}
            ) as r:
                assert r.status == 200
                assert r.headers["x-atlas-version"] == reference.route(session_id=session).version
    assert {b["model"] for b in upstream.requests} == {"v1", "v2"}


async def test_streamed_answers_pass_through_and_are_recorded(
    rig: tuple[SidecarApp, Upstream, Gateway],
) -> None:
    app, _upstream, gw = rig
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            _url(gw, "/v1/chat/completions"),
            json=_chat(stream=True),
            headers={"x-request-id": "s-1"},
        ) as r,
    ):
        assert r.status == 200
        assert r.headers["x-atlas-version"] == "v1"
        raw = await r.read()
    assert raw.count(b"data: ") == 4 and raw.endswith(b"data: [DONE]\n\n")
    await gw.events.aflush(10)
    inf = {e.inference.request_id: e.inference for e in logged(app)}["s-1"]
    assert inf.response == "version=v1"
    assert inf.attributes["stream"] == "true" and "ttft_ms" in inf.attributes


async def test_mirrored_requests_are_recorded_as_shadow_after_the_answer(
    rig: tuple[SidecarApp, Upstream, Gateway],
) -> None:
    app, _upstream, gw = rig
    gw.router.apply(
        TrafficSplit(
            revision=7,
            routes=(Route("v1", 10_000),),
            stable_version="v1",
            shadow_version="v2",
            mirror_bps=10_000,
        )
    )
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            _url(gw, "/v1/chat/completions"), json=_chat(), headers={"x-request-id": "m-1"}
        ) as r,
    ):
        assert (await r.json())["choices"][0]["message"]["content"] == "version=v1"
    await wait_until(lambda: gw.counters["mirrors"] == 1, what="the mirror")
    await gw.events.aflush(10)
    rows = [e.inference for e in logged(app) if e.inference.request_id == "m-1"]
    assert sorted((r.model_version, r.role) for r in rows) == [
        ("v1", events_pb2.PRIMARY),
        ("v2", events_pb2.SHADOW),
    ]


async def test_feedback_over_http_reaches_the_sidecar_and_bad_fields_are_named(
    rig: tuple[SidecarApp, Upstream, Gateway],
) -> None:
    app, _, gw = rig
    async with aiohttp.ClientSession() as http:
        async with http.post(
            _url(gw, "/v1/feedback"), json={"request_id": "req-9", "signal": "THUMBS_UP"}
        ) as r:
            assert r.status == 202
        # sendBeacon sends text/plain
        async with http.post(
            _url(gw, "/v1/feedback"),
            data=b'{"request_id": "req-9", "rating": 0.25}',
            headers={"Content-Type": "text/plain"},
        ) as r:
            assert r.status == 202
        for bad, field in (
            ({"signal": "THUMBS_UP"}, "request_id"),
            ({"request_id": "r", "rating": 7}, "rating"),
            ({"request_id": "r", "signal": "LOVE"}, "signal"),
            ({"request_id": "r", "colour": "red"}, "colour"),
        ):
            async with http.post(_url(gw, "/v1/feedback"), json=bad) as r:
                assert r.status == 400
                assert (await r.json())["error"]["message"].startswith(field)
        async with http.post(_url(gw, "/v1/feedback"), data=b"{nope") as r:
            assert r.status == 400
    await gw.events.aflush(10)
    fbs = [e.feedback for e in logged(app) if e.WhichOneof("payload") == "feedback"]
    assert [(f.request_id, f.signal) for f in fbs][:1] == [("req-9", events_pb2.THUMBS_UP)]
    assert fbs[1].rating == 0.25
    assert gw.counters["feedback_bad"] == 5


async def test_cors_preflight_only_for_configured_origins(tmp_path: Path) -> None:
    gw = Gateway(
        GatewayConfig(
            upstream="http://127.0.0.1:1",
            listen=f"127.0.0.1:{free_port()}",
            sidecar=f"127.0.0.1:{free_port()}",
            feedback_cors_origins=["https://app.example"],
        )
    )
    await gw.start()
    try:
        async with aiohttp.ClientSession() as http:
            good = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
            async with http.options(_url(gw, "/v1/feedback"), headers=good) as r:
                assert r.status == 204
                assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
            bad = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
            async with http.options(_url(gw, "/v1/feedback"), headers=bad) as r:
                assert r.status == 403
    finally:
        await gw.stop()


async def test_a_repeated_prompt_in_a_session_is_a_retry(
    rig: tuple[SidecarApp, Upstream, Gateway],
) -> None:
    app, _, gw = rig
    async with aiohttp.ClientSession() as http:
        for rid in ("a", "b"):
            async with http.post(
                _url(gw, "/v1/chat/completions"),
                json=_chat(),
                headers={"x-request-id": rid, "x-session-id": "sess"},
            ) as r:
                assert r.status == 200
    await gw.events.aflush(10)
    events = logged(app)
    second = next(e.inference for e in events if e.inference.request_id == "b")
    assert second.retry_of == "a"
    retry = [e.feedback for e in events if e.WhichOneof("payload") == "feedback"]
    assert [(f.request_id, f.signal) for f in retry] == [("a", events_pb2.RETRY)]


async def test_unknown_version_falls_back_to_stable_and_bad_input_is_named(
    rig: tuple[SidecarApp, Upstream, Gateway],
) -> None:
    _app, _upstream, gw = rig
    gw.router.apply(TrafficSplit(revision=9, routes=(Route("gone", 10_000),), stable_version="v1"))
    async with aiohttp.ClientSession() as http:
        async with http.post(_url(gw, "/v1/chat/completions"), json=_chat()) as r:
            assert r.status == 200
            assert r.headers["x-atlas-version"] == "v1"
        assert gw.counters["version_fallbacks"] == 1
        async with http.post(_url(gw, "/v1/chat/completions"), data=b"{not json") as r:
            assert r.status == 400
            assert "not JSON" in (await r.json())["error"]["message"]
        big = b'{"prompt": "' + b"x" * (5 << 20) + b'"}'
        async with http.post(_url(gw, "/v1/completions"), data=big) as r:
            assert r.status == 413
        async with http.get(_url(gw, "/v1/models")) as r:  # passes through
            assert r.status == 200 and "v1" in await r.text()
    assert gw.counters["bad_requests"] == 1 and gw.counters["too_large"] == 1


async def test_a_stalled_stream_and_a_dead_upstream_get_clear_statuses(
    rig: tuple[SidecarApp, Upstream, Gateway],
) -> None:
    _app, upstream, gw = rig
    gw.router.apply(TrafficSplit(revision=9, routes=(Route("stall", 10_000),), stable_version="v1"))
    async with aiohttp.ClientSession() as http:
        async with http.post(_url(gw, "/v1/chat/completions"), json=_chat(stream=True)) as r:
            assert r.status == 200
            raw = await r.read()  # cut after the first chunk, past chunk_idle_seconds
        assert raw.count(b"data: ") == 1
        assert gw.counters["upstream_stalls"] == 1
        await upstream.stop()
        async with http.post(_url(gw, "/v1/chat/completions"), json=_chat()) as r:
            assert r.status == 502
            assert "failed" in (await r.json())["error"]["message"]
        assert gw.counters["upstream_errors"] >= 1
        async with http.post(_url(gw, "/v1/feedback"), json={"request_id": "x", "rating": 1}) as r:
            assert r.status == 202  # the gateway stays up


async def test_a_client_that_hangs_up_mid_stream_cancels_upstream_and_is_recorded(
    rig: tuple[SidecarApp, Upstream, Gateway],
) -> None:
    app, upstream, gw = rig
    gw.router.apply(TrafficSplit(revision=9, routes=(Route("stall", 10_000),), stable_version="v1"))
    gw.config = gw.config.model_copy(update={"chunk_idle_seconds": 30})
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            _url(gw, "/v1/chat/completions"),
            json=_chat(stream=True),
            headers={"x-request-id": "gone-1"},
        )
        await resp.content.readany()  # the first chunk arrived
        resp.close()  # the user closed the tab
    await wait_until(lambda: gw.counters["client_disconnects"] == 1, what="the hang-up")
    await wait_until(lambda: upstream.cancelled == 1, what="the upstream request cancelled")
    await gw.events.aflush(10)
    inf = next(e.inference for e in logged(app) if e.inference.request_id == "gone-1")
    assert inf.attributes["partial"] == "client" and inf.response == "version="


async def test_the_daemon_takes_feedback_over_http_too(tmp_path: Path) -> None:
    from tests._auth import write_tokens

    tokens = write_tokens(tmp_path / "tokens.yaml")
    app = SidecarApp(
        make_config(
            tmp_path / "data",
            server={"http_listen": f"127.0.0.1:{free_port()}"},
            auth={"tokens_file": str(tmp_path / "tokens.yaml")},
        )
    )
    await app.start()
    try:
        url = f"http://127.0.0.1:{app.ports['http']}/v1/feedback"
        body = {"request_id": "r-1", "signal": "COPY", "rating": 0.5}
        async with aiohttp.ClientSession() as http:
            async with http.post(url, json=body) as r:
                assert r.status == 401
            bearer = {"Authorization": f"Bearer {tokens['reader']}"}
            async with http.post(url, json=body, headers=bearer) as r:
                assert r.status == 403  # feedback is ingest, not read
            bearer = {"Authorization": f"Bearer {tokens['ingester']}"}
            async with http.post(url, json=body, headers=bearer) as r:
                assert r.status == 202
            async with http.post(url, json={"request_id": "r-1"}, headers=bearer) as r:
                assert r.status == 400
                assert "signal" in (await r.json())["error"]["message"]
        fb = [e.feedback for e in logged(app) if e.WhichOneof("payload") == "feedback"]
        assert [(f.request_id, f.signal, f.rating) for f in fb] == [("r-1", events_pb2.COPY, 0.5)]
    finally:
        await app.shutdown()
