"""Random ControlService, AdminService and ingest traffic never breaks the daemon.

One daemon in this process (real grpc.aio on loopback, real LMDB) takes, per
example, a random mix of:

- ControlService.Connect streams: Hello with random server ids, loaded
  versions (also more than the cap), capabilities and split revisions (also
  ones near 2^64 that were never issued); Applied with random directive ids,
  answers to the directives the stream actually got, and random revisions;
  empty messages; streams left open across the other calls, half-closed or
  cancelled;
- AdminService requests with random names, text and numbers;
- random ingest batches.

Each answer must be a status that names a client error (never UNKNOWN or
INTERNAL, which mean the daemon failed). After each example the daemon still
answers GetStatus, registers a fresh candidate and starts, then aborts, a
rollout of it, and the process stays under a stated memory bound. At the
end the daemon is restarted on the same data dir and must do the same:
nothing a client sent may survive in the store as poison.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import threading
from collections.abc import Awaitable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest
from atlas_sidecar_client.pb import (
    admin_pb2,
    admin_pb2_grpc,
    control_pb2,
    control_pb2_grpc,
    events_pb2,
    ingest_pb2_grpc,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sidecar.app import SidecarApp
from sidecar.testing import free_port
from tests._helpers import FAST_CONTROL_RETRY, fixed_port_config, wait_until
from tests.conftest import target_of
from tests.integration.test_ingest_property import event as ingest_event

T = TypeVar("T")

WAIT = 20.0

#: What the daemon may answer anything a client sends.
CLIENT_ERRORS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}

#: control.max_replicas of the daemon under test: small, so that examples
#: reach it (and the expiry of disconnected records that makes room).
MAX_REPLICAS = 6

#: Growth of this process's RSS from the first example to any later one,
#: after Hellos of the largest size have been served once (the allocator's
#: pools and gRPC's buffers have grown to what a 3.5 MB message needs).
#: What the daemon keeps is capped by config: MAX_REPLICAS records of at
#: most control.max_loaded_versions (64) names of 128 bytes, about 50 KB;
#: telemetry.max_versions (64) version entries; about 100 B per request
#: remembered for feedback, for the few thousand events ingested here; the
#: store is a file-backed map of a few MB. Runs measured 5 to 50 MB of
#: growth (freed pages of large messages the allocator keeps); a daemon
#: keeping each Hello it took (tens of MB of capabilities per run) measured
#: 50 to 80 MB on top of that.
RSS_GROWTH_BOUND = 96 * 1024 * 1024

#: The status document stays small whatever was sent: replica records are
#: capped as above, the rest is counters and a few rollouts.
STATUS_BOUND = MAX_REPLICAS * 64 * 160 + 256 * 1024

#: The daemon issues one revision per change of the desired state, a few
#: per example; a reported revision must never push it past this.
REVISION_BOUND = 100_000

#: A daemon whose operator-started rollouts go straight to the canary.
ROLLOUT = {
    "initial_stable_version": "v1",
    "validation": {"enabled": False},
    "shadow": {"enabled": False},
}

TERMINAL = {
    admin_pb2.ROLLOUT_STATE_PROMOTED,
    admin_pb2.ROLLOUT_STATE_ROLLED_BACK,
    admin_pb2.ROLLOUT_STATE_ABORTED,
}

# -- strategies -------------------------------------------------------------


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Draws from one of ``choices``, each as often as its weight says.

    ``st.one_of`` flattens nested ``one_of``s into one list of branches and
    draws each alike, so a strategy with many branches would crowd out the rest.
    """
    return st.sampled_from([s for w, s in choices for _ in range(w)]).flatmap(lambda s: s)


# Valid values are drawn about as often as bad ones, so that examples get
# past the checks at the door: Hellos taken, candidates registered, rollouts
# started while replicas are connected, directives answered.
versions = st.sampled_from(["v1", "v2", "c1", "c2", "c3"])
#: More ids than control.max_replicas (MAX_REPLICAS), so that the cap is reached.
server_ids = st.integers(0, MAX_REPLICAS + 3).map(lambda i: f"pod-{i}")
bad_names = st.sampled_from(["", "-rf", ".hidden", "../x", "v2; rm -rf /", "p" * 129]) | st.text(
    max_size=140
)
names = versions | server_ids | bad_names
texts = st.text(max_size=1500)
#: Small ones were issued (or soon will be); the others never were.
revisions = st.one_of(
    st.integers(0, 6),
    st.integers(0, 6),
    st.integers(0, 2**64 - 1),
    st.sampled_from([2**63, 2**64 - 1]),
)
known_capabilities = st.sampled_from(["load_model", "unload_model", "run_probe"])
#: The most bytes of capabilities in one Hello: just under
#: server.max_message_bytes (4 MiB), so that the daemon takes the message.
BIG_HELLO_BYTES = 3_500_000


def unknown_capabilities(n: int) -> list[str]:
    """``load_model`` and ``n`` capabilities of 210 bytes the daemon must not keep."""
    return ["load_model", *(f"cap-{i:05d}-" + "y" * 200 for i in range(n))]


capabilities = weighted(
    (2, st.lists(known_capabilities, max_size=3)),
    (1, st.lists(known_capabilities | st.text(max_size=30), max_size=5)),
    (2, st.integers(1, BIG_HELLO_BYTES // 210).map(unknown_capabilities)),
)
loaded = (
    st.lists(versions, max_size=4)
    | st.lists(versions, max_size=4)
    | st.lists(names, max_size=4)
    # around control.max_loaded_versions (64) names of 128 bytes
    | st.integers(60, 70).map(lambda n: [f"v{i:03d}".ljust(128, "x") for i in range(n)])
)

#: A Hello a well-behaved server might send (unknown capabilities are
#: allowed, and dropped), or one where any field may be hostile.
hello = st.builds(
    control_pb2.Hello,
    server_id=server_ids,
    loaded_versions=st.lists(versions, max_size=4)
    | st.just([f"v{i:03d}".ljust(128, "x") for i in range(64)]),
    split_revision=st.integers(0, 6),
    capabilities=capabilities,
) | st.builds(
    control_pb2.Hello,
    server_id=server_ids | names,
    loaded_versions=loaded,
    split_revision=revisions,
    capabilities=capabilities,
)
applied = st.builds(
    control_pb2.Applied,
    directive_id=names | st.sampled_from(["d-1", "d-2"]),
    ok=st.booleans(),
    error=st.text(max_size=300),
    split_revision=revisions,
)


@dataclass(frozen=True)
class Answer:
    """An Applied for each directive the stream has read and not answered yet.

    ``split_revision`` 0 reports each directive's own revision (what a
    well-behaved server says); any other value is reported as it is.
    """

    ok: bool
    error: str
    split_revision: int


answers = st.builds(Answer, ok=st.booleans(), error=st.text(max_size=40), split_revision=revisions)
server_messages = st.one_of(
    st.builds(control_pb2.ServerMessage, hello=hello),
    st.builds(control_pb2.ServerMessage, applied=applied),
    st.just(control_pb2.ServerMessage()),
    answers,
)


@dataclass(frozen=True)
class Connect:
    """A Connect stream: its first message (usually a Hello), the rest, how the client ends it.

    A stream kept open until the example ends sees the admin requests that
    follow; ``last`` answers what it got by then, before it half-closes.
    """

    first: Any | None
    rest: list[Any]
    end: str  # "half-close" now, "cancel" now, or "keep" open until the example ends
    last: Answer | None


connects = st.builds(
    Connect,
    first=weighted(
        (6, st.builds(control_pb2.ServerMessage, hello=hello)),
        (1, server_messages),
        (1, st.none()),
    ),
    rest=st.lists(server_messages, max_size=4),
    end=st.sampled_from(["half-close", "cancel", "keep", "keep"]),
    last=answers | st.none(),
)

metrics = st.dictionaries(
    st.text(max_size=140), st.floats(allow_nan=True, allow_infinity=True), max_size=70
)
valid_admin_requests = st.one_of(
    st.builds(
        admin_pb2.RegisterCandidateRequest,
        version=versions,
        artifact_uri=versions.map(lambda v: f"file:///models/{v}"),
        base_version=st.just("") | versions,
    ),
    st.builds(
        admin_pb2.StartRolloutRequest,
        candidate_version=versions,
        strategy=st.integers(0, 2),
        reason=st.text(max_size=20),
    ),
    st.builds(admin_pb2.PromoteRolloutRequest, reason=st.text(max_size=20)),
)
hostile_admin_requests = st.one_of(
    st.builds(
        admin_pb2.RegisterCandidateRequest,
        version=names,
        artifact_uri=st.sampled_from(["file:///models/c", ""]) | st.text(max_size=5000),
        base_version=names,
        update_id=names,
        metrics=metrics,
    ),
    st.builds(
        admin_pb2.StartRolloutRequest,
        candidate_version=names,
        strategy=st.integers(0, 2),
        reason=texts,
    ),
    st.builds(admin_pb2.PromoteRolloutRequest, rollout_id=names, reason=texts),
    st.builds(admin_pb2.AbortRolloutRequest, rollout_id=names, reason=texts),
    st.builds(admin_pb2.RollbackRequest, rollout_id=names, reason=texts),
    st.builds(admin_pb2.ListRolloutsRequest, limit=st.integers(0, 2**32 - 1)),
    st.builds(admin_pb2.TriggerLearningRequest, reason=texts),
    st.just(admin_pb2.GetStatusRequest()),
    st.builds(
        admin_pb2.ExportSamplesRequest,
        kind=st.integers(0, 5),
        limit=st.integers(0, 2**32 - 1),
        include_quarantined=st.booleans(),
    ),
)
admin_requests = weighted((1, valid_admin_requests), (1, hostile_admin_requests))
ingest_batches = st.lists(ingest_event, max_size=12).map(
    lambda evs: events_pb2.EventBatch(events=evs)
)

actions = st.lists(
    weighted((2, connects), (2, admin_requests), (1, ingest_batches)), min_size=1, max_size=6
)


# -- driving the daemon -----------------------------------------------------


class LoopThread:
    """An event loop on its own thread: the daemon lives there across examples."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def _app(data_dir: Path, port: int) -> SidecarApp:
    control = {**FAST_CONTROL_RETRY, "max_replicas": MAX_REPLICAS}
    return SidecarApp(fixed_port_config(data_dir, port, control=control, rollout=ROLLOUT))


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def _code_of(call: Awaitable[Any]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@dataclass
class Stream:
    """One open Connect call, the directives it has read, and how it ended."""

    call: grpc.aio.StreamStreamCall
    directives: list[control_pb2.Directive] = field(default_factory=list)
    cancelled: bool = False
    write_failed: bool = False
    answered: int = 0
    reader: asyncio.Task[None] | None = None

    async def pump(self) -> None:
        try:
            while True:
                d = await self.call.read()
                if d is grpc.aio.EOF:
                    return
                self.directives.append(d)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            return  # the final status is read from the call

    async def send(self, messages: list[Any]) -> None:
        for m in messages:
            batch = [m] if not isinstance(m, Answer) else self._answers(m)
            for one in batch:
                if self.call.done():
                    return
                try:
                    await self.call.write(one)
                except (grpc.RpcError, asyncio.InvalidStateError):
                    # The daemon ended the stream: the call's status says how.
                    self.write_failed = True
                    return

    def _answers(self, answer: Answer) -> list[control_pb2.ServerMessage]:
        todo, self.answered = self.directives[self.answered :], len(self.directives)
        out = []
        for d in todo or [control_pb2.Directive(directive_id="d-0")]:
            own = d.set_traffic_split.revision if d.HasField("set_traffic_split") else 0
            out.append(
                control_pb2.ServerMessage(
                    applied=control_pb2.Applied(
                        directive_id=d.directive_id,
                        ok=answer.ok,
                        error=answer.error,
                        split_revision=answer.split_revision or own,
                    )
                )
            )
        return out

    async def end(self, how: str) -> grpc.StatusCode:
        if how == "cancel":
            self.cancelled = True
            self.call.cancel()
        elif not self.call.done():
            with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                await self.call.done_writing()
        async with asyncio.timeout(WAIT):
            code = await self.call.code()
            if self.reader is not None:
                await self.reader
        return code


async def _connect(channel: grpc.aio.Channel, action: Connect) -> Stream:
    stream = Stream(control_pb2_grpc.ControlServiceStub(channel).Connect())
    stream.reader = asyncio.ensure_future(stream.pump())
    if action.first is None:
        return stream
    await stream.send([action.first])
    # The daemon sends its initial metadata once it has taken the Hello; a
    # refused one ends the stream without. Writing on after a refusal races
    # the daemon's status: a write that loses it ends the call as INTERNAL
    # on the client's side, whatever the daemon said.
    md = dict(await stream.call.initial_metadata())
    if "atlas-desired-revision" in md:
        await stream.send(action.rest)
    return stream


async def _admin(admin: admin_pb2_grpc.AdminServiceStub, request: Any) -> grpc.StatusCode:
    method = {
        admin_pb2.RegisterCandidateRequest: admin.RegisterCandidate,
        admin_pb2.StartRolloutRequest: admin.StartRollout,
        admin_pb2.PromoteRolloutRequest: admin.PromoteRollout,
        admin_pb2.AbortRolloutRequest: admin.AbortRollout,
        admin_pb2.RollbackRequest: admin.Rollback,
        admin_pb2.ListRolloutsRequest: admin.ListRollouts,
        admin_pb2.TriggerLearningRequest: admin.TriggerLearning,
        admin_pb2.GetStatusRequest: admin.GetStatus,
    }.get(type(request))
    if method is not None:
        return await _code_of(method(request, timeout=WAIT))

    async def export() -> None:
        async for _row in admin.ExportSamples(request, timeout=WAIT):
            pass

    return await _code_of(export())


async def _ingest(channel: grpc.aio.Channel, batch: events_pb2.EventBatch) -> grpc.StatusCode:
    stub = ingest_pb2_grpc.IngestServiceStub(channel)
    try:
        ack = await stub.RecordEvents(batch, timeout=WAIT)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    assert ack.accepted + ack.duplicates + len(ack.rejected) == len(batch.events), ack
    return grpc.StatusCode.OK


async def run_example(app: SidecarApp, todo: list[Any]) -> list[str]:
    """Sends ``todo``; every answer must name a client error; open streams end last.

    Returns what each action got ("StartRollout: OK", "Connect: 2 directives, OK"),
    for the statistics hypothesis shows.
    """
    seen: list[str] = []
    async with grpc.aio.insecure_channel(target_of(app)) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        kept: list[tuple[Stream, Answer | None]] = []

        async def ended(stream: Stream, how: str) -> None:
            code = await stream.end(how)
            allowed = CLIENT_ERRORS | ({grpc.StatusCode.CANCELLED} if stream.cancelled else set())
            assert code in allowed, (code, await stream.call.details(), stream)
            seen.append(f"Connect: {min(len(stream.directives), 3)} directives, {code.name}")

        for action in todo:
            if isinstance(action, Connect):
                stream = await _connect(channel, action)
                if action.end == "keep":
                    kept.append((stream, action.last))
                else:
                    await ended(stream, action.end)
                continue
            if isinstance(action, events_pb2.EventBatch):
                name, code = "RecordEvents", await _ingest(channel, action)
            else:
                name, code = type(action).__name__, await _admin(admin, action)
            assert code in CLIENT_ERRORS, (name, action, code)
            seen.append(f"{name}: {code.name}")
        for stream, last in kept:
            if last is not None:
                await asyncio.sleep(0.05)  # lets the directives already sent be read
                await stream.send([last])
            await ended(stream, "half-close")
    await wait_until(lambda: app.control.connected_servers() == 0, WAIT, what="streams gone")
    return seen


BIGGEST_HELLOS = [
    Connect(
        first=control_pb2.ServerMessage(
            hello=control_pb2.Hello(
                server_id=f"pod-{i}", capabilities=unknown_capabilities(BIG_HELLO_BYTES // 210)
            )
        ),
        rest=[],
        end=end,
        last=None,
    )
    for i, end in enumerate(["half-close", "keep", "keep", "cancel"])
]


_fresh = (f"fresh-{i}" for i in itertools.count())


async def still_serving(app: SidecarApp) -> None:
    """GetStatus answers, and a fresh candidate's rollout starts and aborts."""
    async with grpc.aio.insecure_channel(target_of(app)) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        status = await admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=WAIT)
        assert len(status.details_json) < STATUS_BOUND
        # A rollout the random requests started is theirs to have started:
        # the operator aborts it, then the daemon must take a new one.
        listed = await admin.ListRollouts(admin_pb2.ListRolloutsRequest(), timeout=WAIT)
        for rollout in listed.rollouts:
            if rollout.state not in TERMINAL:
                await admin.AbortRollout(
                    admin_pb2.AbortRolloutRequest(rollout_id=rollout.rollout_id), timeout=WAIT
                )
        version = next(_fresh)
        await admin.RegisterCandidate(
            admin_pb2.RegisterCandidateRequest(
                version=version, artifact_uri=f"file:///models/{version}"
            ),
            timeout=WAIT,
        )
        started = await admin.StartRollout(
            admin_pb2.StartRolloutRequest(candidate_version=version, reason="after fuzz"),
            timeout=WAIT,
        )
        assert started.candidate_version == version
        assert started.state == admin_pb2.ROLLOUT_STATE_CANARY
        aborted = await admin.AbortRollout(
            admin_pb2.AbortRolloutRequest(rollout_id=started.rollout_id), timeout=WAIT
        )
        assert aborted.state == admin_pb2.ROLLOUT_STATE_ABORTED
    replicas = json.loads(status.details_json)["control"]["replicas"]
    assert len(replicas) <= MAX_REPLICAS
    desired = app.control.desired()
    assert desired is not None and desired.revision < REVISION_BOUND
    assert app.control.issued_revision() < REVISION_BOUND


async def takes_a_replica(app: SidecarApp) -> None:
    """A well-behaved replica that reports the newest issued revision is taken."""
    async with grpc.aio.insecure_channel(target_of(app)) as channel:
        call = control_pb2_grpc.ControlServiceStub(channel).Connect()
        await call.write(
            control_pb2.ServerMessage(
                hello=control_pb2.Hello(
                    server_id="pod-well",
                    loaded_versions=["v1"],
                    split_revision=app.control.issued_revision(),
                )
            )
        )
        md = dict(await call.initial_metadata())
        assert int(md["atlas-desired-revision"]) == app.control.issued_revision()
        await wait_until(lambda: app.control.connected_servers() == 1, WAIT, what="pod-well")
        await call.done_writing()
        async with asyncio.timeout(WAIT):
            assert await call.code() == grpc.StatusCode.OK
    await wait_until(lambda: app.control.connected_servers() == 0, WAIT, what="pod-well gone")


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.mark.timeout(240)
def test_random_control_admin_and_ingest_traffic(
    tmp_path: Path, loop_thread: LoopThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    data_dir, port = tmp_path / "data", free_port()
    app = _app(data_dir, port)
    loop_thread.run(app.start())
    try:
        # The largest Hellos first: the allocator's pools grow to what they
        # need for them, and the bound is on what comes after.
        loop_thread.run(run_example(app, BIGGEST_HELLOS))
        loop_thread.run(still_serving(app))
        baseline = _rss()

        @settings(
            max_examples=150,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(todo=actions)
        def check(todo: list[Any]) -> None:
            for seen in loop_thread.run(run_example(app, todo)):
                event(seen)
            loop_thread.run(still_serving(app))
            rss = _rss()
            assert rss - baseline < RSS_GROWTH_BOUND, (rss, baseline)

        check()
        loop_thread.run(takes_a_replica(app))
    finally:
        loop_thread.run(app.shutdown())

    # Restarted on the same data dir: whatever was stored is fit to start from.
    app = _app(data_dir, port)
    loop_thread.run(app.start())
    try:
        assert app.control.issued_revision() < REVISION_BOUND
        loop_thread.run(still_serving(app))
        loop_thread.run(takes_a_replica(app))
        loop_thread.run(still_serving(app))
    finally:
        loop_thread.run(app.shutdown())
    problems = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not problems, [r.getMessage() for r in problems]
    assert "Traceback" not in caplog.text, caplog.text[-3000:]
