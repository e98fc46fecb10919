"""An adapter as a sidecar replica, through the client library's ControlLoop."""

from __future__ import annotations

from atlas_sidecar_client import ControlLoop, Router

from sidecar.control.adapters._base import ModelServerAdapter

__all__ = ["adapter_loop"]


async def adapter_loop(
    adapter: ModelServerAdapter,
    target: str,
    server_id: str,
    *,
    router: Router | None = None,
    backoff_initial: float = 0.1,
    backoff_max: float = 5.0,
) -> ControlLoop:
    """A started ControlLoop whose loads and unloads go to ``adapter``.

    Its Hello reports what the server has loaded now (``adapter.loaded()``).

    Raises:
        AdapterError: the server cannot be asked what it has loaded.
    """
    loop = ControlLoop(
        target,
        server_id,
        router=router,
        on_load=adapter.load,
        on_unload=adapter.unload,
        loaded_versions=await adapter.loaded(),
        backoff_initial=backoff_initial,
        backoff_max=backoff_max,
    )
    await loop.start()
    return loop
