"""Files and folders only the daemon's user may read: the data dir holds user text.

Prompts, responses, corrections and user ids live in the store, the dataset
snapshots and the trainer's log. Any other container in the pod, or another
user on the host, must not read them, whatever the process's umask: every
folder is made 0700 and every file 0600 explicitly.
"""

from __future__ import annotations

import contextlib
import grp
import os
from pathlib import Path
from typing import IO, Any

from sidecar.errors import ConfigError

__all__ = [
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "SOCKET_MODE",
    "make_private_dir",
    "open_private",
    "restrict_socket",
    "unix_socket_path",
]

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
#: A Unix listen socket: the daemon's user and one group may connect.
SOCKET_MODE = 0o660

_FLAGS = {
    "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
}


def make_private_dir(path: str | os.PathLike[str]) -> Path:
    """Creates ``path`` and each missing parent as 0700; an existing folder keeps its mode."""
    p = Path(path)
    missing = []
    q = p
    while not q.is_dir():
        missing.append(q)
        if q.parent == q:
            break
        q = q.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=PRIVATE_DIR_MODE)
            os.chmod(d, PRIVATE_DIR_MODE)  # mkdir's mode is filtered by the umask
    return p


def open_private(path: str | os.PathLike[str], mode: str = "wb", **kwargs: Any) -> IO[Any]:
    """``open(path, mode)`` for writing, creating the file 0600 (an existing file is made 0600)."""
    fd = os.open(path, _FLAGS[mode] | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
        return os.fdopen(fd, mode, **kwargs)
    except BaseException:
        os.close(fd)
        raise


def unix_socket_path(addr: str) -> Path:
    """The file of a gRPC ``unix:`` address (``unix:/p``, ``unix:///p`` or ``unix:rel``)."""
    rest = addr.removeprefix("unix:")
    return Path("/" + rest.lstrip("/") if rest.startswith("//") else rest)


def restrict_socket(path: Path, group: str = "") -> None:
    """Makes a listen socket 0660, owned by ``group`` when one is named.

    Raises:
        ConfigError: ``group`` does not exist, or the daemon may not give
            the socket to it (naming ``server.unix_socket_group``).
    """
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"server.unix_socket_group: no group named {group!r}") from None
        try:
            os.chown(path, -1, gid)
        except PermissionError as exc:
            raise ConfigError(
                f"server.unix_socket_group: cannot give {path} to group {group!r}: {exc.strerror}"
                " (the daemon's user must be a member of it)"
            ) from exc
    os.chmod(path, SOCKET_MODE)
