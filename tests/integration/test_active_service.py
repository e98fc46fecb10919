"""ActiveLearningService over real gRPC in the real daemon: decisions, errors, answers, status."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from atlas_sidecar_client.pb import (
    active_learning_pb2,
    active_learning_pb2_grpc,
    admin_pb2,
    admin_pb2_grpc,
    events_pb2,
    ingest_pb2_grpc,
)

from sidecar.app import SidecarApp
from sidecar.config import load_config


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[SidecarApp]:
    cfg = load_config(
        environ={},
        overrides={
            "server": {"listen": ["127.0.0.1:0"], "http_listen": ""},
            "store": {"data_dir": str(tmp_path / "data"), "map_size_bytes": 1 << 28},
            "active_learning": {
                "target_ask_rate": 0.5,
                "baseline_random_rate": 0.5,
                "max_asks_per_user_per_hour": 2,
            },
        },
    )
    a = SidecarApp(cfg)
    await a.start()
    try:
        yield a
    finally:
        await a.shutdown()


def _target(app: SidecarApp) -> str:
    return f"127.0.0.1:{app.ports['127.0.0.1:0']}"


async def _details(stub: admin_pb2_grpc.AdminServiceStub) -> dict[str, object]:
    st = await stub.GetStatus(admin_pb2.GetStatusRequest())
    out: dict[str, object] = json.loads(st.details_json)
    return out


async def test_active_service_decides_rejects_and_counts_answers(app: SidecarApp) -> None:
    async with grpc.aio.insecure_channel(_target(app)) as ch:
        stub = active_learning_pb2_grpc.ActiveLearningServiceStub(ch)
        req = active_learning_pb2.ShouldRequestFeedbackRequest
        asked: list[str] = []
        reasons: set[str] = set()
        for i in range(40):
            r = await stub.ShouldRequestFeedback(
                req(
                    request_id=f"r{i}",
                    prompt="p",
                    response="a",
                    token_logprobs=[-0.3] * 5,
                    user_id="alice",
                )
            )
            reasons.add(r.reason)
            assert 0.0 <= r.uncertainty <= 1.0
            if r.ask:
                asked.append(f"r{i}")
                assert r.message == "How would you rate this response?"
                assert list(r.options) == ["Helpful", "Not helpful", "Needs fixing"]
            else:
                assert r.message == "" and not r.options
        assert len(asked) == 2  # alice's hourly budget
        assert "budget_exhausted" in reasons

        for bad, field in (
            (req(), "request_id"),
            (req(request_id="x", token_logprobs=[-0.1, 0.2]), "token_logprobs[1]"),
            (req(request_id="x", token_logprobs=[math.inf]), "token_logprobs[0]"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ShouldRequestFeedback(bad)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in (err.value.details() or "")

        # the user answers the first ask (twice) and gives feedback on a request never asked
        ingest = ingest_pb2_grpc.IngestServiceStub(ch)
        events = [
            events_pb2.Event(
                event_id=f"f{i}", feedback=events_pb2.Feedback(request_id=rid, rating=1.0)
            )
            for i, rid in enumerate([asked[0], asked[0], "r39-never-asked"])
        ]
        ack = await ingest.RecordEvents(events_pb2.EventBatch(events=events))
        assert ack.accepted == 3
        await app.processors.wait_idle()

        details = await _details(admin_pb2_grpc.AdminServiceStub(ch))
        active = details["active_learning"]
        assert isinstance(active, dict)
        assert active["decisions"] == 40
        assert active["asks"] == 2
        assert active["answers"] == 1
        assert active["answer_rate"] == 0.5
        assert active["invalid"] == 3
        assert {"memory", "holdout", "selective"} <= set(details)
        report = app.learning_quality()
        assert report["ask_rate"] == 2 / 40 and report["answer_rate"] == 0.5
        assert report["memory_size_per_task"] == {} and report["holdout_size"] == 0


async def test_active_counters_survive_a_restart(tmp_path: Path) -> None:
    overrides = {
        "server": {"listen": ["127.0.0.1:0"], "http_listen": ""},
        "store": {"data_dir": str(tmp_path / "data"), "map_size_bytes": 1 << 28},
    }
    for round_ in range(2):
        a = SidecarApp(load_config(environ={}, overrides=overrides))
        await a.start()
        try:
            async with grpc.aio.insecure_channel(_target(a)) as ch:
                stub = active_learning_pb2_grpc.ActiveLearningServiceStub(ch)
                for i in range(5):
                    await stub.ShouldRequestFeedback(
                        active_learning_pb2.ShouldRequestFeedbackRequest(request_id=f"{round_}-{i}")
                    )
            await a.processors.tick_all()
            assert a.active.status()["decisions"] == 5 * (round_ + 1)
        finally:
            await a.shutdown()


async def test_active_lifecycle_shutdown_is_safe_before_start_and_twice(tmp_path: Path) -> None:
    overrides = {
        "server": {"listen": ["127.0.0.1:0"], "http_listen": ""},
        "store": {"data_dir": str(tmp_path / "data")},
    }
    a = SidecarApp(load_config(environ={}, overrides=overrides))
    await a.active.shutdown()
    await a.shutdown()
    await a.shutdown()
