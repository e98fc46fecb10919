"""The daemon's exception hierarchy.

Third-party errors (``lmdb.Error``, ``grpc.RpcError``, pydantic's
``ValidationError``) are translated into these at the boundary where they
occur, so callers deal with one small set of types.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataDirLockedError",
    "PortInUseError",
    "SchemaVersionError",
    "SidecarError",
    "StoreCorruptError",
    "StoreError",
    "StoreFullError",
]


class SidecarError(Exception):
    """Root of every error the daemon raises on purpose."""


class ConfigError(SidecarError):
    """The configuration is invalid; the message names the bad key."""


class StoreError(SidecarError):
    """The store could not complete an operation; nothing was half-written."""


class StoreFullError(StoreError):
    """The disk or the LMDB map is full and cannot grow; the write was not applied."""


class StoreCorruptError(StoreError):
    """The store's files are damaged, truncated or lost; the message names the file.

    Not retryable: the daemon stops rather than write to a damaged store.
    """


class SchemaVersionError(StoreError):
    """The data dir was written by a newer (or unknown) schema version."""


class DataDirLockedError(SidecarError):
    """Another sidecar process holds the data dir."""


class PortInUseError(SidecarError):
    """A listen address could not be bound (taken, or not allowed)."""
