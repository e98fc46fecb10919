"""/metrics during a run of the real daemon, parsed with prometheus-client."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from atlas_sidecar_client.pb import events_pb2, ingest_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from sidecar.testing import DaemonProcess


def _scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = frozenset(
                (k, v) for k, v in s.labels.items() if not k.startswith("otel_scope")
            )
            out[(s.name, labels)] = s.value
    return out


def _get(m: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return m.get((name, frozenset(labels.items())), 0.0)


def _inference(i: int, version: str, error: bool = False) -> events_pb2.Event:
    return events_pb2.Event(
        event_id=f"m-inf-{i}",
        inference=events_pb2.Inference(
            request_id=f"req-{i}",
            model_version=version,
            prompt="hello",
            response="world",
            latency_ms=20.0,
            error=error,
        ),
    )


def _feedback(i: int, signal: int) -> events_pb2.Event:
    return events_pb2.Event(
        event_id=f"m-fb-{i}", feedback=events_pb2.Feedback(request_id=f"req-{i}", signal=signal)
    )


@pytest.mark.timeout(90)
def test_metrics_counters_match_what_was_sent(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path / "data") as daemon:
        with grpc.insecure_channel(daemon.target) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            # 30 on v1 (3 errors), 10 on v2; then feedback; then resends and bad events
            first = [_inference(i, "v1", error=i < 3) for i in range(30)]
            first += [_inference(100 + i, "v2") for i in range(10)]
            ack = stub.RecordEvents(events_pb2.EventBatch(events=first))
            assert ack.accepted == 40
            fb = [_feedback(i, events_pb2.COPY) for i in range(12)]
            fb += [_feedback(100 + i, events_pb2.DISMISS) for i in range(4)]
            ack = stub.RecordEvents(events_pb2.EventBatch(events=fb))
            assert ack.accepted == 16
            bad = [
                events_pb2.Event(event_id="", inference=events_pb2.Inference(request_id="x")),
                events_pb2.Event(event_id="no-payload"),
            ]
            ack = stub.RecordEvents(events_pb2.EventBatch(events=first[:5] + bad))
            assert (ack.accepted, ack.duplicates, len(ack.rejected)) == (0, 5, 2)

        deadline = time.monotonic() + 30
        while True:
            m = _scrape(daemon.http_url)
            if _get(m, "atlas_feedback_events_total", signal="DISMISS") >= 4:
                break
            assert time.monotonic() < deadline, "traffic view never caught up"
            time.sleep(0.2)

    assert _get(m, "atlas_ingest_events_total", outcome="accepted") == 56
    assert _get(m, "atlas_ingest_events_total", outcome="duplicate") == 5
    assert _get(m, "atlas_ingest_events_total", outcome="rejected") == 2
    assert _get(m, "atlas_ingest_commit_duration_seconds_count") == 3
    assert _get(m, "atlas_model_requests_total", version="v1", role="PRIMARY") == 30
    assert _get(m, "atlas_model_requests_total", version="v2", role="PRIMARY") == 10
    assert _get(m, "atlas_model_errors_total", version="v1", role="PRIMARY") == 3
    assert _get(m, "atlas_model_latency_seconds_total", version="v1", role="PRIMARY") == (
        pytest.approx(30 * 0.020)
    )
    assert _get(m, "atlas_feedback_events_total", signal="COPY") == 12
    assert _get(m, "atlas_model_feedback_total", version="v1") == 12
    assert _get(m, "atlas_model_feedback_total", version="v2") == 4
    # COPY weighs 0.8 -> reward 0.9; DISMISS -0.5 -> reward 0.25
    assert _get(m, "atlas_model_feedback_reward_total", version="v1") == pytest.approx(12 * 0.9)
    assert _get(m, "atlas_model_feedback_reward_total", version="v2") == pytest.approx(4 * 0.25)
    assert ("atlas_ingest_queue_depth", frozenset()) in m
