"""Who is calling: bearer tokens checked against the tokens file, reread on change.

One :class:`Authenticator` serves the gRPC interceptor, the HTTP middleware
and the control channel (which checks the ``server_id`` a token may claim).
With no ``auth.tokens_file`` it is disabled and lets every call through; the
daemon then listens only on loopback or a Unix socket (see
:func:`check_exposure`).

The file is reread when it changes (checked every
``auth.reload_interval_seconds``: size, mtime and inode, so a Kubernetes
Secret, whose mounted file is a symlink swapped in place, is seen) and on
SIGHUP. A file that no longer parses keeps the previous table and is logged
and counted: a typo in a rotation must not lock everyone out.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar._aio import spawn
from sidecar.auth._tokens import Role, TokenEntry, TokenTable, hash_token, load_tokens
from sidecar.errors import ConfigError

__all__ = ["Authenticator", "Denied", "bearer_token", "check_exposure", "is_loopback"]

log = logging.getLogger(__name__)

#: Why a call was refused, as counted (metric label ``reason``).
MISSING, UNKNOWN, ROLE, SERVER_ID = "missing_token", "unknown_token", "missing_role", "server_id"


@dataclass(frozen=True)
class Denied:
    """A refusal: ``reason`` is one of the labels above, ``message`` is for the caller."""

    reason: str
    message: str

    @property
    def unauthenticated(self) -> bool:
        return self.reason in (MISSING, UNKNOWN)


def bearer_token(value: str | None) -> str | None:
    """The token in an ``authorization`` value (``Bearer <token>``), or None."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def is_loopback(addr: str) -> bool:
    """True for ``unix:`` paths and hosts on the loopback interface."""
    if addr.startswith("unix:"):
        return True
    host = addr.rpartition(":")[0].strip("[]") or "127.0.0.1"
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(
    listeners: Iterable[tuple[str, str]], *, auth_on: bool, allow_unauthenticated: bool
) -> None:
    """Refuses a listener off loopback when nobody is authenticated.

    ``listeners`` are (config key, address) pairs. Raises ConfigError naming
    the first exposed key, unless ``auth.allow_unauthenticated`` is set (then
    every start logs a warning).
    """
    if auth_on:
        return
    exposed = [(key, addr) for key, addr in listeners if addr and not is_loopback(addr)]
    if not exposed:
        return
    key, addr = exposed[0]
    if not allow_unauthenticated:
        raise ConfigError(
            f"{key}: {addr} is reachable from other hosts but auth.tokens_file is not set: "
            "anyone could register candidates, roll out and read user text. Set "
            "auth.tokens_file (docs/security.md), listen on loopback or a unix: socket, "
            "or set auth.allow_unauthenticated: true on purpose"
        )
    log.warning(
        "serving without authentication on a non-loopback address "
        "(auth.allow_unauthenticated: true): every caller may do everything",
        extra={"key": key, "address": addr},
    )


class Authenticator:
    """Checks bearer tokens and roles; rereads the tokens file when it changes."""

    def __init__(self, tokens_file: Path | None, *, reload_interval: float = 2.0) -> None:
        self.path = tokens_file
        self._interval = reload_interval
        self._table = TokenTable()
        self._stamp: tuple[int, int, int] | None = None
        #: Refusals by (service, reason), for status; the metric has the same labels.
        self.denied: Counter[tuple[str, str]] = Counter()
        self.reloads = 0
        self.reload_failures = 0
        self.last_reload_error = ""
        self._task: asyncio.Task[None] | None = None
        #: Entries made in this process for its own clients; kept across reloads.
        self._internal: list[TokenEntry] = []
        if tokens_file is not None:
            self._table = load_tokens(tokens_file)
            self._stamp = self._stat()
            log.info("auth on", extra={"tokens_file": str(tokens_file), "tokens": len(self._table)})

    @property
    def enabled(self) -> bool:
        return self.path is not None

    @property
    def table(self) -> TokenTable:
        return self._table

    # -- checks ----------------------------------------------------------------

    def identify(self, authorization: str | None) -> TokenEntry | Denied:
        """The entry for an ``authorization`` value, or why there is none."""
        token = bearer_token(authorization)
        if token is None:
            return Denied(
                MISSING,
                "no token: send 'authorization: Bearer <token>' (docs/security.md)",
            )
        entry = self._table.lookup(token)
        if entry is None:
            return Denied(UNKNOWN, "the token is not in auth.tokens_file")
        return entry

    def authorize(self, authorization: str | None, role: Role) -> TokenEntry | Denied | None:
        """None when auth is off; else the caller's entry, or why it is refused."""
        if not self.enabled:
            return None
        who = self.identify(authorization)
        if isinstance(who, Denied):
            return who
        if role not in who.roles:
            return Denied(ROLE, f"token {who.name!r} lacks the {role.value!r} role")
        return who

    def count(self, service: str, denied: Denied) -> None:
        from sidecar import instruments as ins

        self.denied[(service, denied.reason)] += 1
        ins.auth_denied(service, denied.reason)

    def identity_of(self, metadata: Any) -> TokenEntry | None:
        """The entry of a gRPC call's metadata (None with auth off or no valid token)."""
        if not self.enabled:
            return None
        value = None
        for key, v in metadata or ():
            if key == "authorization":
                value = v if isinstance(v, str) else v.decode(errors="replace")
                break
        who = self.identify(value)
        return None if isinstance(who, Denied) else who

    def add_internal(
        self, name: str, token: str, roles: Iterable[Role], *, server_ids: Iterable[str] = ()
    ) -> None:
        """Admits ``token`` (held only in this process) as ``name``, across reloads."""
        entry = TokenEntry(name, hash_token(token), frozenset(roles), tuple(server_ids))
        self._internal.append(entry)
        self._table = self._with_internal(self._table)

    def _with_internal(self, table: TokenTable) -> TokenTable:
        if not self._internal:
            return table
        return TokenTable.of([*table.by_digest.values(), *self._internal])

    # -- reload ----------------------------------------------------------------

    def _stat(self) -> tuple[int, int, int] | None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def reload(self, *, why: str = "changed") -> bool:
        """Rereads the tokens file; on error keeps the current table. True if it took."""
        if self.path is None:
            return False
        self._stamp = self._stat()
        try:
            table = load_tokens(self.path)
        except ConfigError as exc:
            self.reload_failures += 1
            self.last_reload_error = str(exc)
            log.error(
                "tokens file not reloaded; the previous tokens stay in force",
                extra={"why": why, "error": str(exc)},
            )
            return False
        self._table = self._with_internal(table)
        self.reloads += 1
        self.last_reload_error = ""
        log.info("tokens file reloaded", extra={"why": why, "tokens": len(table)})
        return True

    def request_reload(self) -> None:
        """For SIGHUP: reread the file at once (from the event loop's thread)."""
        if self.path is not None:
            self.reload(why="SIGHUP")

    async def start(self) -> None:
        if self.path is not None and self._task is None:
            self._task = spawn(self._watch(), stage="auth", name="tokens-watch")

    async def shutdown(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            stamp = self._stat()
            if stamp is not None and stamp != self._stamp:
                self.reload()

    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "tokens_file": str(self.path) if self.path else "",
            "tokens": len(self._table),
            "reloads": self.reloads,
            "reload_failures": self.reload_failures,
            "last_reload_error": self.last_reload_error,
            "denied": {f"{s}/{r}": n for (s, r), n in sorted(self.denied.items())},
        }
