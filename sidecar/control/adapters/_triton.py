"""The Triton model-repository gRPC API (``inference.GRPCInferenceService``).

Triton (with ``--model-control-mode=explicit``) and MLServer serve it. A
model version is a model name in the server's repository; the artifact must
already be in the repository (the artifact URI is not sent).
"""

from __future__ import annotations

import grpc
import grpc.aio

from sidecar.control.adapters._base import AdapterError
from sidecar.control.adapters._proto import (
    triton_grpc_service_pb2 as pb,
)
from sidecar.control.adapters._proto import (
    triton_grpc_service_pb2_grpc as pb_grpc,
)

__all__ = ["TritonRepositoryAdapter"]

#: Triton says READY; MLServer's gRPC index says State.READY.
_READY = frozenset({"READY", "State.READY"})


class TritonRepositoryAdapter:
    """Drives one Triton-protocol server at ``target`` (``host:port``).

    ``load`` returns only once ``ModelReady`` says the model is ready. An
    unknown model fails with the server's NOT_FOUND reason; unloading a model
    that is not loaded succeeds.
    """

    def __init__(
        self, target: str, *, repository_name: str = "", timeout_seconds: float = 120.0
    ) -> None:
        self.target = target
        self._repo = repository_name
        self._timeout = timeout_seconds
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.GRPCInferenceServiceStub | None = None

    def _grpc(self) -> pb_grpc.GRPCInferenceServiceStub:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self.target)
            self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub

    def _error(self, op: str, version: str, exc: grpc.aio.AioRpcError) -> AdapterError:
        return AdapterError(
            f"Triton {op} {version!r} at {self.target}: {exc.code().name}: {exc.details()}"
        )

    async def load(self, version: str, artifact_uri: str) -> None:
        request = pb.RepositoryModelLoadRequest(repository_name=self._repo, model_name=version)
        try:
            await self._grpc().RepositoryModelLoad(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._error("load", version, exc) from exc
        if not await self.ready(version):
            raise AdapterError(f"Triton load {version!r} at {self.target}: loaded but not ready")

    async def unload(self, version: str) -> None:
        request = pb.RepositoryModelUnloadRequest(repository_name=self._repo, model_name=version)
        try:
            await self._grpc().RepositoryModelUnload(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            # Not loaded is fine (unload is idempotent); not in the
            # repository at all is an error worth reporting.
            if exc.code() == grpc.StatusCode.NOT_FOUND and version in await self._index(False):
                return
            raise self._error("unload", version, exc) from exc

    async def ready(self, version: str) -> bool:
        """``ModelReady``: False for a model that is not loaded.

        Raises:
            AdapterError: any other error from the server.
        """
        try:
            resp = await self._grpc().ModelReady(
                pb.ModelReadyRequest(name=version), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            # Triton answers NOT_FOUND; MLServer 1.7 answers UNKNOWN naming
            # its ModelNotFound error.
            details = exc.details() or ""
            if exc.code() == grpc.StatusCode.NOT_FOUND or (
                exc.code() == grpc.StatusCode.UNKNOWN and "ModelNotFound" in details
            ):
                return False
            raise self._error("ready", version, exc) from exc
        return bool(resp.ready)

    async def _index(self, ready: bool) -> set[str]:
        request = pb.RepositoryIndexRequest(repository_name=self._repo, ready=ready)
        try:
            resp = await self._grpc().RepositoryIndex(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise self._error("index", "", exc) from exc
        if not ready:
            return {m.name for m in resp.models}
        return {m.name for m in resp.models if m.state in _READY}

    async def loaded(self) -> set[str]:
        return await self._index(True)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = None
        self._stub = None
