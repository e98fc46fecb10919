"""Errors of rollout operations, each carrying the gRPC code the admin API answers."""

from __future__ import annotations

import grpc

from sidecar.errors import SidecarError

__all__ = ["RolloutConflictError", "RolloutError", "RolloutInputError", "RolloutNotFoundError"]


class RolloutError(SidecarError):
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class RolloutConflictError(RolloutError):
    """The operation does not fit the rollout's state (one already active, already ended)."""


class RolloutNotFoundError(RolloutError):
    grpc_code = grpc.StatusCode.NOT_FOUND


class RolloutInputError(RolloutError):
    """A request field is missing or invalid; the message names it."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
