"""TLS and mutual TLS on the gRPC and HTTP listeners, with certificates made in the test."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiohttp
import grpc
import pytest
from atlas_sidecar_client import ChannelSecurity, open_aio_channel
from atlas_sidecar_client.pb import admin_pb2, admin_pb2_grpc

from sidecar.app import SidecarApp
from sidecar.testing import free_port
from tests._auth import CertAuthority, Pem
from tests._helpers import wait_until
from tests.conftest import make_config


def _app(tmp_path: Path, server: Pem, client_ca: Path | None = None) -> SidecarApp:
    tls = {"cert_file": str(server.cert), "key_file": str(server.key), "reload_check_seconds": 0.05}
    if client_ca is not None:
        tls["client_ca_file"] = str(client_ca)
    return SidecarApp(
        make_config(
            tmp_path / "data",
            server={"http_listen": f"127.0.0.1:{free_port()}", "tls": tls},
        )
    )


def _target(app: SidecarApp) -> str:
    port = next(p for a, p in app.ports.items() if a not in ("http", "metrics"))
    return f"127.0.0.1:{port}"


async def _status(target: str, security: ChannelSecurity | None) -> grpc.StatusCode:
    async with open_aio_channel(target, security) as ch:
        try:
            await admin_pb2_grpc.AdminServiceStub(ch).GetStatus(
                admin_pb2.GetStatusRequest(), timeout=5
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def _http_ssl(ca: Path, client: Pem | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        ctx.load_cert_chain(client.cert, client.key)
    return ctx


async def _http_status(app: SidecarApp, ctx: ssl.SSLContext) -> int:
    url = f"https://127.0.0.1:{app.ports['http']}/api/status"
    async with aiohttp.ClientSession() as http, http.get(url, ssl=ctx) as r:
        return r.status


async def test_tls_serves_grpc_and_http_and_refuses_plaintext(tmp_path: Path) -> None:
    ca = CertAuthority(tmp_path / "pki")
    app = _app(tmp_path, ca.issue("sidecar"))
    await app.start()
    try:
        target = _target(app)
        assert await _status(target, ChannelSecurity(ca_file=ca.cert_file)) == grpc.StatusCode.OK
        assert await _status(target, None) == grpc.StatusCode.UNAVAILABLE
        other = CertAuthority(tmp_path / "other", "other-ca")
        assert (
            await _status(target, ChannelSecurity(ca_file=other.cert_file))
            == grpc.StatusCode.UNAVAILABLE
        )
        assert await _http_status(app, _http_ssl(ca.cert_file)) == 200
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await _http_status(app, _http_ssl(other.cert_file))
    finally:
        await app.shutdown()


async def test_mutual_tls_refuses_a_client_without_a_certificate(tmp_path: Path) -> None:
    ca = CertAuthority(tmp_path / "pki")
    clients = CertAuthority(tmp_path / "clients", "client-ca")
    app = _app(tmp_path, ca.issue("sidecar"), client_ca=clients.cert_file)
    await app.start()
    try:
        target = _target(app)
        good = clients.issue("vllm-pod", client=True)
        stranger = CertAuthority(tmp_path / "stranger", "stranger-ca").issue("x", client=True)
        with_cert = ChannelSecurity(ca_file=ca.cert_file, cert_file=good.cert, key_file=good.key)
        assert await _status(target, with_cert) == grpc.StatusCode.OK
        assert await _status(target, ChannelSecurity(ca_file=ca.cert_file)) == (
            grpc.StatusCode.UNAVAILABLE
        )
        wrong = ChannelSecurity(
            ca_file=ca.cert_file, cert_file=stranger.cert, key_file=stranger.key
        )
        assert await _status(target, wrong) == grpc.StatusCode.UNAVAILABLE
        assert await _http_status(app, _http_ssl(ca.cert_file, good)) == 200
        with pytest.raises(aiohttp.ClientError):
            await _http_status(app, _http_ssl(ca.cert_file))
    finally:
        await app.shutdown()


async def test_a_renewed_certificate_is_served_without_restart(tmp_path: Path) -> None:
    old_ca = CertAuthority(tmp_path / "old", "old-ca")
    served = old_ca.issue("sidecar")
    app = _app(tmp_path, served)
    await app.start()
    try:
        target = _target(app)
        new_ca = CertAuthority(tmp_path / "new", "new-ca")
        trusts_new = ChannelSecurity(ca_file=new_ca.cert_file)
        assert await _status(target, trusts_new) == grpc.StatusCode.UNAVAILABLE
        assert app.tls is not None
        new_ca.issue("sidecar", out=served)  # renewed in place, signed by the new CA
        results: list[grpc.StatusCode] = []

        async def renewed() -> bool:
            results.append(await _status(target, trusts_new))
            return results[-1] == grpc.StatusCode.OK

        # Polled by time, not by count: under load a handshake fails fast and
        # 200 tries can be over before the files' next check.
        deadline = asyncio.get_running_loop().time() + 30
        # Polling a server: there is no event to wait on.
        while not await renewed() and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        assert results[-1] == grpc.StatusCode.OK
        await wait_until(lambda: app.tls is not None and app.tls.reloads >= 1, what="reloaded")
        # The HTTP listener follows (its periodic check loads the new pair).
        for _ in range(200):
            try:
                if await _http_status(app, _http_ssl(new_ca.cert_file)) == 200:
                    break
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)  # the next check of the files
        assert await _http_status(app, _http_ssl(new_ca.cert_file)) == 200
    finally:
        await app.shutdown()
