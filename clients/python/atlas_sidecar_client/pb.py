"""The generated protobuf and gRPC modules of ``atlas.sidecar.v1``, in one place.

from atlas_sidecar_client import pb
batch = pb.events_pb2.EventBatch(events=[...])
"""

from atlas_sidecar_client._proto.atlas.sidecar.v1 import (
    active_learning_pb2,
    active_learning_pb2_grpc,
    admin_pb2,
    admin_pb2_grpc,
    control_pb2,
    control_pb2_grpc,
    events_pb2,
    ingest_pb2,
    ingest_pb2_grpc,
)

__all__ = [
    "active_learning_pb2",
    "active_learning_pb2_grpc",
    "admin_pb2",
    "admin_pb2_grpc",
    "control_pb2",
    "control_pb2_grpc",
    "events_pb2",
    "ingest_pb2",
    "ingest_pb2_grpc",
]
