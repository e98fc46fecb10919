"""A do-nothing IngestService: the baseline the durable ingest is compared with."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import grpc
import uvloop
from atlas_sidecar_client.pb import events_pb2, ingest_pb2_grpc


class Null(ingest_pb2_grpc.IngestServiceServicer):
    async def StreamEvents(
        self,
        request_iterator: AsyncIterator[events_pb2.EventBatch],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[events_pb2.IngestAck]:
        async for batch in request_iterator:
            yield events_pb2.IngestAck(accepted=len(batch.events))

    async def RecordEvents(
        self, request: events_pb2.EventBatch, context: grpc.aio.ServicerContext
    ) -> events_pb2.IngestAck:
        return events_pb2.IngestAck(accepted=len(request.events))


async def main(port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    ingest_pb2_grpc.add_IngestServiceServicer_to_server(Null(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
