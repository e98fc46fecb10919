"""Requests that cannot be decoded answer INVALID_ARGUMENT on every service, naming the field.

Sent as raw bytes over a real daemon's gRPC port: protobuf rejects a string
field that is not UTF-8 before any servicer runs, which used to end the call
as UNKNOWN with a traceback in the daemon's log.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
import grpc.aio
import pytest
from atlas_sidecar_client.pb import active_learning_pb2, admin_pb2
from google.protobuf.message import Message

from sidecar.app import SidecarApp
from tests.conftest import target_of


def _bad_utf8(msg: Message, good: str) -> bytes:
    """``msg`` serialized with the string ``good`` replaced by invalid UTF-8 of the same length."""
    raw = msg.SerializeToString()
    assert raw.count(good.encode()) == 1
    return raw.replace(good.encode(), b"\xff" * len(good))


CASES: list[tuple[str, bytes, str]] = [
    (
        "/atlas.sidecar.v1.AdminService/StartRollout",
        _bad_utf8(admin_pb2.StartRolloutRequest(candidate_version="BADNAME"), "BADNAME"),
        "candidate_version: not valid UTF-8",
    ),
    (
        "/atlas.sidecar.v1.AdminService/AbortRollout",
        _bad_utf8(admin_pb2.AbortRolloutRequest(reason="BADTEXT"), "BADTEXT"),
        "reason: not valid UTF-8",
    ),
    (
        "/atlas.sidecar.v1.AdminService/RegisterCandidate",
        _bad_utf8(
            admin_pb2.RegisterCandidateRequest(version="v2", metrics={"BADKEY": 1.0}), "BADKEY"
        ),
        "metrics[0].key: not valid UTF-8",
    ),
    (
        "/atlas.sidecar.v1.ActiveLearningService/ShouldRequestFeedback",
        _bad_utf8(
            active_learning_pb2.ShouldRequestFeedbackRequest(
                request_id="r", prompt="p", attributes={"k": "BADVALUE"}
            ),
            "BADVALUE",
        ),
        "attributes[0].value: not valid UTF-8",
    ),
    (
        # A truncated message (a varint tag without its value): no field to name.
        "/atlas.sidecar.v1.AdminService/ExportSamples",
        b"\x18",
        "request: not a valid atlas.sidecar.v1.ExportSamplesRequest",
    ),
]


@pytest.mark.parametrize(("method", "raw", "reason"), CASES, ids=[c[0] for c in CASES])
async def test_undecodable_request_answers_invalid_argument_naming_the_field(
    app: SidecarApp,
    caplog: pytest.LogCaptureFixture,
    method: str,
    raw: bytes,
    reason: str,
) -> None:
    caplog.set_level(logging.WARNING)
    async with grpc.aio.insecure_channel(target_of(app)) as channel:
        identity: Any = lambda b: b  # noqa: E731
        if method.endswith("/ExportSamples"):
            call: Any = channel.unary_stream(
                method, request_serializer=identity, response_deserializer=identity
            )(raw)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in call:
                    pass
        else:
            unary = channel.unary_unary(
                method, request_serializer=identity, response_deserializer=identity
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await unary(raw)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (info.value.details() or "").startswith(reason)
        # The same service still answers a good request.
        status = await channel.unary_unary(
            "/atlas.sidecar.v1.AdminService/GetStatus",
            request_serializer=admin_pb2.GetStatusRequest.SerializeToString,
            response_deserializer=admin_pb2.Status.FromString,
        )(admin_pb2.GetStatusRequest())
        assert status.version
    assert app.decode_errors.rejected == 1
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
