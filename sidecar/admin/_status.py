"""The status document as plain JSON (integers stay integers)."""

from __future__ import annotations

import json
from typing import Any

from atlas_sidecar_client.pb import admin_pb2

__all__ = ["status_to_dict"]


def status_to_dict(status: admin_pb2.Status) -> dict[str, Any]:
    """Renders a Status for ``atlas-sidecar status --json`` and ``/api/status``.

    The top level always has ``events: {accepted, duplicates, rejected}``.
    """
    st = status.store
    return {
        "version": status.version,
        "uptime_seconds": round(status.uptime_seconds, 3),
        "events": {
            "accepted": int(status.events.accepted),
            "duplicates": int(status.events.duplicates),
            "rejected": int(status.events.rejected),
        },
        "store": {
            "data_dir": st.data_dir,
            "schema_version": int(st.schema_version),
            "log_events": int(st.log_events),
            "first_seq": int(st.first_seq),
            "last_seq": int(st.last_seq),
            "used_bytes": int(st.used_bytes),
            "map_size_bytes": int(st.map_size_bytes),
            "disk_free_bytes": int(st.disk_free_bytes),
        },
        "open_streams": int(status.open_streams),
        "connected_servers": int(status.connected_servers),
        "details": json.loads(status.details_json) if status.details_json else {},
    }
