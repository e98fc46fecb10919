"""Helpers for tests of code that uses the sidecar: a real daemon in a subprocess,
model servers for the control adapters (a vLLM-compatible LoRA API, a real MLServer,
a real llama-server with LoRA versions)."""

from sidecar.testing._control import FakeControlPlane, SentProbe
from sidecar.testing._daemon import (
    TEST_TOKEN_ROLES,
    DaemonProcess,
    ReadyProcess,
    free_port,
    write_test_tokens,
)
from sidecar.testing._llama import (
    LLAMA_CPP_VERSION,
    LlamaServerError,
    LlamaServerProcess,
    llama_server_binary,
    llama_tools_dir,
    make_lora_adapter,
    sidecar_cache_dir,
    smollm2_gguf,
)
from sidecar.testing._mlserver import MLSERVER_REQUIREMENTS, MLServerProcess, ensure_mlserver_venv
from sidecar.testing._vllm import FakeVllmServer

__all__ = [
    "LLAMA_CPP_VERSION",
    "MLSERVER_REQUIREMENTS",
    "TEST_TOKEN_ROLES",
    "DaemonProcess",
    "FakeControlPlane",
    "FakeVllmServer",
    "LlamaServerError",
    "LlamaServerProcess",
    "MLServerProcess",
    "ReadyProcess",
    "SentProbe",
    "ensure_mlserver_venv",
    "free_port",
    "llama_server_binary",
    "llama_tools_dir",
    "make_lora_adapter",
    "sidecar_cache_dir",
    "smollm2_gguf",
    "write_test_tokens",
]
