"""What an adapter is: a model server's own admin API behind four methods."""

from __future__ import annotations

from typing import Protocol

from sidecar.errors import SidecarError

__all__ = ["AdapterError", "ModelServerAdapter"]


class AdapterError(SidecarError):
    """The model server refused or failed a request; the message names the
    server, the operation and the version, and quotes the server's reason."""


class ModelServerAdapter(Protocol):
    """Loads and unloads model versions on a server that cannot run the client library.

    Every method is idempotent: loading a loaded version and unloading an
    absent one succeed. Failures raise :class:`AdapterError`.
    """

    async def load(self, version: str, artifact_uri: str) -> None: ...

    async def unload(self, version: str) -> None: ...

    async def loaded(self) -> set[str]:
        """The versions the server has loaded and ready now."""
        ...

    async def close(self) -> None: ...
