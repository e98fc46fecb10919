"""How each kind of upstream takes a version: the body rewrite and the adapter.

A version reaches the model server in the request body: ``model`` is the
version's name (vLLM, LoRAX, llama-server router mode, any OpenAI server),
``base:version`` (SGLang), or an explicit ``lora`` list that sets every
adapter's scale (llama-server single mode: it ignores unknown ids and applies
every adapter when no list is sent, so the full list always goes). Loading and
unloading goes through a :class:`~sidecar.control.adapters.ModelServerAdapter`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from sidecar.config import GatewayConfig
from sidecar.control.adapters import AdapterError, ModelServerAdapter, VllmLoraAdapter, lora_path

__all__ = ["Backend", "make_backend"]


def _says_unknown(status: int, text: str) -> bool:
    t = text.lower()
    return status in (400, 404) and any(
        s in t for s in ("not found", "not loaded", "does not exist", "unknown model", "no adapter")
    )


class Backend:
    """``openai``: ``model`` = version; nothing to load (the server has its models)."""

    name = "openai"

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.upstream = config.upstream.rstrip("/")

    def rewrite(self, body: dict[str, Any], version: str) -> None:
        body["model"] = version

    def unknown_version(self, status: int, text: str) -> bool:
        """True when the upstream answered that the routed version is not there."""
        return _says_unknown(status, text)

    def adapter(self) -> ModelServerAdapter | None:
        return None

    def initial_versions(self) -> list[str]:
        return list(self.config.versions)


class VllmBackend(Backend):
    name = "vllm"

    def adapter(self) -> ModelServerAdapter | None:
        return VllmLoraAdapter(self.upstream, api_key=self.config.upstream_api_key)


class LoraxBackend(Backend):
    """LoRAX loads an adapter the first time a request names it: load = validate and warm."""

    name = "lorax"

    def adapter(self) -> ModelServerAdapter | None:
        return _LoraxAdapter(self.upstream)


class SglangBackend(Backend):
    name = "sglang"

    def rewrite(self, body: dict[str, Any], version: str) -> None:
        base = self.config.base_model
        body["model"] = f"{base}:{version}" if base and version != base else version

    def adapter(self) -> ModelServerAdapter | None:
        return _SglangAdapter(self.upstream, self.config.base_model)


class LlamaRouterBackend(Backend):
    """llama-server router mode: a presets section per version, loaded by name."""

    name = "llama-router"

    def adapter(self) -> ModelServerAdapter | None:
        return _LlamaRouterAdapter(self.upstream, self.config.presets_file)


class LlamaLoraBackend(Backend):
    """llama-server single mode: the adapters given at start, chosen by a full ``lora`` list."""

    name = "llama-lora"

    def rewrite(self, body: dict[str, Any], version: str) -> None:
        body["lora"] = [
            {"id": i, "scale": 1.0 if name == version else 0.0}
            for i, name in enumerate(self.config.versions)
        ]
        body.setdefault("model", version)

    def unknown_version(self, status: int, text: str) -> bool:
        return False  # it never says so: unknown ids answer with the base model

    def adapter(self) -> ModelServerAdapter | None:
        return _FixedAdapter(
            [*self.config.versions, *([self.config.base_model] if self.config.base_model else [])]
        )


_BACKENDS: dict[str, type[Backend]] = {
    b.name: b
    for b in (
        Backend,
        VllmBackend,
        LoraxBackend,
        SglangBackend,
        LlamaRouterBackend,
        LlamaLoraBackend,
    )
}


def make_backend(config: GatewayConfig) -> Backend:
    """The backend named by ``gateway.backend`` (validated by the config)."""
    return _BACKENDS[config.backend](config)


# -- adapters for servers the daemon's own adapters do not cover -------------------


class _HttpAdapter:
    def __init__(self, base_url: str, what: str) -> None:
        self.base_url = base_url
        self._what = what
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        return self._session

    async def _call(self, method: str, route: str, body: Any = None) -> tuple[int, str]:
        try:
            async with self._http().request(method, self.base_url + route, json=body) as r:
                return r.status, await r.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AdapterError(f"{self._what} at {self.base_url}{route}: {exc}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class _SglangAdapter(_HttpAdapter):
    """SGLang: ``POST /load_lora_adapter`` and ``/unload_lora_adapter`` (no ``/v1``)."""

    def __init__(self, base_url: str, base_model: str) -> None:
        super().__init__(base_url, "SGLang")
        self._loaded: set[str] = {base_model} if base_model else set()

    async def load(self, version: str, artifact_uri: str) -> None:
        status, text = await self._call(
            "POST",
            "/load_lora_adapter",
            {"lora_name": version, "lora_path": lora_path(artifact_uri)},
        )
        if status != 200 or '"success":false' in text.replace(" ", ""):
            raise AdapterError(f"SGLang load {version!r}: HTTP {status}: {text[:300]}")
        self._loaded.add(version)

    async def unload(self, version: str) -> None:
        status, text = await self._call("POST", "/unload_lora_adapter", {"lora_name": version})
        if status not in (200, 400, 404):
            raise AdapterError(f"SGLang unload {version!r}: HTTP {status}: {text[:300]}")
        self._loaded.discard(version)

    async def loaded(self) -> set[str]:
        return set(self._loaded)


class _LoraxAdapter(_HttpAdapter):
    """LoRAX loads on first use; load sends a one-token request to validate and warm it."""

    def __init__(self, base_url: str) -> None:
        super().__init__(base_url, "LoRAX")
        self._loaded: set[str] = set()

    async def load(self, version: str, artifact_uri: str) -> None:
        body = {
            "inputs": "ok",
            "parameters": {"adapter_id": lora_path(artifact_uri) or version, "max_new_tokens": 1},
        }
        status, text = await self._call("POST", "/generate", body)
        if status != 200:
            raise AdapterError(f"LoRAX load {version!r}: HTTP {status}: {text[:300]}")
        self._loaded.add(version)

    async def unload(self, version: str) -> None:
        self._loaded.discard(version)

    async def loaded(self) -> set[str]:
        return set(self._loaded)


class _FixedAdapter:
    """llama-server single mode: the versions are the adapters it was started with."""

    def __init__(self, versions: list[str]) -> None:
        self._versions = set(versions)

    async def load(self, version: str, artifact_uri: str) -> None:
        if version not in self._versions:
            raise AdapterError(
                f"llama-server single mode cannot load {version!r} at run time: restart it "
                "with the adapter in --lora and its name in gateway.versions, or run it in "
                "router mode (--backend llama-router)"
            )

    async def unload(self, version: str) -> None:
        return None

    async def loaded(self) -> set[str]:
        return set(self._versions)

    async def close(self) -> None:
        return None


class _LlamaRouterAdapter(_HttpAdapter):
    """llama-server router mode: one presets section per version.

    load: append ``[version]`` with the base ``model`` and the version's
    ``lora`` to the presets file, ``GET /models?reload=1``,
    ``POST /models/load``, then poll ``GET /models`` until it is loaded.
    ``loaded()`` reads ``/models`` (``/v1/models`` lists every preset,
    loaded or not).
    """

    def __init__(
        self, base_url: str, presets_file: Path | None, *, load_timeout: float = 120.0
    ) -> None:
        super().__init__(base_url, "llama-server")
        self._presets = presets_file
        self._timeout = load_timeout

    async def _models(self) -> list[dict[str, Any]]:
        import orjson

        status, text = await self._call("GET", "/models")
        if status != 200:
            raise AdapterError(f"llama-server /models: HTTP {status}: {text[:300]}")
        try:
            doc = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise AdapterError(f"llama-server /models: not JSON: {text[:200]}") from exc
        data = doc.get("data", doc.get("models", [])) if isinstance(doc, dict) else doc
        return [m for m in data if isinstance(m, dict)] if isinstance(data, list) else []

    @staticmethod
    def _state(model: dict[str, Any]) -> str:
        status = model.get("status")
        if isinstance(status, dict):
            return str(status.get("value", ""))
        return str(status or "")

    async def loaded(self) -> set[str]:
        return {
            str(m.get("id") or m.get("name"))
            for m in await self._models()
            if self._state(m) == "loaded"
        }

    def _add_preset(self, version: str, artifact_uri: str) -> None:
        """Adds (or points at a new adapter) the version's section of the presets INI.

        The file is edited as lines, not through configparser: llama-server's
        presets start with keys outside any section (``version = 1``).
        """
        if self._presets is None:
            raise AdapterError(
                f"llama-server load {version!r}: gateway.presets_file is not set (the INI "
                "llama-server was started with --models-preset)"
            )
        lora = lora_path(artifact_uri)
        try:
            lines = self._presets.read_text().splitlines()
        except OSError as exc:
            raise AdapterError(f"llama-server presets {self._presets}: {exc.strerror}") from exc
        sections: dict[str, dict[str, int]] = {}
        current = ""
        for i, line in enumerate(lines):
            text = line.strip()
            if text.startswith("[") and text.endswith("]"):
                current = text[1:-1].strip()
                sections.setdefault(current, {"_start": i})
            elif "=" in text and current and not text.startswith((";", "#")):
                key = text.split("=", 1)[0].strip()
                sections[current][key] = i

        def value(section: str, key: str) -> str:
            at = sections.get(section, {}).get(key)
            return lines[at].split("=", 1)[1].strip() if at is not None else ""

        if version in sections:
            at = sections[version].get("lora")
            if at is not None:
                lines[at] = f"lora = {lora}"
            else:
                lines.insert(sections[version]["_start"] + 1, f"lora = {lora}")
        else:
            base = value("*", "model") or next(
                (value(n, "model") for n in sections if n != "*" and "lora" not in sections[n]),
                "",
            )
            lines += (
                ["", f"[{version}]"] + ([f"model = {base}"] if base else []) + [f"lora = {lora}"]
            )
        tmp = self._presets.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self._presets)

    async def load(self, version: str, artifact_uri: str) -> None:
        if artifact_uri:
            self._add_preset(version, artifact_uri)
            await self._call("GET", "/models?reload=1")
        status, text = await self._call("POST", "/models/load", {"model": version})
        if status != 200 and "already" not in text.lower():
            raise AdapterError(f"llama-server load {version!r}: HTTP {status}: {text[:300]}")
        deadline = asyncio.get_running_loop().time() + self._timeout
        while asyncio.get_running_loop().time() < deadline:
            if version in await self.loaded():
                return
            await asyncio.sleep(0.1)
        raise AdapterError(f"llama-server load {version!r}: not loaded after {self._timeout:.0f} s")

    async def unload(self, version: str) -> None:
        status, text = await self._call("POST", "/models/unload", {"model": version})
        if status not in (200, 400, 404):
            raise AdapterError(f"llama-server unload {version!r}: HTTP {status}: {text[:300]}")
