"""ControlChannel: desired state, reconciliation, and ``ControlService.Connect``.

The sidecar holds the desired state (which versions are loaded, which split
applies); every inference-server replica reports its actual state in
``Hello`` and in each ``Applied``. For every replica the channel computes what
differs and sends it, in an order that never breaks serving:

1. ``LoadModel`` for each desired version the replica lacks;
2. ``SetTrafficSplit`` once every version the split routes to is loaded;
3. ``UnloadModel`` for versions no longer desired, once the split that stopped
   routing to them is applied.

Every directive is stored in the replica's outbox before it is sent and
leaves it only when answered (``Applied``) or when a later ``Hello`` shows
it is no longer needed. A reconnect (either side restarted) resends exactly
the unacknowledged directives that still matter, with their original ids, so
a server that already applied one answers from memory instead of applying it
again. A failed directive is retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import lmdb
from atlas_sidecar_client import uuid7
from atlas_sidecar_client.pb import control_pb2, control_pb2_grpc
from google.protobuf.message import DecodeError

from sidecar import instruments as ins
from sidecar._aio import cancel_and_wait, spawn
from sidecar.config import ControlConfig
from sidecar.control._plane import DesiredState
from sidecar.control._state import (
    DESIRED_KEY,
    PROBE_PREFIX,
    REPLICA_PREFIX,
    Pending,
    ProbeRecord,
    Replica,
    desired_from_json,
    desired_to_json,
    split_versions,
)
from sidecar.names import check_name
from sidecar.store import Store, StoreWriter

__all__ = ["ControlChannel", "ControlServicer", "ProbeStatus", "ReplicaStatus"]

log = logging.getLogger(__name__)

CAP_LOAD = "load_model"
CAP_UNLOAD = "unload_model"
CAP_PROBE = "run_probe"
#: The capabilities the channel acts on; others a Hello lists are not kept
#: (a newer server's extras mean nothing here, and would grow the record).
_KNOWN_CAPABILITIES = frozenset({CAP_LOAD, CAP_UNLOAD, CAP_PROBE})

#: A server's error text kept per directive and replica (status, store).
_MAX_ERROR_CHARS = 1024
_BUCKETS = 10_000
#: Revisions travel as uint64 (SetTrafficSplit.revision).
_MAX_REVISION = 2**64 - 1
#: How often disconnected replicas are checked for control.replica_expiry_seconds.
_EXPIRY_SWEEP_MS = 60_000


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """What one replica has, as far as the sidecar knows."""

    server_id: str
    connected: bool
    loaded: frozenset[str]
    split_revision: int
    capabilities: frozenset[str]
    pending: int
    applied: int
    failed: int
    last_error: str
    last_seen_ms: int


@dataclass(frozen=True, slots=True)
class ProbeStatus:
    probe_id: str
    version: str
    #: queued (no capable replica yet) | sent | done
    state: str
    server_id: str
    ok: bool
    error: str


class _Session:
    """One open Connect stream."""

    def __init__(self, server_id: str) -> None:
        self.server_id = server_id
        self.queue: asyncio.Queue[control_pb2.Directive | None] = asyncio.Queue()
        self.closed = False
        #: Why the server's stream is ended with INVALID_ARGUMENT ("" = it is not).
        self.problem = ""

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.queue.put_nowait(None)


def validate_desired(d: DesiredState) -> None:
    """Raises ValueError naming the first bad field of ``d``."""
    if not 1 <= d.revision <= _MAX_REVISION:
        raise ValueError(f"desired.revision must be in 1..2^64-1, got {d.revision}")
    if not d.stable_version:
        raise ValueError("desired.stable_version: required")
    if d.stable_version not in d.loaded:
        raise ValueError(f"desired.loaded must include stable_version {d.stable_version!r}")
    total = 0
    for i, r in enumerate(d.routes):
        if not r.version:
            raise ValueError(f"desired.routes[{i}].version: required")
        if r.weight_bps < 0:
            raise ValueError(f"desired.routes[{i}].weight_bps must be >= 0")
        total += r.weight_bps
    if total > _BUCKETS:
        raise ValueError(f"desired.routes: weights sum to {total} bps, more than {_BUCKETS}")
    if d.shadow is not None and not 0 <= d.shadow.mirror_bps <= _BUCKETS:
        raise ValueError(f"desired.shadow.mirror_bps must be in 0..{_BUCKETS}")
    missing = sorted(split_versions(d) - d.loaded)
    if missing:
        raise ValueError(f"desired.loaded must include every routed version; missing {missing}")
    if d.lease_seconds < 0:
        raise ValueError("desired.lease_seconds must be >= 0")


def _split_directive(d: DesiredState) -> control_pb2.SetTrafficSplit:
    msg = control_pb2.SetTrafficSplit(
        revision=d.revision,
        routes=[control_pb2.Route(version=r.version, weight_bps=r.weight_bps) for r in d.routes],
        lease_seconds=d.lease_seconds,
        stable_version=d.stable_version,
    )
    if d.shadow is not None:
        msg.shadow.version = d.shadow.version
        msg.shadow.mirror_bps = d.shadow.mirror_bps
    return msg


class ControlChannel:
    """The control plane: implements :class:`~sidecar.control.ControlPlane`.

    A stage (``start`` / ``shutdown``) and the logic behind
    ``ControlService.Connect`` (:class:`ControlServicer`). All state changes
    are durable before they are acted on; a restart resumes from the store.
    """

    def __init__(
        self,
        store: Store,
        writer: StoreWriter,
        config: ControlConfig,
        *,
        clock: Callable[[], float] = time.time,
        may_claim: Callable[[grpc.aio.ServicerContext, str], str | None] | None = None,
    ) -> None:
        """``may_claim(context, server_id)`` says why the caller may not be
        ``server_id`` (None: it may); without it every caller may be anyone."""
        self._may_claim = may_claim
        self._store = store
        self._writer = writer
        self._config = config
        self._clock = clock
        self._desired: DesiredState | None = None
        self._replicas: dict[str, Replica] = {}
        self._probes: dict[str, ProbeRecord] = {}
        self._sessions: dict[str, _Session] = {}
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._retry_task: asyncio.Task[None] | None = None
        self._started = False
        self._draining = False
        self.counters: dict[str, int] = {
            "hellos": 0,
            "bad_messages": 0,
            "directives_sent": 0,
            "directives_resent": 0,
            "applied_ok": 0,
            "applied_failed": 0,
            "applied_unknown": 0,
            "duplicates_refused": 0,
            "impostors_refused": 0,
            # Split revisions a server reported that this sidecar never issued.
            "bad_revisions": 0,
            "replicas_expired": 0,
            "replicas_refused": 0,
        }
        self._last_sweep_ms = 0
        self.servicer = ControlServicer(self)

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Loads the stored desired state, replicas and probes."""
        if self._started:
            return
        with self._store.read() as txn:
            raw = txn.get(DESIRED_KEY, db=self._store.db("meta"))
            self._desired = desired_from_json(bytes(raw)) if raw else None
            with txn.cursor(db=self._store.db("directives")) as cur:
                for raw_key, raw_value in cur:
                    key, value = bytes(raw_key), bytes(raw_value)
                    if key.startswith(REPLICA_PREFIX):
                        replica = Replica.from_json(value)
                        self._replicas[replica.server_id] = replica
                    elif key.startswith(PROBE_PREFIX):
                        probe = ProbeRecord.from_json(value)
                        self._probes[probe.probe_id] = probe
        self._repair_loaded_replicas()
        # A probe sent before the restart is unacknowledged: it may go to
        # whichever capable replica connects first.
        for p in self._probes.values():
            if p.state == "sent":
                owner = self._replicas.get(p.server_id)
                if owner is not None:
                    owner.pending.pop(self._probe_directive_id(p.probe_id), None)
                p.state, p.server_id = "queued", ""
        expired = self._expire(self._now_ms())
        if expired:
            await self._persist(deletes=expired)
        self._started = True
        self._retry_task = spawn(self._retry_loop(), stage="control", name="retry")

    def _repair_loaded_replicas(self) -> None:
        """Drops what a stored replica record cannot truthfully hold.

        A store written before revisions and sizes were checked may hold a
        split revision this sidecar never issued (it would push every later
        revision past 2^64) or an oversized version list. The record is kept;
        the bad parts are forgotten until the replica's next Hello.
        """
        issued = self.issued_revision()
        repaired = []
        for r in self._replicas.values():
            if r.split_revision > issued:
                r.split_revision = 0
                self.counters["bad_revisions"] += 1
                repaired.append(r.server_id)
            if len(r.loaded) > self._config.max_loaded_versions:
                r.loaded = set()
                repaired.append(r.server_id)
            r.capabilities &= _KNOWN_CAPABILITIES
        if repaired:
            log.warning(
                "stored replica records held a split revision this sidecar never issued "
                "or more versions than control.max_loaded_versions; forgotten until "
                "their next Hello",
                extra={"replicas": sorted(set(repaired))[:10], "issued_revision": issued},
            )

    def drain(self) -> None:
        """Ends every open stream (before the gRPC server stops); servers reconnect later."""
        self._draining = True
        for s in list(self._sessions.values()):
            s.close()

    async def shutdown(self) -> None:
        """Ends streams and stops the retry timer. Safe before start and twice."""
        self.drain()
        task, self._retry_task = self._retry_task, None
        await cancel_and_wait(task)

    # -- ControlPlane ----------------------------------------------------------

    def desired(self) -> DesiredState | None:
        return self._desired

    def issued_revision(self) -> int:
        """The newest split revision this sidecar has issued (0: none yet).

        Revisions only grow, so every revision a replica may truthfully
        report is at most this one; a larger one is refused (Hello) or
        ignored (Applied), never stored.
        """
        return self._desired.revision if self._desired else 0

    def next_revision(self) -> int:
        """A revision newer than the desired one and than any replica reports."""
        seen = [r.split_revision for r in self._replicas.values()]
        return max([self.issued_revision(), *seen]) + 1

    async def apply(self, desired: DesiredState) -> None:
        """Stores ``desired`` durably, then reconciles every connected replica.

        Re-applying the current state is a no-op.

        Raises:
            ValueError: ``desired`` is inconsistent (the message names the
                field), or its revision is older than the stored one, or equal
                to it with different content.
        """
        validate_desired(desired)
        async with self._lock:
            cur = self._desired
            if cur is not None:
                if desired.revision < cur.revision:
                    raise ValueError(
                        f"desired.revision {desired.revision} is older than the stored "
                        f"revision {cur.revision}"
                    )
                if desired.revision == cur.revision:
                    if desired_to_json(desired) == desired_to_json(cur):
                        return
                    raise ValueError(
                        f"desired.revision {desired.revision} is already used for another state"
                    )
            self._desired = desired
            touched = [r for r in self._connected_replicas() if self._plan(r)]
            await self._persist(desired=desired, replicas=touched)
            for r in touched:
                self._send_ready(r)
        self._notify()

    async def run_probe(self, version: str, prompts: Sequence[str]) -> str:
        """Queues a probe durably and sends it to one capable replica.

        Returns the probe id at once; when no replica that can probe (and has
        ``version`` loaded) is connected, the probe waits for one. Answers come
        back through the event log (role PROBE, attributes probe_id and
        probe_index); :meth:`probe` tells whether the server finished.

        Raises:
            ValueError: ``version`` is empty or ``prompts`` is empty.
        """
        if not version:
            raise ValueError("run_probe.version: required")
        if not prompts:
            raise ValueError("run_probe.prompts: at least one prompt is required")
        probe = ProbeRecord(
            probe_id=uuid7(),
            version=version,
            prompts=list(prompts),
            created_ms=self._now_ms(),
        )
        async with self._lock:
            self._probes[probe.probe_id] = probe
            touched = self._assign_probes()
            await self._persist(replicas=touched, probes=[probe])
            for r in touched:
                self._send_ready(r)
        return probe.probe_id

    def converged(self, revision: int) -> bool:
        """True when at least one replica is connected and every connected one
        applies split ``revision`` (or a newer desired one) and, for the
        current desired revision, has every desired version loaded."""
        d = self._desired
        replicas = self._connected_replicas()
        if d is None or not replicas:
            return False
        for r in replicas:
            if r.split_revision < revision or r.split_revision > d.revision:
                return False
            if revision == d.revision and CAP_LOAD in r.capabilities and not d.loaded <= r.loaded:
                return False
        return True

    async def wait_converged(self, revision: int) -> None:
        """Returns once :meth:`converged` is True. Bound it with ``asyncio.timeout``."""
        while not self.converged(revision):
            self._changed.clear()
            await self._changed.wait()

    def connected_servers(self) -> int:
        return len(self._sessions)

    # -- inspection ------------------------------------------------------------

    def replicas(self) -> list[ReplicaStatus]:
        return [
            ReplicaStatus(
                server_id=r.server_id,
                connected=r.server_id in self._sessions,
                loaded=frozenset(r.loaded),
                split_revision=r.split_revision,
                capabilities=r.capabilities,
                pending=len(r.pending),
                applied=r.applied,
                failed=r.failed,
                last_error=r.last_error,
                last_seen_ms=r.last_seen_ms,
            )
            for r in sorted(self._replicas.values(), key=lambda r: r.server_id)
        ]

    def probe(self, probe_id: str) -> ProbeStatus | None:
        p = self._probes.get(probe_id)
        if p is None:
            return None
        return ProbeStatus(p.probe_id, p.version, p.state, p.server_id, p.ok, p.error)

    def status(self) -> dict[str, Any]:
        """The ``control`` part of the daemon's status."""
        d = self._desired
        return {
            "desired_revision": d.revision if d else 0,
            "stable_version": d.stable_version if d else "",
            "routes": {r.version: r.weight_bps for r in d.routes} if d else {},
            "connected_servers": self.connected_servers(),
            "converged": self.converged(d.revision) if d else False,
            "replicas": {
                s.server_id: {
                    "connected": s.connected,
                    "split_revision": s.split_revision,
                    "loaded": sorted(s.loaded),
                    "pending": s.pending,
                    "applied": s.applied,
                    "failed": s.failed,
                    "last_error": s.last_error,
                }
                for s in self.replicas()
            },
            "probes_waiting": sum(1 for p in self._probes.values() if p.state != "done"),
            **self.counters,
        }

    # -- the stream ------------------------------------------------------------

    async def connect(self, context: grpc.aio.ServicerContext) -> None:
        """Serves one Connect stream until either side ends it."""
        first = await self._read_hello(context)
        if first is None:
            return
        hello = first.hello
        if self._may_claim is not None:
            refused = self._may_claim(context, hello.server_id)
            if refused is not None:
                self.counters["impostors_refused"] += 1
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, refused)
        session = _Session(hello.server_id)
        async with self._lock:
            if self._draining:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the sidecar is shutting down")
            old = self._sessions.get(hello.server_id)
            if old is not None and not old.closed:
                # Never silently replaced: the live stream may be the real
                # server and this one an impostor. A server that restarted is
                # let in once its old stream is gone (the connection closes,
                # or keepalive notices a dead peer).
                self.counters["duplicates_refused"] += 1
                await context.abort(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"hello.server_id: {hello.server_id!r} already has a live control stream; "
                    "each replica needs its own server_id",
                )
            expired = self._expire(self._now_ms(), arriving=hello.server_id)
            if hello.server_id not in self._replicas and (
                len(self._replicas) >= self._config.max_replicas
            ):
                self.counters["replicas_refused"] += 1
                if expired:
                    await self._persist(deletes=expired)
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"hello.server_id: {len(self._replicas)} replicas are connected, "
                    f"the most control.max_replicas allows",
                )
            self._sessions[hello.server_id] = session
            self.counters["hellos"] += 1
            r = self._replicas.get(hello.server_id)
            if r is None:
                r = self._replicas[hello.server_id] = Replica(hello.server_id)
            r.loaded = set(hello.loaded_versions)
            r.split_revision = hello.split_revision
            r.capabilities = frozenset(hello.capabilities) & _KNOWN_CAPABILITIES
            r.last_seen_ms = self._now_ms()
            for p in r.pending.values():
                p.in_flight = False
            self._plan(r)
            touched = {r.server_id: r}
            for other in self._assign_probes():
                touched[other.server_id] = other
            await self._persist(replicas=list(touched.values()), deletes=expired)
            revision = self._desired.revision if self._desired else 0
            await context.send_initial_metadata((("atlas-desired-revision", str(revision)),))
            for t in touched.values():
                self._send_ready(t)
        self._notify()
        reader = spawn(
            self._read_loop(session, context), stage="control", name=f"read-{hello.server_id}"
        )
        try:
            while True:
                item = await session.queue.get()
                if item is None:
                    break
                await context.write(item)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            await self._end_session(session)
        if session.problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, session.problem)

    async def _read_hello(
        self, context: grpc.aio.ServicerContext
    ) -> control_pb2.ServerMessage | None:
        first: control_pb2.ServerMessage | None = None
        try:
            msg = await asyncio.wait_for(context.read(), self._config.hello_timeout_seconds)
        except TimeoutError:
            self.counters["bad_messages"] += 1
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"hello: not received within {self._config.hello_timeout_seconds} s",
            )
            return None
        except DecodeError as exc:  # e.g. a string field that is not UTF-8
            problem: str | None = str(exc) or "hello: cannot be decoded"
        else:
            if msg is grpc.aio.EOF:
                return None
            assert isinstance(msg, control_pb2.ServerMessage)
            first = msg
            if first.WhichOneof("message") != "hello":
                problem = "hello: the first message must be a Hello"
            else:
                problem = self._hello_problem(first.hello)
        if problem is not None:
            self.counters["bad_messages"] += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
            return None
        return first

    def _hello_problem(self, hello: control_pb2.Hello) -> str | None:
        """Why ``hello`` cannot be taken (naming the field), or None."""
        problem = check_name("hello.server_id", hello.server_id)
        if problem is not None:
            return problem
        most = self._config.max_loaded_versions
        if len(hello.loaded_versions) > most:
            return (
                f"hello.loaded_versions: {len(hello.loaded_versions)} versions, "
                f"more than control.max_loaded_versions ({most})"
            )
        for i, version in enumerate(hello.loaded_versions):
            problem = check_name(f"hello.loaded_versions[{i}]", version)
            if problem is not None:
                return problem
        issued = self.issued_revision()
        if hello.split_revision > issued:
            self.counters["bad_revisions"] += 1
            return (
                f"hello.split_revision: {hello.split_revision} is newer than any revision "
                f"this sidecar issued ({issued})"
            )
        return None

    async def _read_loop(self, session: _Session, context: grpc.aio.ServicerContext) -> None:
        try:
            while True:
                try:
                    msg = await context.read()
                except DecodeError as exc:
                    # Nothing after an undecodable message can be trusted to
                    # line up with what the server meant: end the stream, say why.
                    self.counters["bad_messages"] += 1
                    session.problem = str(exc) or "control message: cannot be decoded"
                    break
                if msg is grpc.aio.EOF:
                    break
                assert isinstance(msg, control_pb2.ServerMessage)
                if msg.WhichOneof("message") != "applied" or not msg.applied.directive_id:
                    # A second Hello or an empty Applied: counted, stream kept.
                    self.counters["bad_messages"] += 1
                    continue
                await self._on_applied(session, msg.applied)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the client went away mid-read
            log.debug("control stream of %s ended: %s", session.server_id, exc)
        finally:
            session.close()

    async def _on_applied(self, session: _Session, applied: control_pb2.Applied) -> None:
        async with self._lock:
            r = self._replicas.get(session.server_id)
            if r is None or self._sessions.get(session.server_id) is not session:
                return
            r.last_seen_ms = self._now_ms()
            reported = applied.split_revision
            if reported > self.issued_revision():
                # Ignored, never stored: it would push every later revision
                # past it (and past 2^64). The rest of the answer stands.
                self.counters["bad_revisions"] += 1
                reported = 0
            if reported:
                r.split_revision = reported
            p = r.pending.get(applied.directive_id)
            with ins.span(
                "directive.applied",
                server_id=session.server_id,
                kind=p.kind if p is not None else "unknown",
                ok=applied.ok,
                error=applied.error or None,
            ):
                pass
            ins.directive_applied(p.kind if p is not None else "unknown", applied.ok)
            probes: list[ProbeRecord] = []
            if p is None:
                self.counters["applied_unknown"] += 1
            elif applied.ok:
                self.counters["applied_ok"] += 1
                r.applied += 1
                del r.pending[applied.directive_id]
                if p.kind == "load":
                    r.loaded.add(p.key)
                elif p.kind == "unload":
                    r.loaded.discard(p.key)
                elif p.kind == "split" and not reported:
                    r.split_revision = max(r.split_revision, int(p.key))
                elif p.kind == "probe":
                    probe = self._probes.get(p.key)
                    if probe is not None:
                        probe.state, probe.ok, probe.error = "done", True, ""
                        probe.done_ms = self._now_ms()
                        probes.append(probe)
            else:
                self.counters["applied_failed"] += 1
                r.failed += 1
                p.attempts += 1
                p.in_flight = False
                error = applied.error[:_MAX_ERROR_CHARS] or "failed without a reason"
                p.last_error = r.last_error = error
                delay = min(
                    self._config.retry_initial_seconds * 2 ** (p.attempts - 1),
                    self._config.retry_max_seconds,
                )
                p.retry_at_ms = self._now_ms() + int(delay * 1000)
                if p.kind == "probe":
                    probe = self._probes.get(p.key)
                    if probe is not None:
                        probe.error = p.last_error
                        probes.append(probe)
            self._plan(r)
            await self._persist(replicas=[r], probes=probes)
            self._send_ready(r)
        self._notify()

    async def _end_session(self, session: _Session) -> None:
        session.close()
        async with self._lock:
            if self._sessions.get(session.server_id) is not session:
                return
            del self._sessions[session.server_id]
            r = self._replicas.get(session.server_id)
            if r is None:
                return
            # Unanswered probes may go to another replica.
            probes = []
            for p in list(r.pending.values()):
                p.in_flight = False
                if p.kind == "probe":
                    del r.pending[p.directive_id]
                    probe = self._probes.get(p.key)
                    if probe is not None and probe.state == "sent":
                        probe.state, probe.server_id = "queued", ""
                        probes.append(probe)
            touched = {r.server_id: r}
            for other in self._assign_probes():
                touched[other.server_id] = other
            if not self._draining:
                try:
                    await self._persist(replicas=list(touched.values()), probes=probes)
                except Exception:
                    log.exception("cannot store the end of a control stream")
                for t in touched.values():
                    self._send_ready(t)
        self._notify()

    # -- reconciliation ------------------------------------------------------

    def _connected_replicas(self) -> list[Replica]:
        return [self._replicas[s] for s in self._sessions if s in self._replicas]

    def _add(self, r: Replica, kind: str, key: str, directive: control_pb2.Directive) -> None:
        directive.directive_id = uuid7()
        r.pending[directive.directive_id] = Pending(directive, kind, key)

    def _plan(self, r: Replica) -> bool:
        """Brings ``r``'s outbox in line with the desired state. True when it changed."""
        d = self._desired
        if d is None:
            return False
        changed = False
        can_load = CAP_LOAD in r.capabilities
        can_unload = CAP_UNLOAD in r.capabilities
        ready = not can_load or split_versions(d) <= r.loaded
        # Directives not in flight that the replica no longer needs. A split
        # planned before the replica (re)connected without a version it routes
        # to goes too: it is planned again once the LoadModel is applied, so
        # it is always sent after it.
        for p in list(r.pending.values()):
            if p.in_flight:
                continue
            obsolete = (
                (p.kind == "load" and (p.key in r.loaded or p.key not in d.loaded))
                or (p.kind == "unload" and (p.key not in r.loaded or p.key in d.loaded))
                or (
                    p.kind == "split"
                    and (int(p.key) != d.revision or r.split_revision >= d.revision or not ready)
                )
            )
            if obsolete:
                del r.pending[p.directive_id]
                changed = True
        if can_load:
            for v in sorted(d.loaded - r.loaded):
                if r.pending_of("load", v) is None:
                    msg = control_pb2.Directive(
                        load_model=control_pb2.LoadModel(
                            version=v, artifact_uri=d.artifacts.get(v, "")
                        )
                    )
                    self._add(r, "load", v, msg)
                    changed = True
        if (
            r.split_revision < d.revision
            and ready
            and r.pending_of("split", str(d.revision)) is None
        ):
            msg = control_pb2.Directive(set_traffic_split=_split_directive(d))
            self._add(r, "split", str(d.revision), msg)
            changed = True
        if can_unload and r.split_revision == d.revision:
            for v in sorted(r.loaded - d.loaded):
                if r.pending_of("unload", v) is None:
                    msg = control_pb2.Directive(unload_model=control_pb2.UnloadModel(version=v))
                    self._add(r, "unload", v, msg)
                    changed = True
        return changed

    @staticmethod
    def _probe_directive_id(probe_id: str) -> str:
        return f"probe/{probe_id}"

    def _assign_probes(self) -> list[Replica]:
        """Gives each queued probe to a connected replica that can run it."""
        touched: list[Replica] = []
        for probe in self._probes.values():
            if probe.state != "queued":
                continue
            candidates = [
                r
                for r in self._connected_replicas()
                if CAP_PROBE in r.capabilities
                and (probe.version in r.loaded or CAP_LOAD not in r.capabilities)
            ]
            if not candidates:
                continue
            r = min(candidates, key=lambda c: (len(c.pending), c.server_id))
            did = self._probe_directive_id(probe.probe_id)
            msg = control_pb2.Directive(
                directive_id=did,
                run_probe=control_pb2.RunProbe(
                    version=probe.version, probe_id=probe.probe_id, prompts=probe.prompts
                ),
            )
            r.pending[did] = Pending(msg, "probe", probe.probe_id)
            probe.state, probe.server_id = "sent", r.server_id
            if r not in touched:
                touched.append(r)
        return touched

    def _send_ready(self, r: Replica) -> None:
        """Puts every sendable pending directive of ``r`` on its stream."""
        session = self._sessions.get(r.server_id)
        if session is None or session.closed:
            return
        now = self._now_ms()
        for p in r.pending.values():
            if p.in_flight or p.retry_at_ms > now:
                continue
            p.in_flight = True
            if p.attempts:
                self.counters["directives_resent"] += 1
            else:
                self.counters["directives_sent"] += 1
            with ins.span(
                "directive.send",
                server_id=r.server_id,
                kind=p.kind,
                key=p.key,
                attempt=p.attempts + 1,
            ):
                session.queue.put_nowait(p.directive)
            ins.directive_sent(p.kind)

    async def _retry_loop(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = self._now_ms()
            if now - self._last_sweep_ms >= _EXPIRY_SWEEP_MS:
                async with self._lock:
                    expired = self._expire(now)
                    if expired:
                        await self._persist(deletes=expired)
            due = [
                r
                for r in self._connected_replicas()
                if any(not p.in_flight and 0 < p.retry_at_ms <= now for p in r.pending.values())
            ]
            if due:
                async with self._lock:
                    for r in due:
                        self._send_ready(r)

    def _expire(self, now_ms: int, *, arriving: str | None = None) -> list[bytes]:
        """Forgets disconnected replicas; returns their store keys to delete.

        Those unseen for control.replica_expiry_seconds go, and, while the
        records are at control.max_replicas and ``arriving`` (a server_id
        saying Hello) would need a new one, the one seen longest ago. A
        connected replica (or ``arriving``) is never forgotten.
        """
        self._last_sweep_ms = now_ms
        idle = sorted(
            (r for s, r in self._replicas.items() if s not in self._sessions and s != arriving),
            key=lambda r: (r.last_seen_ms, r.server_id),
        )
        expiry_ms = int(self._config.replica_expiry_seconds * 1000)
        # Oldest first, so those past the age are a prefix of ``idle``.
        gone = [r for r in idle if expiry_ms and now_ms - r.last_seen_ms > expiry_ms]
        needs_record = arriving is not None and arriving not in self._replicas
        room = self._config.max_replicas - (1 if needs_record else 0)
        excess = len(self._replicas) - len(gone) - room
        if excess > 0:
            gone.extend(idle[len(gone) : len(gone) + excess])
        for r in gone:
            del self._replicas[r.server_id]
        self.counters["replicas_expired"] += len(gone)
        return [r.key for r in gone]

    # -- storage ---------------------------------------------------------------

    async def _persist(
        self,
        *,
        desired: DesiredState | None = None,
        replicas: Sequence[Replica] = (),
        probes: Sequence[ProbeRecord] = (),
        deletes: Sequence[bytes] = (),
    ) -> None:
        puts: list[tuple[str, bytes, bytes]] = []
        if desired is not None:
            puts.append(("meta", DESIRED_KEY, desired_to_json(desired)))
        puts.extend(("directives", r.key, r.to_json()) for r in replicas)
        puts.extend(("directives", p.key, p.to_json()) for p in probes)
        if not puts and not deletes:
            return
        store = self._store

        def write(txn: lmdb.Transaction) -> None:
            for key in deletes:
                txn.delete(key, db=store.db("directives"))
            for db, key, value in puts:
                txn.put(key, value, db=store.db(db))

        # Shielded: a stream cancelled mid-write must not cancel the writer's
        # job; the state is in memory already and must reach the store.
        await asyncio.shield(self._writer.run(write))

    def _notify(self) -> None:
        self._changed.set()

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)


class ControlServicer(control_pb2_grpc.ControlServiceServicer):
    """``ControlService`` on the daemon's gRPC server; the logic is in :class:`ControlChannel`."""

    def __init__(self, channel: ControlChannel) -> None:
        self._channel = channel

    async def Connect(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[control_pb2.ServerMessage],
        context: grpc.aio.ServicerContext,
    ) -> None:
        await self._channel.connect(context)
