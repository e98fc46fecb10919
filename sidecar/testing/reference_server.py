"""A reference inference server for end-to-end tests, built only on the client library.

It uses what any inference server would: :class:`EventStream` to report
requests and feedback, :class:`ControlLoop` to follow the sidecar's directives
and :class:`Router` to pick the version of each request. The "models" are
synthetic: every version answers a prompt with the same base text (plus an
optional suffix), and a version's *behaviour* decides its error rate, its
latency (reported for live and mirrored requests, taken for real by probes,
which the client library times) and how its users react.

Simulated users send requests at a fixed rate. Each request is routed on its
session (a user's conversation of a few turns); when the router says so, the
request is also mirrored to the shadow version and that answer is recorded
with role SHADOW under the same ``request_id`` (the sidecar pairs the two by
request id). Users react to a share of the answers: a ``positive`` version
gets COPY / ENGAGE / THUMBS_UP / SHARE, a ``negative`` one DISMISS / RETRY /
THUMBS_DOWN, and a failed request gets RETRY.

Run it::

    python -m sidecar.testing.reference_server --target 127.0.0.1:50051 \\
        --server-id pod-a --stable v1 --behaviour v2=good --behaviour v3=bad \\
        --rps 30 --state-file /tmp/pod-a.json

Behaviours come from ``--behaviour VERSION=PRESET`` (presets ``good`` and
``bad``) or a JSON file (``--behaviour-file``) mapping versions to fields of
:class:`Behaviour`; unknown versions behave as ``good``.

The state file (JSON, replaced atomically every ``--state-interval`` seconds
and at exit) reports the split in force, every split applied with its wall
time, every directive applied with how often (``duplicates`` lists ids
applied more than once), model loads and unloads, and request counts per
version. The process prints ``{"event": "ready"}`` once the sidecar took its
Hello and stops cleanly on SIGTERM or SIGINT.
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
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from atlas_sidecar_client import ControlLoop, EventStream, Role, Router, Signal, TrafficSplit
from atlas_sidecar_client.pb import control_pb2

from sidecar._aio import spawn

__all__ = ["PRESETS", "Behaviour", "ReferenceServer", "main"]

_TOPICS = ("parse", "sort", "merge", "cache", "retry", "index", "stream", "encode")
_OBJECTS = ("a csv file", "a json document", "two lists", "the results", "a log file")
_LANGS = ("python", "go", "typescript", "rust")

_POSITIVE = (Signal.COPY, Signal.ENGAGE, Signal.THUMBS_UP, Signal.SHARE)
_NEGATIVE = (Signal.DISMISS, Signal.RETRY, Signal.THUMBS_DOWN)


@dataclass(frozen=True)
class Behaviour:
    """How one model version behaves.

    ``error_rate`` applies to live (PRIMARY) requests; ``shadow_error_rate``
    and ``probe_error_rate`` (default: ``error_rate``) to mirrored requests
    and probes, so a test can model a defect that only real users meet.
    """

    error_rate: float = 0.0
    shadow_error_rate: float | None = None
    probe_error_rate: float | None = None
    #: "positive" or "negative": how users react to the answers.
    feedback: str = "positive"
    latency_ms: float = 40.0
    #: Appended to the base answer, to make a version answer differently.
    suffix: str = ""

    def __post_init__(self) -> None:
        if self.feedback not in ("positive", "negative"):
            raise ValueError(f"feedback: expected 'positive' or 'negative', got {self.feedback!r}")
        for name in ("error_rate", "shadow_error_rate", "probe_error_rate"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1], got {value}")
        if self.latency_ms <= 0:
            raise ValueError(f"latency_ms: must be > 0, got {self.latency_ms}")

    def errors(self, role: str) -> float:
        rate = {"shadow": self.shadow_error_rate, "probe": self.probe_error_rate}.get(role)
        return self.error_rate if rate is None else rate


PRESETS: dict[str, Behaviour] = {
    "good": Behaviour(),
    "bad": Behaviour(error_rate=0.25, feedback="negative"),
}


def load_behaviours(pairs: list[str], path: str | None) -> dict[str, Behaviour]:
    """Behaviours from ``VERSION=PRESET`` pairs and an optional JSON file.

    Raises:
        ValueError: a pair, preset, file entry or field is bad (named in the message).
    """
    out: dict[str, Behaviour] = {}
    if path:
        doc = json.loads(Path(path).read_text())
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: expected an object mapping versions to behaviours")
        known = {f.name for f in fields(Behaviour)}
        for version, spec in doc.items():
            if isinstance(spec, str):
                spec = {"preset": spec}
            if not isinstance(spec, dict):
                raise ValueError(f"{path}: {version}: expected an object or a preset name")
            base = PRESETS.get(str(spec.pop("preset", "good")))
            if base is None:
                raise ValueError(f"{path}: {version}.preset: expected one of {sorted(PRESETS)}")
            unknown = sorted(set(spec) - known)
            if unknown:
                raise ValueError(f"{path}: {version}: unknown field(s) {unknown}")
            out[version] = Behaviour(**{**asdict(base), **spec})
    for pair in pairs:
        version, sep, preset = pair.partition("=")
        if not sep or not version or preset not in PRESETS:
            raise ValueError(
                f"--behaviour {pair!r}: expected VERSION=PRESET, PRESET in {sorted(PRESETS)}"
            )
        out[version] = PRESETS[preset]
    return out


def base_answer(prompt: str) -> str:
    words = prompt.rstrip("?").split()
    return f"to {' '.join(words[3:])} first read the input then apply the standard steps and check the result"


class ReferenceServer:
    """The server: traffic generator, model stand-ins and state reporting."""

    def __init__(self, args: argparse.Namespace, behaviours: dict[str, Behaviour]) -> None:
        self.args = args
        self.behaviours = behaviours
        self.rng = random.Random(args.seed)
        self.events = EventStream(args.target, linger_ms=5.0, backoff_max=0.5)
        self.router = Router(TrafficSplit.single(args.stable), default_version=args.stable)
        self.loop = ControlLoop(
            args.target,
            args.server_id,
            router=self.router,
            on_load=self._load,
            on_unload=self._unload,
            on_probe=self._answer_probe,
            events=self.events,
            on_applied=self._applied,
            loaded_versions=[args.stable],
            backoff_initial=0.05,
            backoff_max=args.backoff_max,
        )
        self.applied: Counter[str] = Counter()
        self.splits: list[dict[str, Any]] = []
        self.model_calls: list[dict[str, Any]] = []
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.mirrored: Counter[str] = Counter()
        self.feedback: Counter[str] = Counter()
        self.served = 0
        self._sessions: dict[str, tuple[str, int]] = {}
        self._stopping = asyncio.Event()

    # -- models ------------------------------------------------------------

    def behaviour(self, version: str) -> Behaviour:
        return self.behaviours.get(version, PRESETS["good"])

    def _load(self, version: str, artifact_uri: str) -> None:
        self.model_calls.append({"call": "load", "version": version, "at": time.time()})

    def _unload(self, version: str) -> None:
        self.model_calls.append({"call": "unload", "version": version, "at": time.time()})

    def _generate(self, version: str, prompt: str, role: str) -> tuple[str, float, bool]:
        b = self.behaviour(version)
        latency = self.rng.lognormvariate(0.0, 0.25) * b.latency_ms
        if self.rng.random() < b.errors(role):
            return "", latency, True
        answer = base_answer(prompt)
        return (f"{answer} {b.suffix}" if b.suffix else answer), latency, False

    async def _answer_probe(self, version: str, prompt: str) -> str:
        answer, latency, failed = self._generate(version, prompt, "probe")
        # The ControlLoop times a probe around this call: take the version's
        # latency as its model would. Answered at once, every version would
        # take a few microseconds, and the sidecar's median-latency check
        # would compare scheduling noise (a 3x ratio of two ~0 ms medians).
        await asyncio.sleep(latency / 1000.0)
        if failed:
            raise RuntimeError(f"{version} failed to answer")
        return answer

    def _applied(self, d: control_pb2.Directive, applied: control_pb2.Applied) -> None:
        if not applied.ok:
            return
        self.applied[d.directive_id] += 1
        if d.WhichOneof("action") == "set_traffic_split" and (
            applied.split_revision == d.set_traffic_split.revision
        ):
            self.splits.append({**self._split_doc(), "at": time.time()})

    def _split_doc(self) -> dict[str, Any]:
        split = self.router.split
        if split is None:
            return {"revision": 0, "routes": {}, "stable": "", "shadow": "", "mirror_bps": 0}
        return {
            "revision": split.revision,
            "routes": {r.version: r.weight_bps for r in split.routes if r.weight_bps},
            "stable": split.stable_version,
            "shadow": split.shadow_version,
            "mirror_bps": split.mirror_bps,
        }

    # -- traffic -----------------------------------------------------------

    def _session_of(self, user: str) -> str:
        session, turns = self._sessions.get(user, ("", 0))
        if not session or turns >= self.args.session_turns:
            session, turns = f"{user}-s{self.rng.getrandbits(40):010x}", 0
        self._sessions[user] = (session, turns + 1)
        return session

    def serve_one(self) -> None:
        n = self.served
        self.served += 1
        user = f"user-{self.rng.randrange(self.args.users)}"
        session = self._session_of(user)
        rid = f"{self.args.server_id}-{os.getpid()}-{n}"
        prompt = (
            f"how do I {self.rng.choice(_TOPICS)} {self.rng.choice(_OBJECTS)} "
            f"in {self.rng.choice(_LANGS)}?"
        )
        decision = self.router.route(rid, session_id=session, user_id=user)
        version = decision.version
        answer, latency, failed = self._generate(version, prompt, "primary")
        self.requests[version] += 1
        self.events.record_inference(
            rid,
            version,
            prompt,
            answer,
            latency_ms=latency,
            error=failed,
            error_code="model_error" if failed else "",
            session_id=session,
            user_id=user,
        )
        if decision.mirror:
            shadow, s_latency, s_failed = self._generate(decision.mirror_version, prompt, "shadow")
            self.mirrored[decision.mirror_version] += 1
            self.events.record_inference(
                rid,
                decision.mirror_version,
                prompt,
                shadow,
                latency_ms=s_latency,
                role=Role.SHADOW,
                error=s_failed,
                error_code="model_error" if s_failed else "",
                session_id=session,
                user_id=user,
            )
        if failed:
            self.errors[version] += 1
            signal_ = Signal.RETRY
        elif self.rng.random() < self.args.feedback_rate:
            pool = _POSITIVE if self.behaviour(version).feedback == "positive" else _NEGATIVE
            signal_ = self.rng.choice(pool)
        else:
            return
        self.feedback[version] += 1
        self.events.record_feedback(rid, signal=signal_, user_id=user, session_id=session)

    async def _traffic(self) -> None:
        interval = 1.0 / self.args.rps
        next_at = time.monotonic()
        while not self._stopping.is_set():
            # A late tick sends what it owes, but never more than a second's worth.
            now = time.monotonic()
            owed = min(int((now - next_at) / interval) + 1, max(1, int(self.args.rps)))
            for _ in range(owed):
                self.serve_one()
            next_at = max(next_at + owed * interval, now - 1.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), max(0.0, next_at - time.monotonic()))

    # -- state -------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        stats = self.loop.stats
        ev = self.events.stats
        return {
            "server_id": self.args.server_id,
            "pid": os.getpid(),
            "time": time.time(),
            "connected": self.loop.connected,
            "loaded": sorted(self.loop.loaded),
            "split": self._split_doc(),
            "splits": self.splits,
            "directives_applied": dict(self.applied),
            "duplicates": sorted(d for d, n in self.applied.items() if n > 1),
            "model_calls": self.model_calls,
            "served": self.served,
            "requests": dict(self.requests),
            "errors": dict(self.errors),
            "mirrored": dict(self.mirrored),
            "feedback": dict(self.feedback),
            "fallbacks": self.router.fallbacks,
            "control": {
                "connects": stats.connects,
                "reconnects": stats.reconnects,
                "directives": stats.directives,
                "applied_ok": stats.applied_ok,
                "applied_failed": stats.applied_failed,
                "duplicates": stats.duplicates,
                "probes": stats.probes,
                "last_error": stats.last_error,
            },
            "events": {
                "recorded": ev.recorded,
                "acked": ev.acked_events,
                "dropped": ev.dropped,
                "rejected": ev.rejected,
                "pending": self.events.pending,
            },
        }

    def write_state(self) -> None:
        path = Path(self.args.state_file)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.state(), indent=1))
        os.replace(tmp, path)

    async def _report(self) -> None:
        while not self._stopping.is_set():
            self.write_state()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.args.state_interval)

    # -- lifecycle ---------------------------------------------------------

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        await self.loop.start()
        await self.loop.wait_connected()
        print(json.dumps({"event": "ready", "server_id": self.args.server_id}), flush=True)
        tasks = [
            spawn(self._traffic(), stage="reference-server", name="traffic"),
            spawn(self._report(), stage="reference-server", name="report"),
        ]
        try:
            await self._stopping.wait()
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            await self.loop.stop()
            await self.events.aclose(5.0)
            self.write_state()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sidecar.testing.reference_server",
        description="A synthetic inference server driven by the atlas-sidecar client library.",
    )
    p.add_argument("--target", required=True, help="sidecar gRPC address (host:port)")
    p.add_argument("--server-id", required=True, help="this replica's id (sent in Hello)")
    p.add_argument("--stable", default="v1", help="version loaded at start (default v1)")
    p.add_argument(
        "--behaviour",
        action="append",
        default=[],
        metavar="VERSION=PRESET",
        help=f"a version's behaviour preset, one of {sorted(PRESETS)} (repeatable)",
    )
    p.add_argument("--behaviour-file", help="JSON: {version: {field: value, preset: name}}")
    p.add_argument("--rps", type=float, default=30.0, help="requests per second (default 30)")
    p.add_argument("--users", type=int, default=200, help="simulated users (default 200)")
    p.add_argument("--session-turns", type=int, default=3, help="requests per session")
    p.add_argument(
        "--feedback-rate", type=float, default=0.6, help="share of answers users react to"
    )
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--state-file", required=True, help="where to write the JSON state")
    p.add_argument("--state-interval", type=float, default=0.2, help="seconds between writes")
    p.add_argument(
        "--backoff-max", type=float, default=0.5, help="longest reconnect wait in seconds"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        behaviours = load_behaviours(args.behaviour, args.behaviour_file)
    except (ValueError, OSError) as exc:
        print(f"reference_server: {exc}", file=sys.stderr)
        return 2
    for name, value, low in (("--rps", args.rps, 0.0), ("--users", args.users, 0)):
        if value <= low:
            print(f"reference_server: {name} must be > {low}", file=sys.stderr)
            return 2
    if not 0.0 <= args.feedback_rate <= 1.0:
        print("reference_server: --feedback-rate must be in [0, 1]", file=sys.stderr)
        return 2

    async def run() -> None:
        server = ReferenceServer(args, behaviours)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.stop)
        await server.run()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
