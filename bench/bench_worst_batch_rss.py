"""Daemon peak RSS under the worst batches the ingest caps allow (target < 300 MB).

A real daemon (defaults: ingest.max_events_per_batch 10,000,
server.max_message_bytes 4 MiB) receives, on one RecordEvents call each:

- the most events in the biggest message: 10,000 events of about 419 bytes
  (4 MiB), first all valid, then all rejected (each one's reason listed or
  counted in the ack);
- a message of the biggest size made of two million empty events, which the
  caps refuse (INVALID_ARGUMENT) before it is decoded.

Prints the daemon's peak RSS (VmHWM) after each, beside its RSS at start.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atlas_sidecar_client.pb import events_pb2

from bench._harness import daemon
from sidecar.config import IngestConfig, ServerConfig

RECORD = "/atlas.sidecar.v1.IngestService/RecordEvents"
TARGET_MB = 300


def peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def biggest_batch(n: int, size: int, prefix: str, *, valid: bool) -> bytes:
    """n events whose serialized batch is just under ``size`` bytes."""

    def event(i: int, pad: int) -> events_pb2.Event:
        return events_pb2.Event(
            event_id=f"{prefix}{i:08d}",
            inference=events_pb2.Inference(
                request_id=f"req-{i}" if valid else "",  # request_id is required
                model_version="v1",
                prompt="x" * pad,
            ),
        )

    per_event = size // n
    pad = per_event
    while events_pb2.EventBatch(events=[event(n - 1, pad)]).ByteSize() > per_event:
        pad -= 1
    raw = events_pb2.EventBatch(events=[event(i, pad) for i in range(n)]).SerializeToString()
    assert len(raw) <= size, len(raw)
    return raw


def main() -> None:
    n = IngestConfig().max_events_per_batch
    size = ServerConfig().max_message_bytes
    with tempfile.TemporaryDirectory() as tmp:
        d = daemon(tmp).start()
        assert d.proc is not None
        pid = d.proc.pid
        try:
            with grpc.insecure_channel(d.target) as ch:
                record = ch.unary_unary(
                    RECORD,
                    request_serializer=None,
                    response_deserializer=events_pb2.IngestAck.FromString,
                )
                at_start = peak_mb(pid)
                good = biggest_batch(n, size, "good-", valid=True)
                ack = record(good, timeout=120)
                assert ack.accepted == n, ack.accepted
                after_good = peak_mb(pid)
                bad = biggest_batch(n, size, "bad-", valid=False)
                ack = record(bad, timeout=120)
                assert len(ack.rejected) + ack.rejected_unlisted == n
                after_bad = peak_mb(pid)
                empties = b"\x0a\x00" * ((size - 64) // 2)
                try:
                    record(empties, timeout=120)
                    raise AssertionError("an over-cap batch was accepted")
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc
                after_flood = peak_mb(pid)
        finally:
            d.stop()
    print(
        f"daemon peak RSS: at start {at_start:.0f} MB; after {n:,} valid events in "
        f"{len(good) / 2**20:.1f} MiB {after_good:.0f} MB; after {n:,} rejected ones "
        f"{after_bad:.0f} MB; after {len(empties) // 2:,} empty events (refused) "
        f"{after_flood:.0f} MB   (target < {TARGET_MB} MB)"
    )
    if after_flood >= TARGET_MB:
        raise SystemExit(f"peak RSS {after_flood:.0f} MB is over {TARGET_MB} MB")


if __name__ == "__main__":
    main()
