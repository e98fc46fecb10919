"""Key layouts shared by the priority, memory and holdout databases.

LMDB keys are at most 511 bytes while task ids and sample ids are producer
strings, so tasks are keyed by an 8-byte digest (the name is kept in the
value) and over-long sample ids by their digest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

__all__ = ["id_key", "task_key", "task_of"]

_MAX_ID = 256


def task_key(task_id: str) -> bytes:
    """8 bytes that identify a task in keys (its name is stored in values)."""
    return hashlib.blake2b(task_id.encode("utf-8"), digest_size=8).digest()


def id_key(sample_id: str) -> bytes:
    """A sample id as key bytes: itself when short, its digest otherwise."""
    raw = sample_id.encode("utf-8")
    if len(raw) <= _MAX_ID:
        return raw
    return b"#" + hashlib.blake2b(raw, digest_size=24).digest()


def task_of(attributes: Mapping[str, str], attribute: str, default: str) -> str:
    """The task a sample belongs to: its task attribute, else the default task."""
    return attributes.get(attribute) or default
