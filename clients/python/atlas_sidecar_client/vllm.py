"""Inside vLLM's own API server: the gateway's capture with no extra hop.

::

    ATLAS_SIDECAR_ADDR=127.0.0.1:50051 ATLAS_SIDECAR_TOKEN=... \\
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True \\
    vllm serve BASE --enable-lora --middleware atlas_sidecar_client.vllm.AtlasMiddleware

A pure ASGI middleware (no framework). On ``POST /v1/chat/completions`` and
``/v1/completions`` it picks the version with the client library's Router
(sticky on ``x-session-id``, the body's ``user``, or the request id), puts it in
the body's ``model``, passes the answer through untouched (streamed chunks as
they come) with ``x-request-id`` and ``x-atlas-version`` added, and records one
Inference after the last byte went out. ``POST /v1/feedback`` takes feedback
as the gateway does. A ControlLoop, started on the first request in vLLM's
own event loop, installs splits and loads or unloads adapters through vLLM's
runtime LoRA routes on the same server. Nothing here blocks the loop:
events go to a bounded queue sent by the EventStream's own threads.

Settings (environment, read at start): ``ATLAS_SIDECAR_ADDR`` (default
``127.0.0.1:50051``), ``ATLAS_SIDECAR_TOKEN``, ``ATLAS_SIDECAR_SERVER_ID``
(default: the host name), ``ATLAS_SIDECAR_BASE_MODEL`` (the version that needs
no adapter), ``ATLAS_SIDECAR_MAX_BODY_BYTES`` (default 4 MiB). Shadow
mirroring needs the gateway: a mirror inside the server would compete with
the live request for the same slots.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from atlas_sidecar_client._control import ControlLoop
from atlas_sidecar_client._events import EventStream
from atlas_sidecar_client._feedback import MAX_FEEDBACK_BYTES, BadFeedback, parse_feedback
from atlas_sidecar_client._ids import uuid7
from atlas_sidecar_client._json import JSONDecodeError, loads
from atlas_sidecar_client._openai import Answer, StreamAccumulator, answer_of, prompt_of
from atlas_sidecar_client._router import Router

__all__ = ["AtlasMiddleware"]

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_COMPLETIONS = {"/v1/chat/completions": True, "/v1/completions": False}


def _json_body(doc: Any) -> bytes:
    import json

    return json.dumps(doc).encode()


class AtlasMiddleware:
    """``vllm serve ... --middleware atlas_sidecar_client.vllm.AtlasMiddleware``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        sidecar: str | None = None,
        server_id: str | None = None,
        token: str | None = None,
        base_model: str | None = None,
        events: EventStream | None = None,
    ) -> None:
        env = os.environ
        self.app = app
        self.sidecar = sidecar or env.get("ATLAS_SIDECAR_ADDR", "127.0.0.1:50051")
        self.server_id = server_id or env.get("ATLAS_SIDECAR_SERVER_ID", socket.gethostname())
        self.base_model = base_model or env.get("ATLAS_SIDECAR_BASE_MODEL", "")
        self.max_body = int(env.get("ATLAS_SIDECAR_MAX_BODY_BYTES", str(4 * 1024 * 1024)))
        self._token = token
        self.router = Router(default_version=self.base_model)
        self.events = events or EventStream(self.sidecar, token=token)
        self.control: ControlLoop | None = None
        self.counters: dict[str, int] = {}
        self._self_url = ""
        self._starting: asyncio.Lock | None = None

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    # -- the control loop, in vLLM's own loop ----------------------------------

    async def _ensure_control(self, scope: Scope) -> None:
        if self.control is not None:
            return
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self.control is not None:
                return
            server = scope.get("server") or ("127.0.0.1", 8000)
            host = server[0] if server[0] not in ("0.0.0.0", "::", "") else "127.0.0.1"
            self._self_url = f"http://{host}:{server[1]}"
            self.control = ControlLoop(
                self.sidecar,
                self.server_id,
                router=self.router,
                on_load=self._load,
                on_unload=self._unload,
                token=self._token,
                loaded_versions=[self.base_model] if self.base_model else [],
            )
            await self.control.start()

    async def _lora(self, route: str, body: dict[str, Any]) -> tuple[int, str]:
        import aiohttp  # vLLM depends on it; the client library does not

        timeout = aiohttp.ClientTimeout(total=300)
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.post(self._self_url + route, json=body) as r,
        ):
            return r.status, await r.text()

    async def _load(self, version: str, artifact_uri: str) -> None:
        path = artifact_uri[7:] if artifact_uri.startswith("file://") else artifact_uri
        status, text = await self._lora(
            "/v1/load_lora_adapter", {"lora_name": version, "lora_path": path}
        )
        if status == 400 and "already" in text.lower():
            # The name is reused for a new artifact: vLLM replaces it in place.
            status, text = await self._lora(
                "/v1/load_lora_adapter",
                {"lora_name": version, "lora_path": path, "load_inplace": True},
            )
        if status != 200:
            raise RuntimeError(f"vLLM load {version!r}: HTTP {status}: {text[:300]}")

    async def _unload(self, version: str) -> None:
        status, text = await self._lora("/v1/unload_lora_adapter", {"lora_name": version})
        if status not in (200, 404):
            raise RuntimeError(f"vLLM unload {version!r}: HTTP {status}: {text[:300]}")

    # -- ASGI ------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path in _COMPLETIONS:
            await self._ensure_control(scope)
            await self._completion(scope, receive, send, _COMPLETIONS[path])
        elif path == "/v1/feedback":
            await self._feedback(receive, send)
        else:
            await self.app(scope, receive, send)

    async def _read_body(self, receive: Receive, limit: int) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not msg.get("more_body"):
                return b"".join(chunks)

    @staticmethod
    async def _reply(send: Send, status: int, doc: Any) -> None:
        body = _json_body(doc)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _feedback(self, receive: Receive, send: Send) -> None:
        raw = await self._read_body(receive, MAX_FEEDBACK_BYTES)
        try:
            if raw is None:
                raise BadFeedback(f"body: larger than {MAX_FEEDBACK_BYTES} bytes")
            f = parse_feedback(raw)
        except BadFeedback as exc:
            self._count("feedback_bad")
            await self._reply(send, 400, {"error": {"message": str(exc)}})
            return
        self.events.record_feedback(
            f.request_id,
            signal=f.signal,
            rating=f.rating,
            dwell_ms=f.dwell_ms,
            correction=f.correction,
            user_id=f.user_id,
            session_id=f.session_id,
        )
        self._count("feedback")
        await self._reply(send, 202, {"ok": True})

    async def _completion(self, scope: Scope, receive: Receive, send: Send, chat: bool) -> None:
        started = time.perf_counter()
        raw = await self._read_body(receive, self.max_body)
        if raw is None:
            self._count("too_large")
            await self._reply(send, 413, {"error": {"message": "body too large"}})
            return
        try:
            body = loads(raw)
        except JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            # Not ours to judge: vLLM answers it with its own error.
            await self.app(scope, _replay(raw, receive), send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = headers.get("x-request-id") or uuid7()
        session = headers.get("x-session-id") or (
            body["user"] if isinstance(body.get("user"), str) else ""
        )
        decision = self.router.route(request_id, session_id=session or request_id)
        if decision.version:
            body["model"] = decision.version
        version = str(body.get("model") or "")
        prompt = prompt_of(body, chat)
        streamed = bool(body.get("stream"))
        new_headers = [
            (k, v)
            for k, v in scope["headers"]
            if k.lower() not in (b"content-length", b"x-request-id")
        ]
        out = _json_body(body)
        new_headers += [
            (b"content-length", str(len(out)).encode()),
            (b"x-request-id", request_id.encode()),
        ]
        inner = dict(scope)
        inner["headers"] = new_headers
        acc = StreamAccumulator(chat)
        whole = bytearray()
        state: dict[str, Any] = {"status": 200, "sse": False, "first": None, "done": False}

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message.get("status", 200)
                hdrs = list(message.get("headers", []))
                state["sse"] = any(
                    k.lower() == b"content-type" and b"event-stream" in v for k, v in hdrs
                )
                hdrs += [
                    (b"x-request-id", request_id.encode()),
                    (b"x-atlas-version", version.encode()),
                ]
                message = {**message, "headers": hdrs}
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if chunk and state["first"] is None:
                    state["first"] = (time.perf_counter() - started) * 1000
                if state["sse"]:
                    acc.feed(chunk)
                elif len(whole) < 4 * 1024 * 1024:
                    whole.extend(chunk)
                if not message.get("more_body"):
                    state["done"] = True
            await send(message)

        try:
            await self.app(inner, _replay(out, receive), capture)
        finally:
            answer: Answer
            if state["sse"]:
                answer = acc.answer
            else:
                try:
                    answer = answer_of(loads(bytes(whole)), chat) if whole else Answer()
                except JSONDecodeError:
                    answer = Answer()
            attrs = {"endpoint": "chat" if chat else "completions", "capture": "vllm-middleware"}
            if streamed:
                attrs["stream"] = "true"
            if state["first"] is not None and streamed:
                attrs["ttft_ms"] = f"{state['first']:.3f}"
            if not state["done"]:
                attrs["partial"] = "client"
            if answer.finish_reason:
                attrs["finish_reason"] = answer.finish_reason
            status = int(state["status"])
            self.events.record_inference(
                request_id,
                version,
                prompt,
                answer.text,
                latency_ms=(time.perf_counter() - started) * 1000,
                error=status >= 400,
                error_code=str(status) if status >= 400 else "",
                token_logprobs=answer.logprobs,
                session_id=session,
                user_id=body.get("user", "") if isinstance(body.get("user"), str) else "",
                attributes=attrs,
            )
            self._count("recorded")


def _replay(body: bytes, upstream: Receive) -> Receive:
    """A receive() that gives ``body`` once, then the client's own messages (its disconnect)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await upstream()

    return receive
