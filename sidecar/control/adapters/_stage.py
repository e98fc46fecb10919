"""AdapterStage: runs the configured adapter as a replica of this daemon."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from atlas_sidecar_client import ControlLoop

from sidecar._aio import cancel_and_wait, spawn
from sidecar.config import AdapterConfig
from sidecar.control.adapters._base import AdapterError, ModelServerAdapter
from sidecar.control.adapters._triton import TritonRepositoryAdapter
from sidecar.control.adapters._vllm import VllmLoraAdapter

__all__ = ["AdapterStage", "make_adapter"]

log = logging.getLogger(__name__)


def make_adapter(config: AdapterConfig) -> ModelServerAdapter | None:
    if config.kind == "vllm":
        return VllmLoraAdapter(config.url, timeout_seconds=config.timeout_seconds)
    if config.kind == "triton":
        return TritonRepositoryAdapter(
            config.url,
            repository_name=config.repository_name,
            timeout_seconds=config.timeout_seconds,
        )
    return None


class AdapterStage:
    """Connects the configured model server to this daemon's ControlService.

    The loop's Hello reports what the server has loaded; every
    ``resync_seconds`` the stage asks again, and when the server's set
    differs twice in a row from what the loop believes (the server restarted
    or was changed by hand) it reconnects with a fresh Hello so the sidecar
    reconciles it. An unreachable server is retried; it never stops the daemon.
    """

    def __init__(self, config: AdapterConfig, target: str, *, token: str | None = None) -> None:
        """``token``: what the adapter's ControlLoop sends (with auth on)."""
        self._config = config
        self._target = target
        self._token = token
        self._adapter = make_adapter(config)
        self._task: asyncio.Task[None] | None = None
        self._loop: ControlLoop | None = None
        self.resyncs = 0
        self.last_error = ""

    async def start(self) -> None:
        if self._adapter is None or self._task is not None:
            return
        self._task = spawn(self._run(self._adapter), stage="control", name="adapter")

    async def shutdown(self) -> None:
        """Safe before start and twice."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        if self._adapter is not None:
            await self._adapter.close()

    def status(self) -> dict[str, Any]:
        loop = self._loop
        return {
            "kind": self._config.kind,
            "url": self._config.url,
            "server_id": self._config.server_id,
            "connected": bool(loop and loop.connected),
            "loaded": sorted(loop.loaded) if loop else [],
            "resyncs": self.resyncs,
            "last_error": self.last_error or (loop.stats.last_error if loop else ""),
        }

    async def _run(self, adapter: ModelServerAdapter) -> None:
        period = self._config.resync_seconds
        while True:
            try:
                loaded = await adapter.loaded()
            except AdapterError as exc:
                self.last_error = str(exc)
                await asyncio.sleep(period)
                continue
            loop = self._loop = ControlLoop(
                self._target,
                self._config.server_id,
                on_load=adapter.load,
                on_unload=adapter.unload,
                loaded_versions=loaded,
                token=self._token or "",
            )
            await loop.start()
            try:
                await self._watch(adapter, loop, period)
            finally:
                await loop.stop()
            self.resyncs += 1

    async def _watch(self, adapter: ModelServerAdapter, loop: ControlLoop, period: float) -> None:
        strikes = 0
        while True:
            await asyncio.sleep(period)
            try:
                now = await adapter.loaded()
            except AdapterError as exc:
                self.last_error = str(exc)
                continue
            self.last_error = ""
            strikes = strikes + 1 if now != set(loop.loaded) else 0
            if strikes >= 2:
                log.warning("model server %s changed on its own; reconnecting", self._config.url)
                return
