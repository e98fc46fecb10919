"""A real daemon process stays small under the worst batches the caps allow."""

from __future__ import annotations

from pathlib import Path

import grpc
from atlas_sidecar_client.pb import events_pb2

from sidecar.config import ServerConfig
from sidecar.testing import DaemonProcess

RECORD = "/atlas.sidecar.v1.IngestService/RecordEvents"
LIMIT_MB = 300


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def test_a_message_of_two_million_empty_events_is_refused_and_costs_little(
    tmp_path: Path,
) -> None:
    d = DaemonProcess(tmp_path / "d", http_port=0).start()
    assert d.proc is not None
    try:
        with grpc.insecure_channel(d.target) as ch:
            record = ch.unary_unary(
                RECORD,
                request_serializer=None,
                response_deserializer=events_pb2.IngestAck.FromString,
            )
            flood = b"\x0a\x00" * ((ServerConfig().max_message_bytes - 64) // 2)
            code = grpc.StatusCode.OK
            details = ""
            try:
                record(flood, timeout=120)
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
            peak = peak_rss_mb(d.proc.pid)
            assert peak < LIMIT_MB, f"daemon peak RSS {peak:.0f} MB"
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert "ingest.max_events_per_batch=10000" in details
            # and it still serves
            ok = events_pb2.Event(
                event_id="after", feedback=events_pb2.Feedback(request_id="r", rating=1.0)
            )
            ack = record(events_pb2.EventBatch(events=[ok]).SerializeToString(), timeout=30)
            assert ack.accepted == 1
    finally:
        d.stop()
