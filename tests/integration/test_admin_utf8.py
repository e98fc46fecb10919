"""Requests that do not parse (invalid UTF-8 in a string field) answer INVALID_ARGUMENT.

Against ``atlas-sidecar serve`` in its own process: the raw bytes go through a
generic ``unary_unary`` with identity serializers, so nothing on the client
side checks them, and the daemon's log is read afterwards for tracebacks.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from atlas_sidecar_client.pb import admin_pb2, admin_pb2_grpc

from sidecar.testing import DaemonProcess

BAD = b"\xff\xfe\xc3\x28"


def _string(number: int, value: bytes) -> bytes:
    """One length-delimited field (shorter than 128 bytes)."""
    assert len(value) < 128
    return bytes([number << 3 | 2, len(value)]) + value


def _entry(key: bytes, value: bytes) -> bytes:
    return _string(1, key) + _string(2, value)


CASES = [
    ("AdminService/RegisterCandidate", _string(1, b"v2") + _string(2, BAD), "artifact_uri"),
    ("AdminService/RegisterCandidate", _string(1, BAD), "version"),
    (
        "AdminService/RegisterCandidate",
        _string(1, b"v2") + _string(5, _string(1, BAD)),
        "metrics[0].key",
    ),
    ("AdminService/StartRollout", _string(1, b"v2") + _string(3, BAD), "reason"),
    ("AdminService/PromoteRollout", _string(1, BAD), "rollout_id"),
    ("AdminService/AbortRollout", _string(2, BAD), "reason"),
    ("AdminService/Rollback", _string(2, BAD), "reason"),
    ("AdminService/TriggerLearning", _string(1, BAD), "reason"),
    ("ActiveLearningService/ShouldRequestFeedback", _string(1, b"r1") + _string(2, BAD), "prompt"),
    (
        "ActiveLearningService/ShouldRequestFeedback",
        _string(1, b"r1") + _string(6, _entry(b"k", BAD)),
        "attributes[0].value",
    ),
]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    root: Path = tmp_path_factory.mktemp("utf8")
    with DaemonProcess(root / "data", http_port=0) as d:
        yield d


@pytest.mark.parametrize(("method", "raw", "field"), CASES)
def test_invalid_utf8_answers_invalid_argument_naming_the_field(
    daemon: DaemonProcess, method: str, raw: bytes, field: str
) -> None:
    with grpc.insecure_channel(daemon.target) as channel:
        call = channel.unary_unary(
            f"/atlas.sidecar.v1.{method}", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as err:
            call(raw, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == f"{field}: not valid UTF-8"
        # nothing else was lost: the daemon answers and registered nothing
        status = admin_pb2_grpc.AdminServiceStub(channel).GetStatus(
            admin_pb2.GetStatusRequest(), timeout=10
        )
        assert status.version


def test_the_daemon_logged_no_traceback(daemon: DaemonProcess) -> None:
    with grpc.insecure_channel(daemon.target) as channel:
        for method, raw, _ in CASES:
            call = channel.unary_unary(
                f"/atlas.sidecar.v1.{method}", request_serializer=None, response_deserializer=None
            )
            with pytest.raises(grpc.RpcError):
                call(raw, timeout=10)
        # a well-formed request after them still works end to end
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        admin.RegisterCandidate(admin_pb2.RegisterCandidateRequest(version="v2"), timeout=10)
        listed = admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=10)
        assert listed.version
    log = daemon.log_path.read_text()
    assert "Traceback" not in log
    assert "DecodeError" not in log
    assert "Unexpected" not in log


def test_a_corrupt_streaming_request_answers_invalid_argument(daemon: DaemonProcess) -> None:
    with grpc.insecure_channel(daemon.target) as channel:
        call = channel.unary_stream(
            "/atlas.sidecar.v1.AdminService/ExportSamples",
            request_serializer=None,
            response_deserializer=None,
        )
        with pytest.raises(grpc.RpcError) as err:
            list(call(b"\x08", timeout=10))  # a varint field cut short
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(
        "request: not a valid atlas.sidecar.v1.ExportSamplesRequest: "
    )
