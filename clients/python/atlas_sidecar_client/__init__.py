"""atlas-sidecar-client: talk to the atlas-sidecar from an inference server.

- :class:`EventStream` sends inference records and feedback, fire-and-forget.
- :class:`Router` picks the model version for each request from the traffic
  split (the same rule in every language) and falls back to the stable
  version when the sidecar is gone longer than the split's lease.
- :class:`ControlLoop` keeps the server in step with the sidecar: it loads and
  unloads models, installs splits in a Router and answers probes.
- :mod:`atlas_sidecar_client.pb` holds the generated protobuf and gRPC code.
"""

from atlas_sidecar_client import pb
from atlas_sidecar_client._channel import (
    TOKEN_ENV,
    ChannelSecurity,
    open_aio_channel,
    open_channel,
)
from atlas_sidecar_client._control import (
    AppliedObserver,
    ControlLoop,
    ControlLoopStats,
    LoadHandler,
    ProbeHandler,
    UnloadHandler,
)
from atlas_sidecar_client._events import DropPolicy, EventStream, EventStreamStats
from atlas_sidecar_client._ids import uuid7
from atlas_sidecar_client._proto.atlas.sidecar.v1.events_pb2 import Role, Signal
from atlas_sidecar_client._router import (
    Route,
    RouteDecision,
    Router,
    TrafficSplit,
    routing_bucket,
)

__all__ = [
    "TOKEN_ENV",
    "AppliedObserver",
    "ChannelSecurity",
    "ControlLoop",
    "ControlLoopStats",
    "DropPolicy",
    "EventStream",
    "EventStreamStats",
    "LoadHandler",
    "ProbeHandler",
    "Role",
    "Route",
    "RouteDecision",
    "Router",
    "Signal",
    "TrafficSplit",
    "UnloadHandler",
    "open_aio_channel",
    "open_channel",
    "pb",
    "routing_bucket",
    "uuid7",
]
