"""atlas-sidecar-client: talk to the atlas-sidecar from an inference server.

- :class:`EventStream` sends inference records and feedback, fire-and-forget.
- :mod:`atlas_sidecar_client.pb` holds the generated protobuf and gRPC code.
"""

from atlas_sidecar_client import pb
from atlas_sidecar_client._events import DropPolicy, EventStream, EventStreamStats
from atlas_sidecar_client._ids import uuid7
from atlas_sidecar_client._proto.atlas.sidecar.v1.events_pb2 import Role, Signal

__all__ = [
    "DropPolicy",
    "EventStream",
    "EventStreamStats",
    "Role",
    "Signal",
    "pb",
    "uuid7",
]
