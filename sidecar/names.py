"""The one rule for names that clients choose: version names, server ids, update ids.

A name travels far from where it entered: into LMDB keys, Prometheus labels,
directives sent to inference servers, folder names under the data dir and the
trainer's argv. So it is checked once, where it enters (Inference, Hello,
RegisterCandidate, StartRollout, ...), against a rule that is safe in all of
those places: ASCII letters, digits, ``.``, ``_`` and ``-``; 1 to 128 bytes;
not starting with ``-`` (it would read as an option in an argv) or ``.``
(``.`` and ``..`` are folders; a leading dot hides a file).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sidecar.errors import SidecarError

__all__ = ["MAX_NAME_BYTES", "InvalidNameError", "check_name", "inside", "require_name"]

MAX_NAME_BYTES = 128

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


class InvalidNameError(SidecarError, ValueError):
    """A client-chosen name breaks the rule; the message names the field."""


def check_name(field: str, value: str) -> str | None:
    """Why ``value`` is not a valid name for ``field``, or None when it is.

    The reason starts with the field, as every ingest rejection does:
    ``"model_version: must be letters, digits, '.', '_' or '-' ..."``.
    """
    if not value:
        return f"{field}: required"
    if _NAME.fullmatch(value) is not None:
        return None
    if len(value.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"{field}: longer than {MAX_NAME_BYTES} bytes"
    if value[0] in "-.":
        return f"{field}: must not start with {value[0]!r}"
    return (
        f"{field}: must be letters, digits, '.', '_' or '-' "
        f"(at most {MAX_NAME_BYTES} bytes), got {value[:40]!r}"
    )


def require_name(field: str, value: str) -> str:
    """``value`` when it is a valid name; raises ``InvalidNameError`` naming ``field``."""
    reason = check_name(field, value)
    if reason is not None:
        raise InvalidNameError(reason)
    return value


def inside(folder: str | os.PathLike[str], *parts: str) -> Path:
    """``folder/parts...``, resolved, after checking it stays inside ``folder``.

    Raises ``InvalidNameError`` when the joined path (after resolving ``..`` and
    symlinks that already exist) would leave ``folder``.
    """
    base = Path(folder).resolve()
    path = base.joinpath(*parts).resolve()
    if path != base and base not in path.parents:
        raise InvalidNameError(f"path {os.fspath(Path(folder).joinpath(*parts))!r} leaves {base}")
    return path
