"""Checks of the names and free text an AdminService request carries.

Names (versions, update ids, rollout ids) follow the one rule of
:mod:`sidecar.names`; free text (reasons, artifact URIs, metric names) has a
length limit from the ``admin`` config section. A reason starts with the
request and the field, ``"register.artifact_uri: longer than 4096 bytes"``.
"""

from __future__ import annotations

from typing import Any

from sidecar.config import AdminConfig
from sidecar.names import check_name

__all__ = ["request_problem"]

#: RPC -> (prefix of its fields, [(field, kind)]). Kinds: "name" (required),
#: "name?" (empty allowed), "reason", "uri".
_FIELDS: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "RegisterCandidate": (
        "register",
        (
            ("version", "name"),
            ("base_version", "name?"),
            ("update_id", "name?"),
            ("artifact_uri", "uri"),
        ),
    ),
    "StartRollout": ("start_rollout", (("candidate_version", "name"), ("reason", "reason"))),
    "PromoteRollout": ("promote_rollout", (("rollout_id", "name?"), ("reason", "reason"))),
    "AbortRollout": ("abort_rollout", (("rollout_id", "name?"), ("reason", "reason"))),
    "Rollback": ("rollback", (("rollout_id", "name?"), ("reason", "reason"))),
    "TriggerLearning": ("trigger_learning", (("reason", "reason"),)),
}


def _too_long(field: str, value: str, limit: int, key: str) -> str | None:
    if len(value.encode("utf-8", "surrogatepass")) > limit:
        return f"{field}: longer than {limit} bytes (admin.{key})"
    return None


def request_problem(rpc: str, request: Any, limits: AdminConfig) -> str | None:
    """What is wrong with ``request`` of ``rpc``, or None when nothing is."""
    spec = _FIELDS.get(rpc)
    if spec is None:
        return None
    prefix, fields = spec
    for name, kind in fields:
        value: str = getattr(request, name)
        field = f"{prefix}.{name}"
        if kind == "name" or (kind == "name?" and value):
            problem = check_name(field, value)
        elif kind == "reason":
            problem = _too_long(field, value, limits.max_reason_bytes, "max_reason_bytes")
        elif kind == "uri":
            problem = _too_long(
                field, value, limits.max_artifact_uri_bytes, "max_artifact_uri_bytes"
            )
        else:
            problem = None
        if problem is not None:
            return problem
    if rpc == "RegisterCandidate":
        metrics = request.metrics
        if len(metrics) > limits.max_metrics:
            return f"{prefix}.metrics: more than {limits.max_metrics} (admin.max_metrics)"
        for key in metrics:
            problem = _too_long(
                f"{prefix}.metrics", key, limits.max_metric_name_bytes, "max_metric_name_bytes"
            )
            if problem is not None:
                return problem
    return None
