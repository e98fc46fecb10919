"""One meaning of reward: the configured weight table is the one /metrics, the dashboard's
report and the canary's feedback guardrail score by, not the default table."""

from __future__ import annotations

from typing import Any

import grpc
from atlas_sidecar_client.pb import events_pb2, ingest_pb2_grpc

from sidecar.scoring import WeightTable, score_feedback, table_from_config
from tests.conftest import feedback, inference, target_of

#: COPY means the opposite of its default here (0.8 by default).
WEIGHTS = {"COPY": -0.8}


def _metric(text: str, name: str, version: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'version="{version}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} for {version} not in /metrics")


async def test_a_changed_weight_table_is_followed_by_metrics_report_and_rollout(
    app_factory: Any,
) -> None:
    app = await app_factory(scoring={"signal_weights": WEIGHTS})
    try:
        async with grpc.aio.insecure_channel(target_of(app)) as ch:
            stub = ingest_pb2_grpc.IngestServiceStub(ch)
            events = []
            for i in range(10):
                events.append(inference(f"i{i}", f"r{i}", model_version="v1"))
                events.append(feedback(f"f{i}", f"r{i}", signal=events_pb2.COPY))
            ack = await stub.RecordEvents(events_pb2.EventBatch(events=events))
            assert ack.accepted == 20
        assert app.telemetry.traffic is not None
        await app.telemetry.traffic.wait_idle()
        configured = table_from_config(app.config.scoring)
        want = score_feedback((events_pb2.COPY,), None, configured).reward
        default = score_feedback((events_pb2.COPY,), None, WeightTable()).reward
        assert want < default  # the table really changed the reward
        text = app.telemetry.metrics_text().decode()
        total = _metric(text, "atlas_model_feedback_reward_total", "v1")
        count = _metric(text, "atlas_model_feedback_total", "v1")
        assert count == 10
        assert abs(total / count - want) < 1e-9, (total / count, want, default)
        # The canary's guardrail scores feedback with the same table.
        assert app.rollouts.observer._weights == configured
    finally:
        await app.shutdown()
