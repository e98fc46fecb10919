"""Tokens and roles on every gRPC method and HTTP route, through the real stacks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from atlas_sidecar_client.pb import (
    admin_pb2,
    admin_pb2_grpc,
    control_pb2,
    control_pb2_grpc,
    events_pb2,
    ingest_pb2_grpc,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.app import SidecarApp
from sidecar.auth import METHOD_ROLES, SESSION_COOKIE
from sidecar.errors import ConfigError
from sidecar.testing import free_port
from tests._auth import write_tokens
from tests._helpers import wait_until
from tests.conftest import make_config

#: The role each token in tests._auth.ROLE_TOKENS has.
_TOKEN_OF_ROLE = {
    "ingest": "ingester",
    "server": "server",
    "operator": "operator",
    "read": "reader",
}
_DENIED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[tuple[SidecarApp, dict[str, str], Path]]:
    tokens_file = tmp_path / "tokens.yaml"
    tokens = write_tokens(tokens_file)
    app = SidecarApp(
        make_config(
            tmp_path / "data",
            server={"http_listen": f"127.0.0.1:{free_port()}"},
            auth={"tokens_file": str(tokens_file), "reload_interval_seconds": 0.05},
            control={"retry_initial_seconds": 0.05, "retry_max_seconds": 0.2},
        )
    )
    await app.start()
    try:
        yield app, tokens, tokens_file
    finally:
        await app.shutdown()


def _grpc_target(app: SidecarApp) -> str:
    port = next(p for a, p in app.ports.items() if a not in ("http", "metrics"))
    return f"127.0.0.1:{port}"


def _md(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token is not None else ()


async def _call(channel: grpc.aio.Channel, method: str, token: str | None) -> grpc.StatusCode:
    """Calls ``method`` with an empty request (raw bytes); its final status code."""
    _, _, client_streaming, server_streaming = METHOD_ROLES[method]
    ident = lambda b: b  # noqa: E731
    kind = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(client_streaming, server_streaming)]
    stub = kind(method, request_serializer=ident, response_deserializer=ident)
    try:
        if client_streaming:
            call = stub(metadata=_md(token))
            await call.done_writing()
        else:
            call = stub(b"", metadata=_md(token))
        if server_streaming:
            async for _ in call:
                pass
        else:
            await call
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        return exc.code()


async def test_every_grpc_method_needs_a_token_with_its_role(
    secured: tuple[SidecarApp, dict[str, str], Path],
) -> None:
    app, tokens, _ = secured
    async with grpc.aio.insecure_channel(_grpc_target(app)) as ch:
        for method, (service, role, _, _) in METHOD_ROLES.items():
            right = tokens[_TOKEN_OF_ROLE[role.value]]
            wrong_role = tokens["ingester" if role.value != "ingest" else "reader"]
            calls = {
                "none": await _call(ch, method, None),
                "bad": await _call(ch, method, "atls_not-a-token"),
                "role": await _call(ch, method, wrong_role),
            }
            assert calls == {
                "none": grpc.StatusCode.UNAUTHENTICATED,
                "bad": grpc.StatusCode.UNAUTHENTICATED,
                "role": grpc.StatusCode.PERMISSION_DENIED,
            }, method
            got = await asyncio.wait_for(_call(ch, method, right), 10)
            # With the right token the servicer answers (an empty request may
            # well be INVALID_ARGUMENT or NOT_FOUND there, never a refusal).
            assert got not in _DENIED, (method, got)
            assert app.auth.denied[(service, "missing_token")] >= 1
            assert app.auth.denied[(service, "missing_role")] >= 1


async def test_health_stays_open_and_reflection_is_off(
    secured: tuple[SidecarApp, dict[str, str], Path],
) -> None:
    app, _, _ = secured
    async with grpc.aio.insecure_channel(_grpc_target(app)) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = ch.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        call = reflect(metadata=_md("x"))
        await call.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call:
                pass
        # Not served at all (it would otherwise need the read role).
        assert err.value.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAUTHENTICATED)


_API_ROUTES = ("/api/status", "/api/report", "/api/rollout", "/api/dashboard-config", "/metrics")
_PAGES = ("/dashboard", "/")


async def test_every_http_route_needs_the_read_role(
    secured: tuple[SidecarApp, dict[str, str], Path],
) -> None:
    app, tokens, _ = secured
    base = f"http://127.0.0.1:{app.ports['http']}"
    async with aiohttp.ClientSession() as http:

        async def get(path: str, token: str | None) -> int:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with http.get(base + path, headers=headers, allow_redirects=False) as r:
                return r.status

        for path in _API_ROUTES:
            assert await get(path, None) == 401, path
            assert await get(path, "atls_wrong") == 401, path
            assert await get(path, tokens["operator"]) == 403, path
            assert await get(path, tokens["reader"]) == 200, path
        for path in _PAGES:
            assert await get(path, None) == 303, path  # to /login
            assert await get(path, tokens["ingester"]) == 403, path
            assert await get(path, tokens["reader"]) in (200, 302), path
        assert await get("/healthz", None) == 200
        assert await get("/static/dashboard.js", None) == 200
        headers = {"Authorization": f"Bearer {tokens['reader']}"}
        async with http.get(base + "/metrics", headers=headers) as r:
            metrics = await r.text()
        denied = [line for line in metrics.splitlines() if line.startswith("atlas_auth_denied")]
        assert any('reason="missing_role"' in x and 'service="http"' in x for x in denied), denied
    assert app.auth.denied[("http", "missing_token")] >= len(_API_ROUTES) + len(_PAGES)
    assert app.auth.denied[("http", "unknown_token")] >= len(_API_ROUTES)
    assert app.auth.denied[("http", "missing_role")] >= len(_API_ROUTES) + len(_PAGES)


async def test_the_dashboard_signs_in_with_a_cookie(
    secured: tuple[SidecarApp, dict[str, str], Path],
) -> None:
    app, tokens, _ = secured
    base = f"http://127.0.0.1:{app.ports['http']}"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.get(base + "/dashboard", allow_redirects=False) as r:
            assert r.status == 303
            assert r.headers["Location"].startswith("/login")
        form = {"token": tokens["ingester"], "next": "/dashboard"}
        async with http.post(base + "/login", data=form, allow_redirects=False) as r:
            assert r.status == 403
            assert "read" in await r.text()
        form = {"token": tokens["reader"], "next": "https://elsewhere.example/"}
        async with http.post(base + "/login", data=form, allow_redirects=False) as r:
            assert r.status == 303
            assert r.headers["Location"] == "/dashboard"  # never to another site
            cookie = r.cookies[SESSION_COOKIE]
            assert cookie["httponly"] and cookie["samesite"] == "Strict"
            assert tokens["reader"] not in cookie.value
        async with http.get(base + "/dashboard", allow_redirects=False) as r:
            assert r.status == 200
        async with http.get(base + "/api/status") as r:
            assert r.status == 200
        async with http.get(base + "/logout", allow_redirects=False) as r:
            assert r.status == 303
        async with http.get(base + "/api/status") as r:
            assert r.status == 401


async def test_a_rotated_tokens_file_takes_effect_without_restart(
    secured: tuple[SidecarApp, dict[str, str], Path],
) -> None:
    app, old, tokens_file = secured
    base = f"http://127.0.0.1:{app.ports['http']}"
    status = "/atlas.sidecar.v1.AdminService/GetStatus"
    async with grpc.aio.insecure_channel(_grpc_target(app)) as ch:
        assert await _call(ch, status, old["reader"]) == grpc.StatusCode.OK
        new = write_tokens(tokens_file)  # every token replaced, as a Secret rotation does
        await wait_until(lambda: app.auth.reloads >= 1, what="the tokens file reread")
        assert await _call(ch, status, old["reader"]) == grpc.StatusCode.UNAUTHENTICATED
        assert await _call(ch, status, new["reader"]) == grpc.StatusCode.OK
        # A broken file keeps the tokens in force, and says why.
        tokens_file.write_text("tokens: [{name: x, sha256: nothex, roles: [read]}]\n")
        await wait_until(lambda: app.auth.reload_failures >= 1, what="the bad file noticed")
        assert "tokens[0].sha256" in app.auth.last_reload_error
        assert await _call(ch, status, new["reader"]) == grpc.StatusCode.OK
        # SIGHUP's handler rereads at once.
        newer = write_tokens(tokens_file)
        app.auth.request_reload()
        assert await _call(ch, status, newer["reader"]) == grpc.StatusCode.OK
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {newer['reader']}"}
        async with http.get(base + "/api/status", headers=headers) as r:
            assert r.status == 200
            doc: dict[str, Any] = await r.json()
    assert doc["details"]["auth"]["reload_failures"] >= 1


async def _hello(
    channel: grpc.aio.Channel, server_id: str, token: str
) -> grpc.aio.StreamStreamCall:
    call = control_pb2_grpc.ControlServiceStub(channel).Connect(metadata=_md(token))
    await call.write(control_pb2.ServerMessage(hello=control_pb2.Hello(server_id=server_id)))
    return call


async def test_an_impostor_hello_is_refused_and_a_live_stream_is_never_replaced(
    secured: tuple[SidecarApp, dict[str, str], Path],
) -> None:
    app, tokens, _ = secured
    async with grpc.aio.insecure_channel(_grpc_target(app)) as ch:
        # The server token may claim pod-* only.
        impostor = await _hello(ch, "gateway-1", tokens["server"])
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await impostor.read()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "gateway-1" in (err.value.details() or "")
        first = await _hello(ch, "pod-1", tokens["server"])
        await first.initial_metadata()
        await wait_until(lambda: app.control.connected_servers() == 1, what="pod-1 connected")
        second = await _hello(ch, "pod-1", tokens["server"])
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await second.read()
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert app.control.connected_servers() == 1
        assert app.control.counters["duplicates_refused"] == 1
        # Once the first stream is gone, the id may connect again.
        first.cancel()
        await wait_until(lambda: app.control.connected_servers() == 0, what="pod-1 gone")
        again = await _hello(ch, "pod-1", tokens["server"])
        await again.initial_metadata()
        await wait_until(lambda: app.control.connected_servers() == 1, what="pod-1 back")
        again.cancel()
    assert app.control.counters["impostors_refused"] == 1


def test_a_non_loopback_listener_without_tokens_refuses_to_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ConfigError, match=r"server\.listen: 0\.0\.0\.0:\d+ .*auth\.tokens_file"):
        SidecarApp(make_config(tmp_path / "a", server={"listen": [f"0.0.0.0:{free_port()}"]}))
    with pytest.raises(ConfigError, match=r"server\.http_listen"):
        SidecarApp(make_config(tmp_path / "b", server={"http_listen": "0.0.0.0:9464"}))
    with caplog.at_level(logging.WARNING):
        SidecarApp(
            make_config(
                tmp_path / "c",
                server={"http_listen": "0.0.0.0:9464"},
                auth={"allow_unauthenticated": True},
            )
        )
    assert "without authentication" in caplog.text
    # Loopback and unix sockets need no tokens.
    SidecarApp(make_config(tmp_path / "d", server={"listen": ["[::1]:0", "unix:/tmp/x.sock"]}))


async def test_metrics_listen_serves_metrics_only_and_open(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens.yaml"
    write_tokens(tokens_file)
    app = SidecarApp(
        make_config(
            tmp_path / "data",
            server={
                "http_listen": f"127.0.0.1:{free_port()}",
                "metrics_listen": f"127.0.0.1:{free_port()}",
            },
            auth={"tokens_file": str(tokens_file)},
        )
    )
    await app.start()
    try:
        base = f"http://127.0.0.1:{app.ports['metrics']}"
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/metrics") as r:
                assert r.status == 200
                assert "atlas_" in await r.text()
            for path in ("/api/status", "/dashboard", "/healthz"):
                async with http.get(base + path) as r:
                    assert r.status == 404, path
            async with http.get(f"http://127.0.0.1:{app.ports['http']}/metrics") as r:
                assert r.status == 401
    finally:
        await app.shutdown()


async def test_a_client_admin_call_through_the_cli_channel_sends_its_token(
    secured: tuple[SidecarApp, dict[str, str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from atlas_sidecar_client import ChannelSecurity, open_aio_channel

    app, tokens, _ = secured
    monkeypatch.setenv("ATLAS_SIDECAR_TOKEN", tokens["reader"])
    async with open_aio_channel(_grpc_target(app)) as ch:
        status = await admin_pb2_grpc.AdminServiceStub(ch).GetStatus(admin_pb2.GetStatusRequest())
        assert status.version
    sec = ChannelSecurity(token=tokens["ingester"])
    async with open_aio_channel(_grpc_target(app), sec) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin_pb2_grpc.AdminServiceStub(ch).GetStatus(admin_pb2.GetStatusRequest())
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_with_auth_each_token_is_a_producer_of_its_own(tmp_path: Path) -> None:
    """On loopback every client shares one address; the token tells producers apart."""
    tokens_file = tmp_path / "tokens.yaml"
    tokens = write_tokens(tokens_file, {"pod-a": (["ingest"], []), "pod-b": (["ingest"], [])})
    app = SidecarApp(
        make_config(
            tmp_path / "data",
            server={"max_concurrent_streams": 10, "max_streams_per_peer": 2},
            auth={"tokens_file": str(tokens_file)},
        )
    )
    await app.start()
    try:
        async with grpc.aio.insecure_channel(_grpc_target(app)) as ch:
            stub = ingest_pb2_grpc.IngestServiceStub(ch)
            held = []
            for i in range(2):
                call = stub.StreamEvents(metadata=_md(tokens["pod-a"]))
                await call.write(events_pb2.EventBatch(events=[_event(f"a{i}")]))
                assert (await call.read()).accepted == 1
                held.append(call)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.RecordEvents(
                    events_pb2.EventBatch(events=[_event("a2")]), metadata=_md(tokens["pod-a"])
                )
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "token:pod-a" in (err.value.details() or "")
            # The other producer, from the same address, still gets its slots.
            ack = await stub.RecordEvents(
                events_pb2.EventBatch(events=[_event("b0")]), metadata=_md(tokens["pod-b"])
            )
            assert ack.accepted == 1
            for call in held:
                call.cancel()
    finally:
        await app.shutdown()


def _event(event_id: str) -> events_pb2.Event:
    return events_pb2.Event(
        event_id=event_id,
        inference=events_pb2.Inference(request_id=event_id, model_version="v1"),
    )


async def test_reflection_when_enabled_needs_the_read_role(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens.yaml"
    tokens = write_tokens(tokens_file)
    app = SidecarApp(
        make_config(
            tmp_path / "data",
            server={"reflection": True},
            auth={"tokens_file": str(tokens_file)},
        )
    )
    await app.start()
    try:
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        async with grpc.aio.insecure_channel(_grpc_target(app)) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)

            async def services(token: str | None) -> list[str]:
                call = stub.ServerReflectionInfo(metadata=_md(token))
                await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
                await call.done_writing()
                names: list[str] = []
                async for reply in call:
                    names += [s.name for s in reply.list_services_response.service]
                return names

            with pytest.raises(grpc.aio.AioRpcError) as err:
                await services(None)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "atlas.sidecar.v1.AdminService" in await services(tokens["reader"])
    finally:
        await app.shutdown()
