"""vLLM's runtime LoRA API: ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``.

The routes exist only when vLLM runs with ``--enable-lora`` and
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``. A model version is a LoRA adapter
name (requests pick it by ``model``); its artifact is the adapter's folder.
aiohttp is the HTTP client (already a dependency of the daemon for its web
stage; asyncio-native, with per-request timeouts).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote, urlparse

import aiohttp

from sidecar.control.adapters._base import AdapterError

__all__ = ["VllmLoraAdapter", "lora_path"]


def lora_path(artifact_uri: str) -> str:
    """The folder vLLM should load: ``file:///x`` -> ``/x``; other values as given."""
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file":
        return unquote(parsed.path)
    return artifact_uri


def _reason(status: int, body: str) -> str:
    """vLLM's error text from ``{"error": {"message": ...}}`` (or the older flat form)."""
    try:
        doc: Any = json.loads(body)
    except ValueError:
        return f"HTTP {status}: {body.strip()[:500]}"
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict) and err.get("message"):
        return f"HTTP {status}: {err['message']}"
    if isinstance(doc, dict) and doc.get("message"):
        return f"HTTP {status}: {doc['message']}"
    return f"HTTP {status}: {body.strip()[:500]}"


class VllmLoraAdapter:
    """Drives one vLLM server at ``base_url`` (for example ``http://127.0.0.1:8000``).

    ``loaded()`` lists ``/v1/models`` (the base model and every adapter).
    A 400 on load is success when the adapter turns out to be loaded already;
    a 404 on unload is success (nothing to unload).
    """

    def __init__(self, base_url: str, *, timeout_seconds: float = 120.0, api_key: str = "") -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        return self._session

    async def _post(self, route: str, body: dict[str, Any]) -> tuple[int, str]:
        try:
            async with self._http().post(self.base_url + route, json=body) as resp:
                return resp.status, await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AdapterError(
                f"vLLM at {self.base_url}{route}: {type(exc).__name__}: {exc}"
            ) from exc

    async def load(self, version: str, artifact_uri: str) -> None:
        path = lora_path(artifact_uri)
        if not path:
            raise AdapterError(f"vLLM load {version!r}: artifact_uri is required (the LoRA folder)")
        body: dict[str, Any] = {"lora_name": version, "lora_path": path}
        status, text = await self._post("/v1/load_lora_adapter", body)
        if status == 200:
            return
        if status == 400:
            roots = await self._roots()
            if roots.get(version) == path:
                return  # already loaded from this artifact
            if version in roots:
                # A reused version name with a new artifact: vLLM swaps it in place.
                status, text = await self._post(
                    "/v1/load_lora_adapter", {**body, "load_inplace": True}
                )
                if status == 200:
                    return
        raise AdapterError(f"vLLM load {version!r} from {path!r}: {_reason(status, text)}")

    async def unload(self, version: str) -> None:
        status, text = await self._post("/v1/unload_lora_adapter", {"lora_name": version})
        if status in (200, 404):
            return
        raise AdapterError(f"vLLM unload {version!r}: {_reason(status, text)}")

    async def loaded(self) -> set[str]:
        return set(await self._roots())

    async def _roots(self) -> dict[str, str]:
        """Every model ``/v1/models`` lists, with its ``root`` (an adapter's path)."""
        try:
            async with self._http().get(self.base_url + "/v1/models") as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise AdapterError(f"vLLM list models: {_reason(resp.status, text)}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AdapterError(f"vLLM at {self.base_url}/v1/models: {exc}") from exc
        try:
            data = json.loads(text)["data"]
            return {str(m["id"]): str(m.get("root") or "") for m in data}
        except (ValueError, KeyError, TypeError) as exc:
            raise AdapterError(f"vLLM list models: unexpected answer: {text[:200]}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
