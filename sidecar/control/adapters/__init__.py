"""Adapters for model servers that cannot run the client library.

An adapter drives a server's own admin API (:class:`ModelServerAdapter`:
``load``, ``unload``, ``loaded``, ``close``); :func:`adapter_loop` connects it
to the sidecar as one replica through the client library's ``ControlLoop``,
so reconciliation, idempotency and retries are the same as for any server.
Traffic splits are acknowledged and held in the loop's Router for whoever
picks the model name per request (no server splits traffic by weight itself).
"""

from sidecar.control.adapters._base import AdapterError, ModelServerAdapter
from sidecar.control.adapters._loop import adapter_loop
from sidecar.control.adapters._proto import triton_grpc_service_pb2 as triton_pb2
from sidecar.control.adapters._proto import triton_grpc_service_pb2_grpc as triton_pb2_grpc
from sidecar.control.adapters._stage import AdapterStage, make_adapter
from sidecar.control.adapters._triton import TritonRepositoryAdapter
from sidecar.control.adapters._vllm import VllmLoraAdapter, lora_path

__all__ = [
    "AdapterError",
    "AdapterStage",
    "ModelServerAdapter",
    "TritonRepositoryAdapter",
    "VllmLoraAdapter",
    "adapter_loop",
    "lora_path",
    "make_adapter",
    "triton_pb2",
    "triton_pb2_grpc",
]
