"""Rollouts with real processes: the daemon, a reference inference server, the CLI.

The reference server (``python -m sidecar.testing.reference_server``) is built
only on the client library (EventStream, ControlLoop, Router) and serves
synthetic traffic from simulated users; its versions' behaviours are set per
test. The daemon runs with fast rollout timings from its config file. Every
wait polls for a state with a generous deadline; nothing asserts on timing.
"""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import yaml
from atlas_sidecar_client.pb import admin_pb2, admin_pb2_grpc, events_pb2, ingest_pb2_grpc

from sidecar.config import StoreConfig
from sidecar.rollout import StoredObservations
from sidecar.store import Store
from sidecar.testing import DaemonProcess

T = TypeVar("T")

WAIT = 60.0
CLI = (
    [str(Path(sys.executable).parent / "atlas-sidecar")]
    if (Path(sys.executable).parent / "atlas-sidecar").exists()
    else [sys.executable, "-m", "sidecar.cli"]
)
STATE = {v: k for k, v in admin_pb2.RolloutState.items()}

# Fast timings: stages of a few seconds, small sample minimums. The guardrails
# keep their default error bound (alpha 0.01).
FAST: dict[str, Any] = {
    "rollout": {
        "initial_stable_version": "v1",
        "evaluate_interval_seconds": 0.2,
        "checkpoint_interval_seconds": 0.5,
        "unload_after_seconds": 600,
        "lease_seconds": 60,
        "validation": {"prompts": 10, "deadline_seconds": 40, "max_latency_ratio": 3.0},
        "shadow": {
            "mirror_bps": 5000,
            "min_dwell_seconds": 0.5,
            "max_dwell_seconds": 40,
            "min_samples": 15,
            "min_agreement": 0.5,
            "max_latency_p99_ratio": 3.0,
        },
        "canary": {
            "stages_percent": [20, 50, 100],
            "min_dwell_seconds": 1,
            "min_samples": 25,
            "max_dwell_seconds": 60,
        },
    },
    "control": {"retry_initial_seconds": 0.2, "retry_max_seconds": 2},
}

# A bad candidate whose defect only live users meet: its answers to probes
# and to mirrored requests are fine, so it reaches the canary; there 40 % of
# its answers fail and its users react badly to the rest. (At that rate the
# error guardrail alarms long before the two short stages could complete.)
BEHAVIOURS = {
    "v2": "good",
    "v3": {"preset": "bad", "error_rate": 0.4, "shadow_error_rate": 0.0, "probe_error_rate": 0.0},
}


def poll(fn: Callable[[], T | None], what: str, timeout: float = WAIT) -> T:
    """Calls ``fn`` until it returns something truthy; fails naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            got = fn()
        except (grpc.RpcError, OSError, ValueError) as exc:  # a restarting process
            got, last = None, exc
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last})")


def write_config(tmp: Path, **changes: Any) -> Path:
    doc = json.loads(json.dumps(FAST))
    for dotted, value in changes.items():
        node = doc
        *path, key = dotted.split("__")
        for part in path:
            node = node.setdefault(part, {})
        node[key] = value
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


class Admin:
    """Reads the daemon's state over AdminService."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._channel = grpc.insecure_channel(target)
        self._stub = admin_pb2_grpc.AdminServiceStub(self._channel)

    def rollouts(self) -> list[admin_pb2.Rollout]:
        resp = self._stub.ListRollouts(admin_pb2.ListRolloutsRequest(limit=20), timeout=5)
        return list(resp.rollouts)

    def rollout(self, rollout_id: str) -> admin_pb2.Rollout:
        return next(r for r in self.rollouts() if r.rollout_id == rollout_id)

    def start(self, candidate: str) -> admin_pb2.Rollout:
        """Registers ``candidate`` (a rollout needs a registered version), then starts it."""
        try:
            self._stub.RegisterCandidate(
                admin_pb2.RegisterCandidateRequest(version=candidate), timeout=10
            )
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
        req = admin_pb2.StartRolloutRequest(candidate_version=candidate, reason="e2e")
        return self._stub.StartRollout(req, timeout=10)

    def details(self) -> dict[str, Any]:
        status = self._stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=5)
        doc: dict[str, Any] = json.loads(status.details_json)
        return doc

    def close(self) -> None:
        self._channel.close()


class ReferenceServer:
    """``python -m sidecar.testing.reference_server`` in its own process."""

    def __init__(self, tmp: Path, target: str, server_id: str, *, rps: float = 40.0) -> None:
        self.state_file = tmp / f"{server_id}.json"
        self.behaviour_file = tmp / "behaviours.json"
        self.behaviour_file.write_text(json.dumps(BEHAVIOURS))
        self.log_path = tmp / f"{server_id}.log"
        self.argv = [
            sys.executable,
            "-m",
            "sidecar.testing.reference_server",
            "--target",
            target,
            "--server-id",
            server_id,
            "--stable",
            "v1",
            "--behaviour-file",
            str(self.behaviour_file),
            "--rps",
            str(rps),
            "--state-file",
            str(self.state_file),
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = WAIT) -> ReferenceServer:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=log)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if not readable:
                continue
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"reference server exited: {self.log_path.read_text()[-3000:]}")
            if json.loads(line).get("event") == "ready":
                return self
        self.kill()
        raise TimeoutError(f"reference server not ready in {timeout}s: {self.log_path}")

    def state(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.state_file.read_text())
        return doc

    def stop(self) -> dict[str, Any]:
        """SIGTERM, wait; returns the final state."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.state()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    """Everything started here is stopped at the end, also when a test fails."""
    started: list[Any] = []
    yield started
    for p in reversed(started):
        if isinstance(p, ReferenceServer | DaemonProcess):
            p.kill()
        elif isinstance(p, Admin):
            p.close()


def cli(target: str, *args: str) -> Any:
    out = subprocess.run(
        [*CLI, "rollout", *args, "--target", target, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def states_of(r: admin_pb2.Rollout) -> list[str]:
    return [STATE[t.to_state].removeprefix("ROLLOUT_STATE_") for t in r.transitions]


def transition_ms(r: admin_pb2.Rollout, to_state: str) -> float:
    t = next(t for t in r.transitions if STATE[t.to_state] == f"ROLLOUT_STATE_{to_state}")
    return float(t.at.seconds * 1000 + t.at.nanos / 1e6)


def finished(admin: Admin, rollout_id: str) -> admin_pb2.Rollout | None:
    r = admin.rollout(rollout_id)
    return r if STATE[r.state] in ("ROLLOUT_STATE_PROMOTED", "ROLLOUT_STATE_ROLLED_BACK") else None


def split_converged(
    admin: Admin, server: ReferenceServer, routes: dict[str, int] | None = None
) -> dict[str, Any] | None:
    """The server's state once it applies the daemon's desired split (with ``routes``)."""
    control = admin.details()["control"]
    state = server.state()
    split = state["split"]
    if split["revision"] != control["desired_revision"]:
        return None
    if routes is not None and split["routes"] != routes:
        return None
    return state


def warm_up(admin: Admin, server: ReferenceServer) -> None:
    """Waits until the daemon has seen rated stable answers to probe with."""
    poll(lambda: server.state()["feedback"].get("v1", 0) >= 40, "stable feedback")
    acked = server.state()["events"]["acked"]
    poll(
        lambda: admin.details()["processing"]["processors"]["rollout"]["processed"] >= acked,
        "the rollout observer to catch up",
    )


def assert_nothing_applied_twice(*states: dict[str, Any]) -> None:
    for st in states:
        assert st["duplicates"] == [], f"{st['server_id']} applied directives twice"
        loads = [(c["call"], c["version"]) for c in st["model_calls"]]
        assert len(loads) == len(set(loads)), f"{st['server_id']} loaded a model twice: {loads}"
        revisions = [s["revision"] for s in st["splits"]]
        assert revisions == sorted(set(revisions)), revisions


def test_good_candidate_promoted_bad_one_rolled_back(tmp_path: Path, procs: list[Any]) -> None:
    daemon = DaemonProcess(tmp_path / "data", config=write_config(tmp_path)).start()
    procs.append(daemon)
    admin = Admin(daemon.target)
    procs.append(admin)
    server = ReferenceServer(tmp_path, daemon.target, "pod-a").start()
    procs.append(server)
    warm_up(admin, server)

    # A good candidate: validation, shadow, every canary stage, promotion.
    started = admin.start("v2")
    assert (started.candidate_version, started.stable_version) == ("v2", "v1")
    good = poll(lambda: finished(admin, started.rollout_id), "v2's rollout to finish")
    reasons = [t.reason for t in good.transitions]
    assert STATE[good.state] == "ROLLOUT_STATE_PROMOTED", reasons
    assert states_of(good) == [
        "PENDING",
        "VALIDATING",
        "SHADOW",
        "CANARY",
        "CANARY",
        "PROMOTED",
    ], reasons
    assert reasons[2].startswith("validation passed"), reasons
    # Shadow paired the mirrored answers with the live ones by request id.
    shadow = json.loads(good.transitions[3].evidence_json)
    assert shadow["compared"] >= 15 and shadow["agreement"] >= 0.5, shadow
    assert [t.stage_index for t in good.transitions[3:5]] == [0, 1]
    poll(lambda: split_converged(admin, server, {"v2": 10_000}), "all traffic on v2")
    st = server.state()
    assert st["mirrored"].get("v2", 0) > 0  # shadow traffic came from this server
    assert st["requests"].get("v2", 0) > 0

    # A bad candidate against the new stable v2: rolled back by a guardrail.
    started = admin.start("v3")
    assert started.stable_version == "v2"
    bad = poll(lambda: finished(admin, started.rollout_id), "v3's rollout to finish")
    reasons = [t.reason for t in bad.transitions]
    assert STATE[bad.state] == "ROLLOUT_STATE_ROLLED_BACK", reasons
    assert "CANARY" in states_of(bad), reasons
    assert reasons[-1].startswith("guardrail"), reasons
    converged = poll(
        lambda: split_converged(admin, server, {"v2": 10_000}), "traffic back on v2 alone"
    )
    decided_ms = transition_ms(bad, "ROLLED_BACK")
    revision = converged["split"]["revision"]
    applied = next(s for s in converged["splits"] if s["revision"] == revision)
    latency = applied["at"] * 1000 - decided_ms
    print(f"\nrollback directive applied {latency:.1f} ms after the rollback decision")
    assert applied["routes"] == {"v2": 10_000}

    rows = cli(daemon.target, "list")
    by_candidate = {r["candidate"]: r for r in rows}
    assert by_candidate["v2"]["state"] == "PROMOTED"
    assert by_candidate["v3"]["state"] == "ROLLED_BACK"
    assert by_candidate["v3"]["candidate_weight_bps"] == 0

    final = server.stop()
    assert_nothing_applied_twice(final)
    assert final["events"]["dropped"] == 0 and final["events"]["rejected"] == 0
    assert daemon.stop() == 0


def test_restarts_mid_canary_resume_and_converge(tmp_path: Path, procs: list[Any]) -> None:
    config = write_config(
        tmp_path,
        rollout__canary__stages_percent=[10, 30, 60, 100],
        rollout__canary__min_dwell_seconds=4,
        rollout__canary__min_samples=30,
    )
    data = tmp_path / "data"
    daemon = DaemonProcess(data, config=config).start()
    procs.append(daemon)
    admin = Admin(daemon.target)
    procs.append(admin)
    server = ReferenceServer(tmp_path, daemon.target, "pod-a").start()
    procs.append(server)
    warm_up(admin, server)
    rid = admin.start("v2").rollout_id

    def at_stage(index: int) -> admin_pb2.Rollout | None:
        r = admin.rollout(rid)
        assert STATE[r.state] not in ("ROLLOUT_STATE_PROMOTED", "ROLLOUT_STATE_ROLLED_BACK"), [
            t.reason for t in r.transitions
        ]
        ok = STATE[r.state] == "ROLLOUT_STATE_CANARY" and r.stage_index >= index
        return r if ok else None

    # kill -9 the sidecar mid-canary, restart it on the same port and data.
    def settled(index: int) -> tuple[admin_pb2.Rollout, int] | None:
        # A transition is stored just before its split reaches the control
        # channel: take the two together only when neither moved for a while.
        first = at_stage(index)
        if first is None:
            return None
        desired = admin.details()["control"]["desired_revision"]
        time.sleep(0.3)
        again = admin.rollout(rid)
        if list(again.transitions) != list(first.transitions):
            return None
        if admin.details()["control"]["desired_revision"] != desired:
            return None
        return again, desired

    before, desired_before = poll(lambda: settled(1), "canary stage 1, settled")
    daemon.kill()
    daemon = DaemonProcess(data, port=daemon.port, config=config).start()
    procs.append(daemon)
    admin.close()
    admin = Admin(daemon.target)
    procs.append(admin)
    resumed = admin.rollout(rid)
    assert STATE[resumed.state] == "ROLLOUT_STATE_CANARY", [t.reason for t in resumed.transitions]
    # The resumed rollout may take its next stage at any moment: read its
    # transitions and the desired revision as a settled pair, as before the kill.
    after, desired_after = poll(lambda: settled(0), "the resumed canary, settled")
    # Resumed where it was: same stored transitions, same or later stage, and
    # one new split revision per new transition (none re-issued by the restart).
    assert after.stage_index >= before.stage_index
    n0 = len(before.transitions)
    assert list(after.transitions[:n0]) == list(before.transitions)
    assert desired_after == desired_before + len(after.transitions) - n0
    poll(lambda: split_converged(admin, server), "the server to converge after the restart")

    # Restart the inference server at the start of a later stage: its Hello
    # (no candidate loaded, split revision 0) gets it the current split back.
    stage = poll(lambda: at_stage(after.stage_index + 1), "the next canary stage")
    revision = admin.details()["control"]["desired_revision"]
    server.kill()
    first = server.state()
    restarted = ReferenceServer(tmp_path, daemon.target, "pod-a")
    restarted.state_file = tmp_path / "pod-a-2.json"
    restarted.argv[restarted.argv.index("--state-file") + 1] = str(restarted.state_file)
    restarted.start()
    procs.append(restarted)
    got = poll(lambda: restarted.state()["splits"], "the restarted server's first split")
    weight = stage.candidate_weight_bps
    # The current split: the one of that stage, or of a later one if the canary
    # moved on while the server restarted (its old stream must close before the
    # same server_id is let in again), never an older one.
    assert got[0]["revision"] >= revision
    routes = got[0]["routes"]
    assert set(routes) == {"v1", "v2"} and sum(routes.values()) == 10_000
    assert routes["v2"] >= weight
    assert [c["version"] for c in restarted.state()["model_calls"]] == ["v2"]

    done = poll(lambda: finished(admin, rid), "the rollout to finish")
    assert STATE[done.state] == "ROLLOUT_STATE_PROMOTED", [t.reason for t in done.transitions]
    poll(lambda: split_converged(admin, restarted, {"v2": 10_000}), "all traffic on v2")
    second = restarted.stop()
    print(
        f"\nresent directives answered from memory: first server "
        f"{first['control']['duplicates']}, restarted server {second['control']['duplicates']}"
    )
    assert_nothing_applied_twice(first, second)
    assert daemon.stop() == 0


def test_feedback_after_a_restart_counts_for_the_version_that_served_it(
    tmp_path: Path, procs: list[Any]
) -> None:
    """kill -9 mid-canary between requests and their feedback: after the restart
    the feedback still counts for the candidate or the stable version."""
    config = write_config(
        tmp_path,
        rollout__validation__enabled=False,
        rollout__shadow__enabled=False,
        # hold the first stage: no inference server moves traffic here
        rollout__canary__min_dwell_seconds=600,
        rollout__canary__max_dwell_seconds=600,
        rollout__canary__min_samples=10_000,
    )
    data = tmp_path / "data"
    daemon = DaemonProcess(data, config=config).start()
    procs.append(daemon)
    admin = Admin(daemon.target)
    procs.append(admin)
    rid = admin.start("v2").rollout_id
    poll(lambda: STATE[admin.rollout(rid).state] == "ROLLOUT_STATE_CANARY", "the canary")

    def record(target: str, events: list[events_pb2.Event]) -> None:
        with grpc.insecure_channel(target) as channel:
            ack = ingest_pb2_grpc.IngestServiceStub(channel).RecordEvents(
                events_pb2.EventBatch(events=events), timeout=10
            )
        assert ack.accepted == len(events), ack

    def processed(admin: Admin, n: int) -> bool:
        return bool(admin.details()["processing"]["processors"]["rollout"]["processed"] >= n)

    served = {**{f"c{i}": "v2" for i in range(5)}, **{f"s{i}": "v1" for i in range(5)}}
    record(
        daemon.target,
        [
            events_pb2.Event(
                event_id=f"i-{r}",
                inference=events_pb2.Inference(
                    request_id=r, model_version=v, prompt="q", response="a", latency_ms=50
                ),
            )
            for r, v in served.items()
        ],
    )
    poll(lambda: processed(admin, len(served)), "the observer to see the requests")
    # One more event: once it is processed, the round that saw the requests
    # has been committed with its cursor.
    record(daemon.target, [events_pb2.Event(event_id="marker", feedback=_rating("none", 1.0))])
    poll(lambda: processed(admin, len(served) + 1), "the observer to commit")
    daemon.kill()

    daemon = DaemonProcess(data, port=daemon.port, config=config).start()
    procs.append(daemon)
    admin.close()
    admin = Admin(daemon.target)
    procs.append(admin)
    assert STATE[admin.rollout(rid).state] == "ROLLOUT_STATE_CANARY"
    ratings = {**{f"c{i}": 0.2 * i for i in range(5)}, **{f"s{i}": 0.1 + 0.2 * i for i in range(5)}}
    record(
        daemon.target,
        [events_pb2.Event(event_id=f"f-{r}", feedback=_rating(r, x)) for r, x in ratings.items()],
    )
    poll(lambda: processed(admin, len(ratings)), "the observer to see the feedback")
    assert STATE[admin.rollout(rid).state] == "ROLLOUT_STATE_CANARY"
    assert daemon.stop() == 0

    store = Store(StoreConfig(data_dir=data))
    store.open()
    try:
        got = StoredObservations(store).collect(rid, 0, 0)
    finally:
        store.close()
    assert got.traffic.candidate.requests == 5 and got.traffic.stable.requests == 5
    cand = sorted(got.traffic.candidate.reward.tolist())
    stable = sorted(got.traffic.stable.reward.tolist())
    assert cand == pytest.approx([ratings[f"c{i}"] for i in range(5)], abs=1e-6)
    assert stable == pytest.approx([ratings[f"s{i}"] for i in range(5)], abs=1e-6)


def _rating(request_id: str, rating: float) -> events_pb2.Feedback:
    return events_pb2.Feedback(request_id=request_id, rating=rating)
