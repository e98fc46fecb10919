"""Random AdminService and ActiveLearningService requests never break the daemon.

Against ``atlas-sidecar serve`` in its own process. Each request is either a
random well-formed message or random bytes sent as one through a generic
channel. Every answer must be a status that names a client error (never
UNKNOWN or INTERNAL, which mean the daemon failed), the daemon's log must hold
no traceback, its RSS stays under a stated bound, and afterwards it still
registers a candidate and starts, then aborts, a rollout of it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from atlas_sidecar_client.pb import active_learning_pb2, admin_pb2, admin_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.testing import DaemonProcess

#: What the daemon may answer a hostile request with.
CLIENT_ERRORS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
}
#: RSS the daemon stays under through every example (it starts near 120 MB).
RSS_BOUND = 400 * 1024 * 1024

names = st.sampled_from(["v1", "v2", "v3", "", "other"]) | st.text(max_size=140)
texts = st.text(max_size=1500)
metrics = st.dictionaries(
    st.text(max_size=140), st.floats(allow_nan=True, allow_infinity=True), max_size=70
)

REQUESTS: dict[str, Any] = {
    "AdminService/RegisterCandidate": st.builds(
        admin_pb2.RegisterCandidateRequest,
        version=names,
        artifact_uri=st.text(max_size=5000),
        base_version=names,
        update_id=names,
        metrics=metrics,
    ),
    "AdminService/StartRollout": st.builds(
        admin_pb2.StartRolloutRequest,
        candidate_version=names,
        strategy=st.integers(0, 2),
        reason=texts,
    ),
    "AdminService/PromoteRollout": st.builds(
        admin_pb2.PromoteRolloutRequest, rollout_id=names, reason=texts
    ),
    "AdminService/AbortRollout": st.builds(
        admin_pb2.AbortRolloutRequest, rollout_id=names, reason=texts
    ),
    "AdminService/Rollback": st.builds(admin_pb2.RollbackRequest, rollout_id=names, reason=texts),
    "AdminService/ListRollouts": st.builds(
        admin_pb2.ListRolloutsRequest, limit=st.integers(0, 2**32 - 1)
    ),
    "AdminService/TriggerLearning": st.builds(admin_pb2.TriggerLearningRequest, reason=texts),
    "AdminService/GetStatus": st.just(admin_pb2.GetStatusRequest()),
    "AdminService/ExportSamples": st.builds(
        admin_pb2.ExportSamplesRequest,
        kind=st.integers(0, 5),
        limit=st.integers(0, 2**32 - 1),
        include_quarantined=st.booleans(),
    ),
    "ActiveLearningService/ShouldRequestFeedback": st.builds(
        active_learning_pb2.ShouldRequestFeedbackRequest,
        request_id=names,
        prompt=texts,
        response=texts,
        token_logprobs=st.lists(st.floats(width=32), max_size=8),
        user_id=names,
    ),
}

STREAMING = {"AdminService/ExportSamples"}

requests = st.one_of(
    *(
        st.tuples(st.just(method), strategy.map(lambda m: m.SerializeToString()))
        for method, strategy in REQUESTS.items()
    ),
    st.tuples(st.sampled_from(sorted(REQUESTS)), st.binary(max_size=300)),
)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    root: Path = tmp_path_factory.mktemp("admin-property")
    config = root / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "store": {"sync": False},
                "rollout": {
                    "initial_stable_version": "v0",
                    "validation": {"enabled": False},
                    "shadow": {"enabled": False},
                },
            }
        )
    )
    with DaemonProcess(root / "data", config=config, http_port=0) as d:
        yield d


def _rss(daemon: DaemonProcess) -> int:
    assert daemon.proc is not None
    for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def channel(daemon: DaemonProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(daemon.target) as ch:
        yield ch


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(requests, min_size=1, max_size=5))
def test_random_requests_get_a_client_error_at_worst(
    daemon: DaemonProcess, channel: grpc.Channel, batch: list[tuple[str, bytes]]
) -> None:
    for method, raw in batch:
        path = f"/atlas.sidecar.v1.{method}"
        details = ""
        try:
            if method in STREAMING:
                list(channel.unary_stream(path)(raw, timeout=10))
            else:
                channel.unary_unary(path)(raw, timeout=10)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
            details = exc.details()
        assert code in CLIENT_ERRORS, (method, raw[:80], code, details)
    assert _rss(daemon) < RSS_BOUND


_fresh = (f"fresh-{i}" for i in itertools.count())


def test_after_them_the_daemon_still_starts_a_rollout(
    daemon: DaemonProcess, channel: grpc.Channel
) -> None:
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    for rollout in admin.ListRollouts(admin_pb2.ListRolloutsRequest(), timeout=10).rollouts:
        if rollout.state not in (
            admin_pb2.ROLLOUT_STATE_PROMOTED,
            admin_pb2.ROLLOUT_STATE_ROLLED_BACK,
            admin_pb2.ROLLOUT_STATE_ABORTED,
        ):
            admin.AbortRollout(admin_pb2.AbortRolloutRequest(rollout_id=rollout.rollout_id))
    version = next(_fresh)
    admin.RegisterCandidate(
        admin_pb2.RegisterCandidateRequest(version=version, artifact_uri="s3://m/fresh"),
        timeout=10,
    )
    started = admin.StartRollout(
        admin_pb2.StartRolloutRequest(candidate_version=version, reason="after fuzz"), timeout=10
    )
    assert started.candidate_version == version
    aborted = admin.AbortRollout(
        admin_pb2.AbortRolloutRequest(rollout_id=started.rollout_id), timeout=10
    )
    assert aborted.state == admin_pb2.ROLLOUT_STATE_ABORTED
    log = daemon.log_path.read_text()
    assert "Traceback" not in log, log[-3000:]
