"""The Triton repository adapter against a real MLServer 1.7.1 in its own virtualenv.

The first run creates ``.venv-mlserver`` (pip install, a few minutes); later
runs reuse it. ``ATLAS_MLSERVER_VENV`` points elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from sidecar.control.adapters import AdapterError, TritonRepositoryAdapter
from sidecar.testing import MLServerProcess, ensure_mlserver_venv

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("ATLAS_MLSERVER_VENV", ROOT / ".venv-mlserver"))


@pytest.fixture(scope="module")
def mlserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MLServerProcess]:
    binary = ensure_mlserver_venv(VENV)
    server = MLServerProcess(binary, tmp_path_factory.mktemp("mlserver"), ["m-v1", "m-v2"])
    server.start(timeout=120)
    yield server
    server.stop()


@pytest.fixture
async def adapter(mlserver: MLServerProcess) -> AsyncIterator[TritonRepositoryAdapter]:
    a = TritonRepositoryAdapter(mlserver.grpc_target, timeout_seconds=60)
    yield a
    for version in await a.loaded():
        await a.unload(version)
    await a.close()


async def test_adapter_triton_load_ready_unload(adapter: TritonRepositoryAdapter) -> None:
    assert await adapter.loaded() == set()
    assert await adapter.ready("m-v1") is False
    await adapter.load("m-v1", "")
    assert await adapter.ready("m-v1") is True
    assert await adapter.loaded() == {"m-v1"}
    await adapter.load("m-v1", "")  # loading again is harmless
    await adapter.load("m-v2", "")
    assert await adapter.loaded() == {"m-v1", "m-v2"}
    await adapter.unload("m-v1")
    assert await adapter.ready("m-v1") is False
    assert await adapter.loaded() == {"m-v2"}
    await adapter.unload("m-v1")  # not loaded: nothing to do


async def test_adapter_triton_unknown_model_is_an_error(adapter: TritonRepositoryAdapter) -> None:
    with pytest.raises(AdapterError, match=r"load 'm-missing'.*NOT_FOUND"):
        await adapter.load("m-missing", "")
    with pytest.raises(AdapterError, match=r"unload 'm-missing'.*NOT_FOUND"):
        await adapter.unload("m-missing")
    assert await adapter.loaded() == set()
