"""The vLLM LoRA adapter against a loopback server with vLLM's routes and answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.app import SidecarApp
from sidecar.config import load_config
from sidecar.control import DesiredState, RouteSpec
from sidecar.control.adapters import AdapterError, VllmLoraAdapter, adapter_loop, lora_path
from sidecar.testing import FakeVllmServer, free_port
from tests._helpers import fixed_port_config


@pytest.fixture
async def vllm() -> AsyncIterator[FakeVllmServer]:
    server = FakeVllmServer()
    await server.start()
    yield server
    await server.shutdown()


@pytest.fixture
async def adapter(vllm: FakeVllmServer) -> AsyncIterator[VllmLoraAdapter]:
    a = VllmLoraAdapter(vllm.url, timeout_seconds=10)
    yield a
    await a.close()


def test_adapter_vllm_lora_path_from_uri() -> None:
    assert lora_path("file:///models/v2%20a") == "/models/v2 a"
    assert lora_path("/models/v2") == "/models/v2"
    assert lora_path("s3://bucket/v2") == "s3://bucket/v2"


async def test_adapter_vllm_load_and_unload_are_idempotent(
    vllm: FakeVllmServer, adapter: VllmLoraAdapter
) -> None:
    assert await adapter.loaded() == {"base"}
    await adapter.load("v2", "file:///models/v2")
    assert vllm.adapters == {"v2": "/models/v2"}
    assert await adapter.loaded() == {"base", "v2"}
    # vLLM answers 400 "already loaded": the adapter sees it loaded and succeeds.
    await adapter.load("v2", "file:///models/v2")
    assert [r for r, _ in vllm.requests] == ["load", "load"]
    # The same name from a new artifact (a reused version name) is swapped in place.
    await adapter.load("v2", "file:///models/v2-retrained")
    assert vllm.adapters == {"v2": "/models/v2-retrained"}
    assert vllm.requests[-1] == (
        "load",
        {"lora_name": "v2", "lora_path": "/models/v2-retrained", "load_inplace": True},
    )
    await adapter.unload("v2")
    assert vllm.adapters == {}
    await adapter.unload("v2")  # 404: nothing to unload
    assert [r for r, _ in vllm.requests] == ["load", "load", "load", "load", "unload", "unload"]


async def test_adapter_vllm_errors_quote_the_server(
    vllm: FakeVllmServer, adapter: VllmLoraAdapter
) -> None:
    vllm.fail_next = 1
    with pytest.raises(AdapterError, match=r"load 'v2'.*HTTP 500: CUDA out of memory"):
        await adapter.load("v2", "/models/v2")
    assert vllm.adapters == {}
    with pytest.raises(AdapterError, match="artifact_uri is required"):
        await adapter.load("v3", "")
    await adapter.load("v2", "/models/v2")
    vllm.fail_next = 1
    with pytest.raises(AdapterError, match=r"unload 'v2'.*HTTP 500"):
        await adapter.unload("v2")
    assert "v2" in vllm.adapters


async def test_adapter_vllm_unreachable_server_is_an_adapter_error() -> None:
    a = VllmLoraAdapter(f"http://127.0.0.1:{free_port()}", timeout_seconds=5)
    try:
        with pytest.raises(AdapterError, match=r"vLLM at http://127\.0\.0\.1"):
            await a.load("v2", "/models/v2")
    finally:
        await a.close()


async def test_adapter_vllm_as_a_replica_follows_the_desired_state(
    tmp_path: Path, vllm: FakeVllmServer, adapter: VllmLoraAdapter
) -> None:
    port = free_port()
    app = SidecarApp(fixed_port_config(tmp_path / "data", port))
    await app.start()
    loop = await adapter_loop(adapter, f"127.0.0.1:{port}", "vllm-0", backoff_initial=0.02)
    try:
        await app.control.apply(
            DesiredState(
                revision=1,
                loaded=frozenset({"base", "v2"}),
                routes=(RouteSpec("base", 9000), RouteSpec("v2", 1000)),
                stable_version="base",
                artifacts={"v2": "file:///loras/v2"},
            )
        )
        async with asyncio.timeout(20):
            await app.control.wait_converged(1)
        assert vllm.adapters == {"v2": "/loras/v2"}
        assert loop.router.revision == 1
        await app.control.apply(
            DesiredState(
                revision=2,
                loaded=frozenset({"base"}),
                routes=(RouteSpec("base", 10000),),
                stable_version="base",
            )
        )
        async with asyncio.timeout(20):
            await app.control.wait_converged(2)
            while True:
                if not vllm.adapters:
                    break
                await asyncio.sleep(0.01)
        assert [r for r, _ in vllm.requests] == ["load", "unload"]
    finally:
        await loop.stop()
        await app.shutdown()


async def test_adapter_configured_in_the_daemon_recovers_a_restarted_server(
    tmp_path: Path, vllm: FakeVllmServer
) -> None:
    cfg = fixed_port_config(
        tmp_path / "data",
        free_port(),
        control={
            "retry_initial_seconds": 0.05,
            "adapter": {"kind": "vllm", "url": vllm.url, "resync_seconds": 0.05},
        },
    )
    app = SidecarApp(cfg)
    await app.start()
    try:
        await app.control.apply(
            DesiredState(
                revision=1,
                loaded=frozenset({"base", "v2"}),
                routes=(RouteSpec("base", 9000), RouteSpec("v2", 1000)),
                stable_version="base",
                artifacts={"v2": "/loras/v2"},
            )
        )
        async with asyncio.timeout(20):
            await app.control.wait_converged(1)
        assert vllm.adapters == {"v2": "/loras/v2"}
        vllm.adapters.clear()  # vLLM restarted and lost its runtime adapters
        async with asyncio.timeout(20):
            while True:
                if vllm.adapters == {"v2": "/loras/v2"}:
                    break
                await asyncio.sleep(0.02)
        assert [r for r, _ in vllm.requests] == ["load", "load"]
        assert app.status_dict()["details"]["control_adapter"]["resyncs"] >= 1
    finally:
        await app.shutdown()


def test_adapter_config_requires_a_url() -> None:
    from sidecar.errors import ConfigError

    with pytest.raises(ConfigError, match=r"control\.adapter.*url is required"):
        load_config(environ={}, overrides={"control": {"adapter": {"kind": "triton"}}})
