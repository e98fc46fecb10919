"""The gateway: an OpenAI-compatible reverse proxy that is one more replica to the sidecar.

Per request on ``POST /v1/chat/completions`` and ``/v1/completions``:

1. the request id (the caller's ``x-request-id``, else a UUIDv7) and the
   sticky key (``x-session-id``, else the body's ``user``, else
   ``gateway.sticky_header``, else the request id);
2. the version, from the client library's :class:`Router` (the same bucket,
   routes and mirroring as every other replica), put into the body the way
   the backend takes it;
3. the upstream's answer, passed to the caller as it comes (a streamed one
   chunk by chunk, with an idle limit per chunk rather than a total one);
4. after the answer is sent: one ``Inference`` event, then, when the split
   mirrors this request, the shadow's answer, recorded as SHADOW under the
   same request id and never shown.

Every other path passes through unchanged. ``POST /v1/feedback`` takes user
feedback; ``GET /atlas/gateway/status`` shows the gateway's counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import Counter, OrderedDict
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from atlas_sidecar_client import ControlLoop, EventStream, Role, Router, Signal, uuid7
from atlas_sidecar_client.openai import (
    MAX_FEEDBACK_BYTES,
    Answer,
    BadFeedback,
    StreamAccumulator,
    answer_of,
    parse_feedback,
    prompt_of,
)

from sidecar.config import GatewayConfig
from sidecar.gateway._backends import Backend, make_backend

__all__ = ["Gateway"]

log = logging.getLogger(__name__)

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_COMPLETIONS = {"/v1/chat/completions": True, "/v1/completions": False}


class _UpstreamFailed(Exception):
    """The upstream could not be reached or broke off; the client gets a 502."""


def _error(status: int, message: str, *, param: str | None = None, kind: str = "") -> web.Response:
    doc = {
        "error": {
            "message": message,
            "type": kind or ("invalid_request_error" if status < 500 else "upstream_error"),
            "param": param,
            "code": status,
        }
    }
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json")


def _forward_headers(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}


class Gateway:
    """One gateway process's state: router, event stream, control loop, HTTP."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        events: EventStream | None = None,
        token: str | None = None,
    ) -> None:
        self.config = config
        self.backend: Backend = make_backend(config)
        self.upstream = config.upstream.rstrip("/")
        initial = self.backend.initial_versions()
        self.router = Router(default_version=config.base_model or (initial[0] if initial else ""))
        self.counters: Counter[str] = Counter()
        self._token = token
        self._events = events
        self._own_events = events is None
        self._control: ControlLoop | None = None
        self._adapter = self.backend.adapter()
        self._http: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._mirrors = asyncio.Semaphore(max(1, config.max_concurrent_mirrors))
        self._mirror_tasks: set[asyncio.Task[None]] = set()
        self._recent: OrderedDict[str, tuple[str, str, float]] = OrderedDict()
        self.port: int | None = None
        self.app = web.Application(client_max_size=config.max_body_bytes)
        r = self.app.router
        for path in _COMPLETIONS:
            r.add_post(path, self._completion)
        r.add_post("/v1/feedback", self._feedback)
        r.add_route("OPTIONS", "/v1/feedback", self._preflight)
        r.add_get("/atlas/gateway/status", self._status)
        r.add_route("*", "/{tail:.*}", self._passthrough)

    # -- lifecycle -------------------------------------------------------------

    @property
    def events(self) -> EventStream:
        assert self._events is not None, "the gateway is not started"
        return self._events

    async def start(self) -> None:
        """Connects to the sidecar (in the background) and serves HTTP."""
        cfg = self.config
        from atlas_sidecar_client import ChannelSecurity

        security = ChannelSecurity(
            token=self._token, ca_file=cfg.sidecar_ca_file if cfg.sidecar_ca_file else None
        )
        if self._events is None:
            self._events = EventStream(cfg.sidecar, security=security)
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            auto_decompress=False,
            # The upstream's cookies are the caller's business: passed through, never kept.
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        loaded: list[str] = []
        if self._adapter is not None:
            try:
                loaded = sorted(await self._adapter.loaded())
            except Exception as exc:  # the upstream may start after the gateway
                log.warning("cannot ask the upstream what it has loaded yet: %s", exc)
        else:
            loaded = self.backend.initial_versions()
        self._control = ControlLoop(
            cfg.sidecar,
            cfg.server_id,
            router=self.router,
            on_load=self._adapter.load if self._adapter is not None else None,
            on_unload=self._adapter.unload if self._adapter is not None else None,
            on_probe=self._probe,
            events=self._events,
            loaded_versions=loaded,
            security=security,
        )
        await self._control.start()
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        host, _, port = cfg.listen.rpartition(":")
        site = web.TCPSite(self._runner, host or "127.0.0.1", int(port), reuse_port=False)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """Stops taking requests, lets mirrors finish briefly, flushes events. Safe twice."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._mirror_tasks:
            await asyncio.wait(list(self._mirror_tasks), timeout=5)
        if self._control is not None:
            await self._control.stop()
            self._control = None
        if self._adapter is not None:
            await self._adapter.close()
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._events is not None and self._own_events:
            await self._events.aclose(5.0)
            self._events = None

    # -- upstream ----------------------------------------------------------------

    @property
    def _response_timeout(self) -> aiohttp.ClientTimeout:
        # sock_read restarts with every byte: a whole answer is bounded by
        # response_timeout_seconds of silence, not in total.
        return aiohttp.ClientTimeout(
            total=None, sock_connect=10, sock_read=self.config.response_timeout_seconds
        )

    @property
    def _stream_timeout(self) -> aiohttp.ClientTimeout:
        # A streamed answer may pause at most chunk_idle_seconds between chunks.
        cfg = self.config
        return aiohttp.ClientTimeout(
            total=None,
            sock_connect=10,
            sock_read=min(cfg.chunk_idle_seconds, cfg.response_timeout_seconds),
        )

    async def _send(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        *,
        streamed: bool = False,
    ) -> aiohttp.ClientResponse:
        """Sends one request upstream; once more if a pooled connection died before any byte.

        llama-server closes its connection after every streamed answer; the
        next request on that pooled connection fails before the server saw
        it, so resending is safe.
        """
        assert self._http is not None
        for attempt in (1, 2):
            try:
                return await self._http.request(
                    method,
                    self.upstream + path,
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    timeout=self._stream_timeout if streamed else self._response_timeout,
                )
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                if attempt == 2 or isinstance(exc, aiohttp.ClientConnectorError):
                    raise _UpstreamFailed(f"{type(exc).__name__}: {exc}") from exc
                self.counters["upstream_resends"] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise _UpstreamFailed(f"{type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")

    # -- the OpenAI routes -------------------------------------------------------

    def _sticky(self, request: web.Request, body: dict[str, Any]) -> str:
        session = request.headers.get("x-session-id", "")
        if not session and isinstance(body.get("user"), str):
            session = body["user"]
        if not session and self.config.sticky_header:
            session = request.headers.get(self.config.sticky_header, "")
        return session

    def _retry_of(self, session: str, prompt: str, request_id: str) -> str:
        """The request this one repeats (same session, same prompt, within the window)."""
        window = self.config.retry_window_seconds
        if not session or window <= 0:
            return ""
        digest = hashlib.sha256(prompt.encode()).hexdigest()
        now = time.monotonic()
        before = self._recent.pop(session, None)
        self._recent[session] = (digest, request_id, now)
        while len(self._recent) > self.config.retry_tracked_sessions:
            self._recent.popitem(last=False)
        if before is not None and before[0] == digest and now - before[2] <= window:
            return before[1]
        return ""

    def _logprobs(self, body: dict[str, Any], chat: bool) -> bool:
        mode = self.config.logprobs
        if mode == "never":
            return False
        if mode == "always":
            if chat:
                body["logprobs"] = True
            elif not body.get("logprobs"):
                body["logprobs"] = 1
            return True
        return bool(body.get("logprobs"))

    async def _read_body(self, request: web.Request) -> bytes | web.Response:
        """The request body, or the 413 to answer when it is over gateway.max_body_bytes."""
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            self.counters["too_large"] += 1
            return _error(
                413, f"body: larger than gateway.max_body_bytes={self.config.max_body_bytes}"
            )

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        chat = _COMPLETIONS[request.path]
        self.counters["requests"] += 1
        raw = await self._read_body(request)
        if isinstance(raw, web.Response):
            return raw
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            self.counters["bad_requests"] += 1
            return _error(400, f"body: not JSON ({exc})")
        if not isinstance(body, dict):
            self.counters["bad_requests"] += 1
            return _error(400, "body: expected a JSON object")
        request_id = request.headers.get("x-request-id") or uuid7()
        session = self._sticky(request, body)
        decision = self.router.route(request_id, session_id=session or request_id)
        version = decision.version or str(body.get("model") or "")
        with_logprobs = self._logprobs(body, chat)
        prompt = prompt_of(body, chat)
        retry_of = self._retry_of(session, prompt, request_id)
        if retry_of:
            self.counters["retries_detected"] += 1
            self.events.record_feedback(retry_of, signal=Signal.RETRY, session_id=session)
        streamed = bool(body.get("stream"))
        headers = _forward_headers(request.headers)
        headers["x-request-id"] = request_id
        headers["content-type"] = "application/json"

        async def send(v: str) -> aiohttp.ClientResponse:
            out = dict(body)
            if v:
                self.backend.rewrite(out, v)
            return await self._send(
                "POST", request.path, headers, orjson.dumps(out), streamed=streamed
            )

        try:
            upstream = await send(version)
            if upstream.status >= 400 and decision.version:
                text = (await upstream.read()).decode(errors="replace")
                stable = self.router.split.stable_version if self.router.split else ""
                if (
                    self.backend.unknown_version(upstream.status, text)
                    and stable
                    and stable != version
                ):
                    # The server lost the routed version (a restart): the user gets the
                    # stable one and the sidecar sees the fallback in the counters.
                    self.counters["version_fallbacks"] += 1
                    upstream.release()
                    version = stable
                    upstream = await send(version)
        except _UpstreamFailed as exc:
            self.counters["upstream_errors"] += 1
            self._record_failure(request_id, version, prompt, session, started, str(exc))
            return _error(502, f"upstream {self.upstream} failed: {exc}", kind="upstream_error")
        reply_headers = {"x-request-id": request_id, "x-atlas-version": version}
        meta = {"endpoint": "chat" if chat else "completions"}
        is_sse = "text/event-stream" in upstream.headers.get("content-type", "")
        if streamed and upstream.status == 200 and is_sse:
            self.counters["streamed"] += 1
            response, answer, ttft, partial = await self._relay_stream(
                request, upstream, reply_headers, chat
            )
            if ttft is not None:
                meta["ttft_ms"] = f"{ttft:.3f}"
            meta["stream"] = "true"
        else:
            response, answer, partial = await self._relay_whole(
                request, upstream, reply_headers, chat
            )
        if partial:
            meta["partial"] = partial
        if answer.finish_reason:
            meta["finish_reason"] = answer.finish_reason
        if decision.fallback:
            meta["lease_fallback"] = "true"
        error = upstream.status >= 400 or partial in ("upstream", "stalled")
        self.events.record_inference(
            request_id,
            version,
            prompt,
            answer.text,
            latency_ms=(time.perf_counter() - started) * 1000,
            error=error,
            error_code=str(upstream.status) if upstream.status >= 400 else (partial or ""),
            token_logprobs=answer.logprobs if with_logprobs else (),
            session_id=session,
            user_id=body.get("user", "") if isinstance(body.get("user"), str) else "",
            retry_of=retry_of,
            attributes=meta,
        )
        self.counters["recorded"] += 1
        if decision.mirror_version and not partial and upstream.status < 400:
            self._mirror(
                decision.mirror_version, request.path, body, headers, request_id, prompt, chat
            )
        return response

    async def _relay_whole(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        reply_headers: dict[str, str],
        chat: bool,
    ) -> tuple[web.StreamResponse, Answer, str]:
        try:
            data = await upstream.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.counters["upstream_errors"] += 1
            return _error(502, f"upstream broke off: {exc}"), Answer(), "upstream"
        finally:
            upstream.release()
        # One write for headers and body; prepared here so that the answer is
        # recorded after it went out, not before.
        out = web.Response(
            body=data,
            status=upstream.status,
            headers={**_forward_headers(upstream.headers), **reply_headers},
        )
        answer = Answer()
        if upstream.status < 400 or data[:1] == b"{":
            with contextlib.suppress(orjson.JSONDecodeError):
                answer = answer_of(orjson.loads(data), chat)
        try:
            await out.prepare(request)
            await out.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            self.counters["client_disconnects"] += 1
            return out, answer, "client"
        return out, answer, ""

    async def _relay_stream(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        reply_headers: dict[str, str],
        chat: bool,
    ) -> tuple[web.StreamResponse, Answer, float | None, str]:
        """Passes a streamed answer through byte for byte; returns the answer read from it."""
        acc = StreamAccumulator(chat)
        idle = self.config.chunk_idle_seconds
        first_at: float | None = None
        started = time.perf_counter()
        out: web.StreamResponse | None = None
        partial = ""
        try:
            while True:
                try:
                    # The request's sock_read timeout is chunk_idle_seconds.
                    chunk = await upstream.content.readany()
                except TimeoutError:
                    self.counters["upstream_stalls"] += 1
                    partial = "stalled"
                    break
                except (aiohttp.ClientError, ConnectionError) as exc:
                    log.debug("upstream broke off mid-stream: %s", exc)
                    self.counters["upstream_errors"] += 1
                    partial = "upstream"
                    break
                if not chunk:
                    break
                if out is None:
                    first_at = (time.perf_counter() - started) * 1000
                    out = web.StreamResponse(
                        status=upstream.status,
                        headers={**_forward_headers(upstream.headers), **reply_headers},
                    )
                    await out.prepare(request)
                acc.feed(chunk)
                await out.write(chunk)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            self.counters["client_disconnects"] += 1
            partial = "client"
        except asyncio.CancelledError:
            # The client hung up (aiohttp cancels the handler): the upstream
            # request is closed below, the partial answer recorded.
            self.counters["client_disconnects"] += 1
            upstream.close()
            self._record_partial(request, acc.answer, reply_headers, chat, first_at)
            raise
        finally:
            if partial:
                upstream.close()
            else:
                upstream.release()
        if out is None:
            status = 504 if partial == "stalled" else 502
            what = "sent nothing" if partial == "stalled" else "broke off"
            return (
                _error(status, f"upstream {what} within gateway.chunk_idle_seconds={idle:g}"),
                acc.answer,
                first_at,
                partial or "upstream",
            )
        if not partial:
            with contextlib.suppress(ConnectionResetError, aiohttp.ClientConnectionResetError):
                await out.write_eof()
        return out, acc.answer, first_at, partial

    def _record_partial(
        self,
        request: web.Request,
        answer: Answer,
        reply_headers: dict[str, str],
        chat: bool,
        ttft: float | None,
    ) -> None:
        attrs = {
            "partial": "client",
            "stream": "true",
            "endpoint": "chat" if chat else "completions",
        }
        if ttft is not None:
            attrs["ttft_ms"] = f"{ttft:.3f}"
        self.events.record_inference(
            reply_headers["x-request-id"],
            reply_headers["x-atlas-version"],
            "",
            answer.text,
            attributes=attrs,
        )
        self.counters["recorded"] += 1

    def _record_failure(
        self, request_id: str, version: str, prompt: str, session: str, started: float, why: str
    ) -> None:
        self.events.record_inference(
            request_id,
            version or "unknown",
            prompt,
            "",
            latency_ms=(time.perf_counter() - started) * 1000,
            error=True,
            error_code="upstream_unreachable",
            session_id=session,
            attributes={"error": why[:200]},
        )

    # -- shadow ------------------------------------------------------------------

    def _mirror(
        self,
        version: str,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str],
        request_id: str,
        prompt: str,
        chat: bool,
    ) -> None:
        if self.config.max_concurrent_mirrors == 0 or self._mirrors.locked():
            self.counters["mirrors_dropped"] += 1
            return
        task = asyncio.create_task(
            self._run_mirror(version, path, body, headers, request_id, prompt, chat),
            name=f"mirror-{request_id}",
        )
        self._mirror_tasks.add(task)
        task.add_done_callback(self._mirror_tasks.discard)

    async def _run_mirror(
        self,
        version: str,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str],
        request_id: str,
        prompt: str,
        chat: bool,
    ) -> None:
        async with self._mirrors:
            out = dict(body)
            out["stream"] = False
            out.pop("stream_options", None)
            self.backend.rewrite(out, version)
            started = time.perf_counter()
            try:
                upstream = await self._send("POST", path, headers, orjson.dumps(out))
                data = await upstream.read()
                upstream.release()
            except (_UpstreamFailed, aiohttp.ClientError, TimeoutError) as exc:
                self.counters["mirror_errors"] += 1
                log.debug("mirror to %s failed: %s", version, exc)
                return
            answer = Answer()
            with contextlib.suppress(orjson.JSONDecodeError):
                answer = answer_of(orjson.loads(data), chat)
            self.events.record_inference(
                request_id,
                version,
                prompt,
                answer.text,
                latency_ms=(time.perf_counter() - started) * 1000,
                role=Role.SHADOW,
                error=upstream.status >= 400,
                error_code=str(upstream.status) if upstream.status >= 400 else "",
                token_logprobs=answer.logprobs,
                attributes={"endpoint": "chat" if chat else "completions"},
            )
            self.counters["mirrors"] += 1

    async def _probe(self, version: str, prompt: str) -> str:
        """RunProbe: the version's answer to ``prompt`` through the upstream (greedy)."""
        body: dict[str, Any] = {
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": 128,
            "stream": False,
        }
        self.backend.rewrite(body, version)
        upstream = await self._send(
            "POST", "/v1/chat/completions", {"content-type": "application/json"}, orjson.dumps(body)
        )
        data = await upstream.read()
        upstream.release()
        if upstream.status >= 400:
            raise RuntimeError(f"probe of {version!r}: HTTP {upstream.status}: {data[:300]!r}")
        return answer_of(orjson.loads(data), True).text

    # -- feedback ----------------------------------------------------------------

    def _cors(self, request: web.Request) -> dict[str, str]:
        origin = request.headers.get("Origin", "")
        if origin and origin in self.config.feedback_cors_origins:
            return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        return {}

    async def _preflight(self, request: web.Request) -> web.Response:
        cors = self._cors(request)
        if not cors:
            return web.Response(status=403, text="origin not in gateway.feedback_cors_origins\n")
        cors.update(
            {
                "Access-Control-Allow-Methods": "POST",
                "Access-Control-Allow-Headers": "content-type",
                "Access-Control-Max-Age": "600",
            }
        )
        return web.Response(status=204, headers=cors)

    async def _feedback(self, request: web.Request) -> web.Response:
        cors = self._cors(request)
        ctype = request.content_type
        if ctype not in ("application/json", "text/plain", "application/octet-stream", ""):
            self.counters["feedback_bad"] += 1
            return _error(
                415, f"content-type: {ctype} is not JSON (send application/json or text/plain)"
            )
        try:
            raw = await request.content.read(MAX_FEEDBACK_BYTES + 1)
            fields = parse_feedback(raw)
        except BadFeedback as exc:
            self.counters["feedback_bad"] += 1
            resp = _error(400, str(exc), param=str(exc).partition(":")[0])
            resp.headers.update(cors)
            return resp
        self.events.record_feedback(
            fields.request_id,
            signal=fields.signal,
            rating=fields.rating,
            dwell_ms=fields.dwell_ms,
            correction=fields.correction,
            user_id=fields.user_id,
            session_id=fields.session_id,
        )
        self.counters["feedback"] += 1
        return web.json_response({"ok": True}, status=202, headers=cors)

    # -- everything else ------------------------------------------------------------

    async def _passthrough(self, request: web.Request) -> web.StreamResponse:
        self.counters["passthrough"] += 1
        body = await self._read_body(request)
        if isinstance(body, web.Response):
            return body
        try:
            upstream = await self._send(
                request.method, request.path_qs, _forward_headers(request.headers), body
            )
        except _UpstreamFailed as exc:
            self.counters["upstream_errors"] += 1
            return _error(502, f"upstream {self.upstream} failed: {exc}", kind="upstream_error")
        out = web.StreamResponse(status=upstream.status, headers=_forward_headers(upstream.headers))
        try:
            await out.prepare(request)
            async for chunk in upstream.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
        except (aiohttp.ClientError, ConnectionResetError) as exc:
            log.debug("passthrough %s broke off: %s", request.path, exc)
        finally:
            upstream.release()
        return out

    async def _status(self, request: web.Request) -> web.Response:
        split = self.router.split
        return web.json_response(
            {
                "upstream": self.upstream,
                "backend": self.backend.name,
                "connected": bool(self._control and self._control.connected),
                "split_revision": self.router.revision,
                "routes": [{"version": r.version, "weight_bps": r.weight_bps} for r in split.routes]
                if split
                else [],
                "loaded": sorted(self._control.loaded) if self._control else [],
                "counters": dict(self.counters),
                "events": {
                    "recorded": self.events.stats.recorded,
                    "accepted": self.events.stats.accepted,
                    "dropped": self.events.stats.dropped,
                },
            }
        )
