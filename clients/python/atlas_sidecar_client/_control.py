"""ControlLoop: the inference server's end of ``ControlService.Connect``.

The loop connects to the sidecar, says ``Hello`` (server id, loaded versions,
split revision, capabilities), applies every directive it receives through
the handlers it was given and answers each with ``Applied``. It reconnects
with exponential backoff and full jitter; every reconnect says ``Hello``
again, so the sidecar resends whatever this server lacks.

Directives are idempotent: a directive id that already succeeded is answered
again without running the handler, a ``LoadModel`` for a loaded version and an
``UnloadModel`` for an absent one succeed at once, and a split older than the
one held is ignored (answered with the revision held).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
import grpc.aio

from atlas_sidecar_client._channel import TOKEN_ENV, ChannelSecurity, open_aio_channel
from atlas_sidecar_client._events import EventStream
from atlas_sidecar_client._proto.atlas.sidecar.v1 import (
    control_pb2,
    control_pb2_grpc,
    events_pb2,
)
from atlas_sidecar_client._router import Router, TrafficSplit

__all__ = [
    "AppliedObserver",
    "ControlLoop",
    "ControlLoopStats",
    "LoadHandler",
    "ProbeHandler",
    "UnloadHandler",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: ``on_load(version, artifact_uri)``; sync or async; raise to fail the directive.
LoadHandler = Callable[[str, str], Awaitable[None] | None]
#: ``on_unload(version)``; sync or async; raise to fail the directive.
UnloadHandler = Callable[[str], Awaitable[None] | None]
#: ``on_probe(version, prompt) -> response``; sync or async; raising records an error answer.
ProbeHandler = Callable[[str, str], Awaitable[str] | str]
#: ``on_applied(directive, applied)``: told of every directive the loop ran (not of
#: one answered again from memory); sync, must not raise or block.
AppliedObserver = Callable[[control_pb2.Directive, control_pb2.Applied], None]

#: Capability names reported in Hello.
CAP_LOAD = "load_model"
CAP_UNLOAD = "unload_model"
CAP_PROBE = "run_probe"
CAP_SPLIT = "traffic_split"
CAP_MIRROR = "mirror"

_DONE_CACHE = 4096


#: Codes that mean this server may not connect (token, or a server_id it may not claim).
_REFUSED = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


@dataclass
class ControlLoopStats:
    """Counters since the loop was created."""

    connects: int = 0
    reconnects: int = 0
    directives: int = 0
    applied_ok: int = 0
    applied_failed: int = 0
    #: Directives received again after they had succeeded (answered from memory).
    duplicates: int = 0
    probes: int = 0
    last_error: str = ""


async def _call(fn: Callable[..., Awaitable[T] | T], *args: object) -> T:
    result = fn(*args)
    if inspect.isawaitable(result):
        return await result
    return result


class ControlLoop:
    """Keeps one inference server in step with the sidecar's desired state.

    ``on_load`` / ``on_unload`` are called for ``LoadModel`` / ``UnloadModel``;
    ``on_probe`` answers ``RunProbe`` prompts, whose answers go to the sidecar
    as PROBE ``Inference`` events through ``events`` (required with
    ``on_probe``), flushed before the probe is reported applied. Splits are
    installed in ``router``. A handler that raises fails its directive; the
    sidecar retries it later. Without ``on_load`` the server is assumed to
    manage its own models (``load_model`` is not in the capabilities).
    ``on_applied`` is told of each directive the loop ran and its answer
    (for audit logs and metrics; a resent directive answered from memory is
    counted in ``stats.duplicates`` instead).

    Use from asyncio::

        loop = ControlLoop("127.0.0.1:50051", "pod-a", router=router,
                           on_load=load, on_unload=unload,
                           on_probe=answer, events=stream, loaded_versions=["v1"])
        await loop.start()
        ...
        await loop.stop()
    """

    def __init__(
        self,
        target: str,
        server_id: str,
        *,
        router: Router | None = None,
        on_load: LoadHandler | None = None,
        on_unload: UnloadHandler | None = None,
        on_probe: ProbeHandler | None = None,
        events: EventStream | None = None,
        on_applied: AppliedObserver | None = None,
        loaded_versions: Iterable[str] = (),
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        probe_flush_timeout: float = 30.0,
        channel_options: Sequence[tuple[str, object]] = (),
        token: str | None = None,
        security: ChannelSecurity | None = None,
    ) -> None:
        if not server_id:
            raise ValueError("server_id is required")
        if on_probe is not None and events is None:
            raise ValueError("on_probe needs events= (an EventStream) to send its answers")
        if backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ValueError("need 0 < backoff_initial <= backoff_max")
        self.target = target
        self.server_id = server_id
        sec = security if security is not None else ChannelSecurity()
        self._security = dataclasses.replace(sec, token=token) if token is not None else sec
        token_now = self._security.resolved_token()
        self._metadata = (("authorization", f"Bearer {token_now}"),) if token_now else ()
        self.router = router if router is not None else Router()
        self.stats = ControlLoopStats()
        self._on_load = on_load
        self._on_unload = on_unload
        self._on_probe = on_probe
        self._events = events
        self._on_applied = on_applied
        self._loaded: set[str] = set(loaded_versions)
        self._backoff = (backoff_initial, backoff_max)
        self._probe_flush_timeout = probe_flush_timeout
        self._options = [
            # A dead sidecar behind a live TCP connection is noticed in ~30 s.
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            *channel_options,
        ]
        self._done: collections.OrderedDict[str, control_pb2.Applied] = collections.OrderedDict()
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._call: grpc.aio.StreamStreamCall | None = None
        self._write_lock = asyncio.Lock()
        self._apply_lock = asyncio.Lock()
        self._connected = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._channel: grpc.aio.Channel | None = None
        self._revision_waiters: list[tuple[int, asyncio.Future[None]]] = []

    # -- lifecycle -----------------------------------------------------------

    @property
    def loaded(self) -> frozenset[str]:
        """The versions this server has loaded, as far as the loop knows."""
        return frozenset(self._loaded)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def capabilities(self) -> list[str]:
        caps = [CAP_SPLIT, CAP_MIRROR]
        if self._on_load is not None:
            caps.append(CAP_LOAD)
        if self._on_unload is not None:
            caps.append(CAP_UNLOAD)
        if self._on_probe is not None:
            caps.append(CAP_PROBE)
        return caps

    async def start(self) -> None:
        """Starts connecting in the background; returns at once."""
        if self._task is not None:
            return
        self._stopping.clear()
        self._channel = open_aio_channel(
            self.target, dataclasses.replace(self._security, token=""), options=self._options
        )
        self._task = asyncio.create_task(self._run(), name=f"atlas-control-{self.server_id}")

    async def stop(self) -> None:
        """Closes the stream and stops reconnecting. Safe before start and twice.

        The router keeps its split; the lease clock starts.
        """
        self._stopping.set()
        task, self._task = self._task, None
        for probe in list(self._probes.values()):
            probe.cancel()
        if self._call is not None:
            self._call.cancel()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        self._connected.clear()
        self.router.sidecar_lost()

    async def __aenter__(self) -> ControlLoop:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_connected(self) -> None:
        """Returns once the sidecar has taken this server's Hello.

        Bound it with ``asyncio.timeout``.
        """
        await self._connected.wait()

    async def wait_revision(self, revision: int) -> None:
        """Returns once the router holds split ``revision`` or newer.

        Bound it with ``asyncio.timeout``.
        """
        if self.router.revision >= revision:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (revision, fut)
        self._revision_waiters.append(entry)
        try:
            await fut
        finally:
            if entry in self._revision_waiters:
                self._revision_waiters.remove(entry)

    # -- the connection ------------------------------------------------------

    async def _run(self) -> None:
        delay = self._backoff[0]
        refused_logged = False
        while not self._stopping.is_set():
            was_connected = False
            refused = False
            try:
                was_connected = await self._session()
                self.stats.last_error = "stream ended by the sidecar"
            except grpc.aio.AioRpcError as exc:
                self.stats.last_error = f"{exc.code().name}: {exc.details()}"
                refused = exc.code() in _REFUSED
                if refused:
                    # Say so once, then retry at the slowest pace: a token
                    # fixed in the file is picked up without a restart.
                    if not refused_logged:
                        refused_logged = True
                        log.error(
                            "the sidecar refused control stream of %s (%s); check the token "
                            "(token= or %s) and the server_ids it may claim",
                            self.server_id,
                            self.stats.last_error,
                            TOKEN_ENV,
                        )
                    delay = self._backoff[1]
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug here must not end the loop
                log.exception("control stream failed")
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
            finally:
                self._call = None
                if self._connected.is_set():
                    was_connected = True
                self._connected.clear()
                self.router.sidecar_lost()
            if self._stopping.is_set():
                break
            if was_connected and not refused:
                # A refused Hello ends the call right after its (empty)
                # initial metadata: that was never a connection.
                delay = self._backoff[0]
                refused_logged = False
            self.stats.reconnects += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), random.uniform(0, delay))
            delay = min(delay * 2, self._backoff[1])

    async def _session(self) -> bool:
        assert self._channel is not None
        stub = control_pb2_grpc.ControlServiceStub(self._channel)
        call = stub.Connect(metadata=self._metadata)
        self._call = call
        hello = control_pb2.Hello(
            server_id=self.server_id,
            loaded_versions=sorted(self._loaded),
            split_revision=self.router.revision,
            capabilities=self.capabilities(),
        )
        async with self._write_lock:
            await call.write(control_pb2.ServerMessage(hello=hello))
        # The sidecar sends its initial metadata once it has taken the Hello.
        await call.initial_metadata()
        self.stats.connects += 1
        self._connected.set()
        self.router.sidecar_connected()
        while True:
            directive = await call.read()
            if directive is grpc.aio.EOF:
                return True
            assert isinstance(directive, control_pb2.Directive)
            await self._handle(directive)

    async def _answer(self, applied: control_pb2.Applied) -> None:
        call = self._call
        if call is None:
            return  # resent on reconnect, answered from the cache then
        try:
            async with self._write_lock:
                await call.write(control_pb2.ServerMessage(applied=applied))
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            self.stats.last_error = f"cannot answer {applied.directive_id}: {exc}"

    def _remember(self, d: control_pb2.Directive, applied: control_pb2.Applied) -> None:
        if self._on_applied is not None:
            try:
                self._on_applied(d, applied)
            except Exception:  # an observer's bug must not fail the directive
                log.exception("on_applied observer failed")
        if applied.ok:
            self._done[applied.directive_id] = applied
            while len(self._done) > _DONE_CACHE:
                self._done.popitem(last=False)
            self.stats.applied_ok += 1
        else:
            self.stats.applied_failed += 1

    # -- directives ----------------------------------------------------------

    async def _handle(self, d: control_pb2.Directive) -> None:
        self.stats.directives += 1
        cached = self._done.get(d.directive_id)
        if cached is not None:
            self.stats.duplicates += 1
            await self._answer(cached)
            return
        kind = d.WhichOneof("action")
        if kind == "run_probe":
            if d.directive_id not in self._probes:
                task = asyncio.create_task(self._probe(d))
                self._probes[d.directive_id] = task
            return
        async with self._apply_lock:
            applied = await self._apply(d, kind)
        self._remember(d, applied)
        await self._answer(applied)

    async def _apply(self, d: control_pb2.Directive, kind: str | None) -> control_pb2.Applied:
        out = control_pb2.Applied(directive_id=d.directive_id, ok=True)
        try:
            if kind == "load_model":
                version = d.load_model.version
                if not version:
                    raise ValueError("load_model.version: required")
                if version not in self._loaded:
                    if self._on_load is None:
                        raise ValueError("this server cannot load models (no on_load handler)")
                    await _call(self._on_load, version, d.load_model.artifact_uri)
                    self._loaded.add(version)
            elif kind == "unload_model":
                version = d.unload_model.version
                if not version:
                    raise ValueError("unload_model.version: required")
                split = self.router.split
                if split is not None and version in split.versions():
                    raise ValueError(f"unload_model.version: {version!r} still receives traffic")
                if version in self._loaded:
                    if self._on_unload is None:
                        raise ValueError("this server cannot unload models (no on_unload handler)")
                    await _call(self._on_unload, version)
                    self._loaded.discard(version)
            elif kind == "set_traffic_split":
                split = TrafficSplit.from_proto(d.set_traffic_split)
                if self._on_load is not None:
                    missing = sorted(split.versions() - self._loaded)
                    if missing:
                        raise ValueError(
                            f"set_traffic_split.routes: versions not loaded: {', '.join(missing)}"
                        )
                if self.router.apply(split):
                    self._wake_revision_waiters()
            else:
                raise ValueError(f"directive {d.directive_id}: unknown action {kind!r}")
        except Exception as exc:
            out.ok = False
            out.error = (
                f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)
            )
        out.split_revision = self.router.revision
        return out

    def _wake_revision_waiters(self) -> None:
        rev = self.router.revision
        for want, fut in list(self._revision_waiters):
            if rev >= want and not fut.done():
                fut.set_result(None)

    async def _probe(self, d: control_pb2.Directive) -> None:
        assert self._on_probe is not None and self._events is not None
        directive_id, probe = d.directive_id, d.run_probe
        out = control_pb2.Applied(directive_id=directive_id, ok=True)
        try:
            for i, prompt in enumerate(probe.prompts):
                t0 = time.perf_counter()
                error_code = ""
                try:
                    response = str(await _call(self._on_probe, probe.version, prompt))
                except Exception as exc:
                    response, error_code = "", type(exc).__name__
                ev = events_pb2.Event(event_id=f"probe/{probe.probe_id}/{i}")
                ev.time.GetCurrentTime()
                inf = ev.inference
                inf.request_id = f"probe/{probe.probe_id}/{i}"
                inf.model_version = probe.version
                inf.role = events_pb2.PROBE
                inf.prompt = prompt
                inf.response = response
                inf.latency_ms = (time.perf_counter() - t0) * 1000.0
                if error_code:
                    inf.error = True
                    inf.error_code = error_code
                inf.attributes["probe_id"] = probe.probe_id
                inf.attributes["probe_index"] = str(i)
                self._events.record(ev)
            self.stats.probes += 1
            if not await self._events.aflush(self._probe_flush_timeout):
                raise RuntimeError("probe answers were not acknowledged by the sidecar in time")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            out.ok = False
            out.error = str(exc)
        finally:
            self._probes.pop(directive_id, None)
        out.split_revision = self.router.revision
        self._remember(d, out)
        await self._answer(out)
