"""Real llama-server fixtures: the cached binary and model, two seeded LoRA adapters,
and one router shared by the module's tests (each version is a child process of
about 175 MB; starting them once keeps the suite light on two cores)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.testing import LlamaServerProcess, llama_server_binary, make_lora_adapter, smollm2_gguf


@pytest.fixture(scope="session")
def llama_binary() -> Path:
    return llama_server_binary()


@pytest.fixture(scope="session")
def base_model() -> Path:
    return smollm2_gguf()


@pytest.fixture(scope="session")
def adapters(tmp_path_factory: pytest.TempPathFactory, base_model: Path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("adapters")
    return {
        name: make_lora_adapter(folder / f"{name}.gguf", seed, base=base_model)
        for name, seed in (("a", 1), ("b", 2))
    }


@pytest.fixture(scope="module")
def router(
    tmp_path_factory: pytest.TempPathFactory,
    llama_binary: Path,
    base_model: Path,
    adapters: dict[str, Path],
) -> Iterator[LlamaServerProcess]:
    server = LlamaServerProcess.router(
        tmp_path_factory.mktemp("router"),
        {"base": None, "v1": adapters["a"], "v2": adapters["b"]},
        base=base_model,
        binary=llama_binary,
        models_max=4,
    )
    with server:
        for name in ("base", "v1", "v2"):
            server.load(name)
        yield server
