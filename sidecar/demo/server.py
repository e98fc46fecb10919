"""The reference inference server: a real server built only on the public client library.

It serves the demo's policy over HTTP and does everything an inference server
has to do to take part in the loop, with nothing but ``atlas_sidecar_client``:

- ``EventStream``: every answer goes to the sidecar as an ``Inference`` event
  (with the answer's token log-probabilities), every piece of feedback the
  application relays as a ``Feedback`` event;
- ``Router``: picks the version for each request from the traffic split
  (sticky per session), and mirrors the share the split asks for to the shadow
  version, whose answer is recorded with role SHADOW and never shown;
- ``ControlLoop``: loads versions from their artifact folders on
  ``LoadModel``, drops them on ``UnloadModel``, installs splits, and answers
  ``RunProbe`` with the version's most likely answer.

HTTP API (JSON):

- ``POST /v1/answer {"prompt", "user_id"?, "session_id"?, "retry_of"?}`` ->
  ``{"request_id", "version", "answer", "token_logprobs"}``
- ``POST /v1/feedback {"request_id", "signal"?, "rating"?, "dwell_ms"?,
  "correction"?, "user_id"?, "session_id"?}`` -> ``{"ok": true}``
- ``GET /v1/state`` -> loaded versions, the split, counters.

Run: ``python -m sidecar.demo.server --sidecar HOST:PORT --listen HOST:PORT
--models-dir DIR --initial-version v1``. It prints one JSON line
``{"event": "ready", ...}`` once it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import web
from atlas_sidecar_client import ControlLoop, EventStream, Role, Router, Signal, TrafficSplit, uuid7

from sidecar._aio import spawn
from sidecar.demo._policy import Policy

__all__ = ["ReferenceServer", "main"]

_SIGNALS = {name: int(number) for name, number in Signal.items() if name != "SIGNAL_UNSPECIFIED"}


class _RecordingRouter(Router):
    """A Router that remembers every split it installed (for the demo's report)."""

    def __init__(self, split: TrafficSplit, *, default_version: str) -> None:
        super().__init__(split, default_version=default_version)
        self.history: list[dict[str, Any]] = []

    def apply(self, split: Any) -> bool:
        installed = super().apply(split)
        current = self.split
        if installed and current is not None:
            self.history.append(
                {
                    "time": time.time(),
                    "revision": current.revision,
                    "routes": [[r.version, r.weight_bps] for r in current.routes],
                    "shadow": [current.shadow_version, current.mirror_bps],
                }
            )
        return installed


class BadRequest(ValueError):
    """A request field is missing or wrong; the message names it."""


def _field(body: dict[str, Any], key: str, kind: type, required: bool = False) -> Any:
    value = body.get(key)
    if value is None:
        if required:
            raise BadRequest(f"{key}: required")
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise BadRequest(f"{key}: expected {kind.__name__}")
    return value


class ReferenceServer:
    """Serves policies and keeps itself in step with the sidecar.

    ``start()`` loads the initial version from ``models_dir``, starts the
    event stream, the control loop and the HTTP server; ``stop()`` undoes it
    (safe before start and twice).
    """

    def __init__(
        self,
        sidecar: str,
        models_dir: str | os.PathLike[str],
        initial_version: str,
        *,
        server_id: str = "demo-server",
        listen: str = "127.0.0.1:0",
        seed: int = 1,
        token_ms: float = 3.0,
    ) -> None:
        self.sidecar = sidecar
        self.models_dir = Path(models_dir)
        self.initial_version = initial_version
        self.server_id = server_id
        self.listen = listen
        self.rng = random.Random(seed)
        # A real model spends time per generated token; so does this one (an
        # await, not CPU), which keeps latency comparisons between versions
        # about the answers and not about scheduler noise.
        self.token_ms = token_ms
        self.models: dict[str, Policy] = {}
        self.router = _RecordingRouter(
            TrafficSplit.single(initial_version), default_version=initial_version
        )
        self.events: EventStream | None = None
        self.control: ControlLoop | None = None
        self.served: Counter[str] = Counter()
        self.mirrored: Counter[str] = Counter()
        self.probed: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.bad_requests = 0
        self._background: set[asyncio.Task[None]] = set()
        self.loads: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- model handlers (called by the ControlLoop) -----------------------

    async def load(self, version: str, artifact_uri: str) -> None:
        """Loads ``version`` from its artifact; raises (failing the directive) when it cannot."""
        uri = artifact_uri or str(self.models_dir / version)
        policy = await asyncio.to_thread(Policy.load, uri)
        if policy.version != version:
            raise ValueError(f"artifact {uri} holds {policy.version!r}, not {version!r}")
        self.models[version] = policy
        self.loads.append({"time": time.time(), "action": "load", "version": version})

    def unload(self, version: str) -> None:
        self.models.pop(version, None)
        self.loads.append({"time": time.time(), "action": "unload", "version": version})

    async def _generate(self, n_tokens: int) -> None:
        if self.token_ms > 0:
            await asyncio.sleep(n_tokens * self.token_ms / 1000.0)

    async def probe(self, version: str, prompt: str) -> str:
        policy = self.models.get(version)
        if policy is None:
            raise LookupError(f"version {version!r} is not loaded")
        self.probed[version] += 1
        choice = policy.greedy(prompt)
        await self._generate(len(choice.token_logprobs))
        return choice.answer

    # -- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        await self.load(self.initial_version, "")
        self.events = EventStream(self.sidecar, linger_ms=20.0)
        self.control = ControlLoop(
            self.sidecar,
            self.server_id,
            router=self.router,
            on_load=self.load,
            on_unload=self.unload,
            on_probe=self.probe,
            events=self.events,
            loaded_versions=[self.initial_version],
        )
        await self.control.start()
        app = web.Application(client_max_size=1 << 20)
        app.router.add_post("/v1/answer", self._answer)
        app.router.add_post("/v1/feedback", self._feedback)
        app.router.add_get("/v1/state", self._state)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        host, _, port = self.listen.rpartition(":")
        site = web.TCPSite(self._runner, host, int(port), reuse_port=False)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._background:
            await asyncio.wait(list(self._background), timeout=5)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.control is not None:
            await self.control.stop()
            self.control = None
        if self.events is not None:
            await self.events.aclose(5.0)
            self.events = None

    # -- HTTP -------------------------------------------------------------

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"body: not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise BadRequest("body: expected a JSON object")
        return body

    def _bad(self, exc: BadRequest) -> web.Response:
        self.bad_requests += 1
        return web.json_response({"error": str(exc)}, status=400)

    async def _answer(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            prompt = _field(body, "prompt", str, required=True)
            user = _field(body, "user_id", str) or ""
            session = _field(body, "session_id", str) or ""
            retry_of = _field(body, "retry_of", str) or ""
        except BadRequest as exc:
            return self._bad(exc)
        assert self.events is not None
        request_id = uuid7()
        decision = self.router.route(request_id, session_id=session, user_id=user)
        version = decision.version
        policy = self.models.get(version)
        t0 = time.perf_counter()
        if policy is None:
            # The split names a version this server lacks: answer with the
            # stable one and report the miss as an error of the routed version.
            self.errors[version] += 1
            self.events.record_inference(
                request_id,
                version,
                prompt,
                latency_ms=0.0,
                error=True,
                error_code="version_not_loaded",
                session_id=session,
                user_id=user,
                retry_of=retry_of,
            )
            version = self.router.split.fallback_version if self.router.split else ""
            policy = self.models.get(version) or self.models[self.initial_version]
            request_id = uuid7()
        choice = policy.act(prompt, self.rng)
        await self._generate(len(choice.token_logprobs))
        latency = (time.perf_counter() - t0) * 1000.0
        self.served[version] += 1
        self.events.record_inference(
            request_id,
            version,
            prompt,
            choice.answer,
            latency_ms=latency,
            token_logprobs=choice.token_logprobs,
            session_id=session,
            user_id=user,
            retry_of=retry_of,
        )
        if decision.mirror_version and decision.mirror_version in self.models:
            # Mirrored off the user's path: the user never waits for the shadow.
            task = spawn(
                self._mirror(decision.mirror_version, request_id, prompt, session, user),
                stage="demo-server",
                name="mirror",
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return web.json_response(
            {
                "request_id": request_id,
                "version": version,
                "answer": choice.answer,
                "token_logprobs": choice.token_logprobs,
            }
        )

    async def _mirror(
        self, version: str, request_id: str, prompt: str, session: str, user: str
    ) -> None:
        assert self.events is not None
        shadow = self.models.get(version)
        if shadow is None:
            return
        t1 = time.perf_counter()
        mirrored = shadow.act(prompt, self.rng)
        await self._generate(len(mirrored.token_logprobs))
        self.mirrored[version] += 1
        self.events.record_inference(
            f"{request_id}/shadow",
            version,
            prompt,
            mirrored.answer,
            latency_ms=(time.perf_counter() - t1) * 1000.0,
            role=Role.SHADOW,
            token_logprobs=mirrored.token_logprobs,
            session_id=session,
            user_id=user,
            attributes={"mirror_of": request_id},
        )

    async def _feedback(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            request_id = _field(body, "request_id", str, required=True)
            signal_name = _field(body, "signal", str)
            if signal_name is not None and signal_name not in _SIGNALS:
                raise BadRequest(f"signal: unknown {signal_name!r}")
            rating = _field(body, "rating", float)
            if rating is not None and not 0.0 <= rating <= 1.0:
                raise BadRequest("rating: must be in [0, 1]")
            dwell = _field(body, "dwell_ms", int) or 0
            correction = _field(body, "correction", str) or ""
            user = _field(body, "user_id", str) or ""
            session = _field(body, "session_id", str) or ""
        except BadRequest as exc:
            return self._bad(exc)
        assert self.events is not None
        self.events.record_feedback(
            request_id,
            signal=_SIGNALS[signal_name] if signal_name else 0,
            rating=rating,
            dwell_ms=dwell,
            correction=correction,
            user_id=user,
            session_id=session,
        )
        return web.json_response({"ok": True})

    def state(self) -> dict[str, Any]:
        split = self.router.split
        control = self.control
        return {
            "server_id": self.server_id,
            "loaded": sorted(self.models),
            "split": None
            if split is None
            else {
                "revision": split.revision,
                "routes": [[r.version, r.weight_bps] for r in split.routes],
                "stable_version": split.stable_version,
                "shadow": [split.shadow_version, split.mirror_bps],
                "lease_seconds": split.lease_seconds,
            },
            "connected": bool(control and control.connected),
            "served": dict(self.served),
            "mirrored": dict(self.mirrored),
            "probed": dict(self.probed),
            "errors": dict(self.errors),
            "bad_requests": self.bad_requests,
            "fallbacks": self.router.fallbacks,
            "events_dropped": self.events.stats.dropped if self.events else 0,
            "loads": self.loads[-20:],
            "splits": self.router.history[-200:],
        }

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(self.state())


async def _serve(args: argparse.Namespace) -> int:
    server = ReferenceServer(
        args.sidecar,
        args.models_dir,
        args.initial_version,
        server_id=args.server_id,
        listen=args.listen,
        seed=args.seed,
        token_ms=args.token_ms,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
    except Exception as exc:
        print(f"demo server: cannot start: {exc}", file=sys.stderr)
        await server.stop()
        return 1
    ready = {"event": "ready", "port": server.port, "server_id": server.server_id}
    print(json.dumps(ready), flush=True)
    await stop.wait()
    with contextlib.suppress(Exception):
        await server.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sidecar.demo.server", description="The demo's reference inference server."
    )
    p.add_argument("--sidecar", required=True, help="the sidecar's gRPC address")
    p.add_argument("--listen", default="127.0.0.1:0", help="HTTP address (default: a free port)")
    p.add_argument("--models-dir", required=True, help="folder of model versions")
    p.add_argument("--initial-version", default="v1", help="version served at start (default v1)")
    p.add_argument("--server-id", default="demo-server", help="this replica's id")
    p.add_argument("--seed", type=int, default=1, help="seed for sampling answers")
    p.add_argument(
        "--token-ms", type=float, default=3.0, help="generation time per token (default 3 ms)"
    )
    args = p.parse_args(argv)
    import uvloop

    return int(uvloop.run(_serve(args)))


if __name__ == "__main__":
    sys.exit(main())
