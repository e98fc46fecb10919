"""30,000 distinct model versions: status, metrics and the report stay bounded.

Against ``atlas-sidecar serve`` in its own process (real gRPC, real LMDB, the
real HTTP /metrics). Before telemetry.max_versions, GetStatus was larger than
a gRPC message may be and ``atlas-sidecar status`` said it could not reach
the daemon.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from atlas_sidecar_client.pb import admin_pb2, admin_pb2_grpc, events_pb2, ingest_pb2_grpc

from sidecar.testing import DaemonProcess

VERSIONS = 30_000
MAX_VERSIONS = 64  # the default
CANDIDATE = "zz-candidate"


def _batch(lo: int, hi: int, version: Any = None) -> events_pb2.EventBatch:
    return events_pb2.EventBatch(
        events=[
            events_pb2.Event(
                event_id=f"e{i}",
                inference=events_pb2.Inference(
                    request_id=f"r{i}",
                    model_version=version or f"x{i:05d}",
                    prompt="p",
                    response="r",
                    latency_ms=5,
                ),
            )
            for i in range(lo, hi)
        ]
    )


def _details(admin: admin_pb2_grpc.AdminServiceStub) -> dict[str, Any]:
    status = admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=10)
    doc: dict[str, Any] = json.loads(status.details_json)
    return doc


def _wait_caught_up(admin: admin_pb2_grpc.AdminServiceStub, events: int) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while True:
        details = _details(admin)
        done = all(
            p["processed"] >= events for p in details["processing"]["processors"].values()
        ) and (details["telemetry"]["view_processed"] >= events)
        if done:
            return details
        assert time.monotonic() < deadline, "the daemon did not process the events in time"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    root: Path = tmp_path_factory.mktemp("versions")
    config = root / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "store": {"sync": False},
                "rollout": {"validation": {"enabled": False}, "shadow": {"enabled": False}},
            }
        )
    )
    with DaemonProcess(root / "data", config=config) as d:
        yield d


def test_thirty_thousand_versions_leave_status_metrics_and_report_bounded(
    daemon: DaemonProcess,
) -> None:
    with grpc.insecure_channel(daemon.target) as channel:
        ingest = ingest_pb2_grpc.IngestServiceStub(channel)
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        for lo in range(0, VERSIONS, 1000):
            ack = ingest.RecordEvents(_batch(lo, lo + 1000), timeout=30)
            assert ack.accepted == 1000
        # a rollout started after the cap filled: its candidate stays visible
        _wait_caught_up(admin, VERSIONS)
        admin.RegisterCandidate(admin_pb2.RegisterCandidateRequest(version=CANDIDATE))
        admin.StartRollout(admin_pb2.StartRolloutRequest(candidate_version=CANDIDATE))
        ack = ingest.RecordEvents(_batch(VERSIONS, VERSIONS + 10, CANDIDATE), timeout=30)
        assert ack.accepted == 10
        details = _wait_caught_up(admin, VERSIONS + 10)

        versions = details["learning"]["versions"]
        assert len(versions) <= MAX_VERSIONS + 1
        stable = details["learning"]["stable_version"]
        assert stable == "x00000"
        assert stable in versions and CANDIDATE in versions
        assert versions[CANDIDATE]["requests"] == 10
        other = versions["other"]
        assert other["versions"] == VERSIONS + 1 - (len(versions) - 1)
        # nothing is lost in the fold: every request is counted once
        assert sum(v["requests"] for v in versions.values()) == VERSIONS + 10

        report = admin.GetReport(admin_pb2.GetReportRequest(), timeout=10)
        doc = json.loads(report.json)
        for point in doc["performance"]["points"]:
            assert len(point["by_version"]) <= MAX_VERSIONS + 2

    with urllib.request.urlopen(f"{daemon.http_url}/api/rollout", timeout=30) as resp:
        observed = json.loads(resp.read())["traffic"]["observed"]
    assert len(observed["versions"]) <= MAX_VERSIONS + 2
    assert observed["requests"] == VERSIONS + 10

    with urllib.request.urlopen(f"{daemon.http_url}/metrics", timeout=30) as resp:
        metrics = resp.read().decode()
    labels = set(re.findall(r'^atlas_model_\w+\{[^}]*\bversion="([^"]*)"', metrics, re.M))
    # the first 64 seen, the stable one among them, the candidate and "other"
    assert len(labels) <= MAX_VERSIONS + 2
    assert {"x00000", CANDIDATE, "other"} <= labels

    cli = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "status", "--target", daemon.target],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    assert "cannot reach" not in cli.stderr
