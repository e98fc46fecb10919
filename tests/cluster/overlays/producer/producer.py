"""An inference server's stand-in for make deploy-test: streams events to the pod's sidecar.

It runs as the pod's main container. First it asks the sidecar's
grpc.health.v1 once, with no retry: kubelet starts this container only after
the sidecar's startup probe passed, so the answer must be SERVING (else it
exits 3 and its restart count shows it). Then it records inference events
until SIGTERM, prints the id of every event the sidecar acked as durable
(``acked <id>,<id>,...``), flushes on SIGTERM and prints a last line
``{"event": "closed", ...}``. Its log is the test's record of what was acked.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

import grpc
from atlas_sidecar_client import EventStream
from atlas_sidecar_client.pb import events_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

TARGET = "127.0.0.1:50051"


def main() -> int:
    with grpc.insecure_channel(TARGET) as channel:
        try:
            status = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(), timeout=2)
                .status
            )
        except grpc.RpcError as exc:
            print(json.dumps({"event": "sidecar_at_start", "error": str(exc.code())}), flush=True)
            return 3
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    print(json.dumps({"event": "sidecar_at_start", "status": name}), flush=True)
    if status != health_pb2.HealthCheckResponse.SERVING:
        return 3

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    lock = threading.Lock()

    def on_ack(batch: events_pb2.EventBatch, ack: events_pb2.IngestAck) -> None:
        rejected = {r.index for r in ack.rejected}
        ids = [e.event_id for i, e in enumerate(batch.events) if i not in rejected]
        with lock:
            print("acked " + ",".join(ids), flush=True)

    pod = os.environ.get("POD_NAME", "pod")
    stream = EventStream(TARGET, batch_size=20, linger_ms=20, on_ack=on_ack)
    n = 0
    while not stop.wait(0.005):
        stream.record_inference(f"{pod}-r{n}", "v1", prompt=f"question {n}", response="answer")
        n += 1
    flushed = stream.flush(timeout=15)
    stats = stream.stats
    stream.close(timeout=5)
    with lock:
        print(
            json.dumps(
                {
                    "event": "closed",
                    "recorded": n,
                    "flushed": flushed,
                    "acked": stats.acked_events,
                    "dropped": stats.dropped,
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
