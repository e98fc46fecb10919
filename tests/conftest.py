"""Shared fixtures: a real in-process daemon on loopback with a real LMDB."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from atlas_sidecar_client.pb import events_pb2

from sidecar.app import SidecarApp
from sidecar.config import SidecarConfig, load_config

# The tests' subprocesses must import the package from this checkout.
os.environ.setdefault("PYTHONUNBUFFERED", "1")


def make_config(data_dir: Path, **sections: dict[str, Any]) -> SidecarConfig:
    overrides: dict[str, Any] = {
        "server": {"listen": ["127.0.0.1:0"], "http_listen": "", "grace_seconds": 5},
        "store": {"data_dir": str(data_dir)},
    }
    for name, values in sections.items():
        overrides.setdefault(name, {}).update(values)
    return load_config(None, environ={}, overrides=overrides)


@pytest.fixture
def app_factory(tmp_path: Path) -> Callable[..., Any]:
    created: list[SidecarApp] = []

    async def make(**sections: dict[str, Any]) -> SidecarApp:
        app = SidecarApp(make_config(tmp_path / "data", **sections))
        await app.start()
        created.append(app)
        return app

    yield make
    # apps are shut down by the async fixture below or the test itself


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[SidecarApp]:
    app = SidecarApp(make_config(tmp_path / "data"))
    await app.start()
    try:
        yield app
    finally:
        await app.shutdown()


def target_of(app: SidecarApp) -> str:
    port = next(p for addr, p in app.ports.items() if addr not in ("http", "metrics"))
    return f"127.0.0.1:{port}"


@pytest.fixture
async def channel(app: SidecarApp) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(target_of(app)) as ch:
        yield ch


def inference(event_id: str, request_id: str = "r", **fields: Any) -> events_pb2.Event:
    fields.setdefault("model_version", "v1")
    return events_pb2.Event(
        event_id=event_id, inference=events_pb2.Inference(request_id=request_id, **fields)
    )


def feedback(event_id: str, request_id: str = "r", **fields: Any) -> events_pb2.Event:
    return events_pb2.Event(
        event_id=event_id, feedback=events_pb2.Feedback(request_id=request_id, **fields)
    )
