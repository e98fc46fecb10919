"""The tokens file: who may call the daemon, and as what.

A YAML file of SHA-256 digests, never of tokens::

    tokens:
      - name: vllm-pod            # shown in logs and metrics
        sha256: 9f86d0...          # hex SHA-256 of the token
        roles: [ingest, server]
        server_ids: ["vllm-*"]     # server role only: ids it may claim (globs)

A caller presents the token itself (``authorization: Bearer <token>``); the
daemon hashes it and looks the digest up, so the file can be read by whoever
deploys the daemon without handing out the tokens.
"""

from __future__ import annotations

import enum
import fnmatch
import hashlib
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sidecar.errors import ConfigError

__all__ = ["Role", "TokenEntry", "TokenTable", "hash_token", "load_tokens", "new_token"]

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
#: The prefix of minted tokens: easy to grep for in a leaked log, easy to tell apart.
TOKEN_PREFIX = "atls_"


class Role(enum.StrEnum):
    """What a token may do; see docs/security.md."""

    #: IngestService and ActiveLearningService.
    INGEST = "ingest"
    #: ControlService, for the server_ids the entry may claim.
    SERVER = "server"
    #: AdminService calls that change state, and ExportSamples (user text).
    OPERATOR = "operator"
    #: GetStatus, GetReport, ListRollouts, /api/*, /dashboard and /metrics.
    READ = "read"


def hash_token(token: str) -> str:
    """The hex SHA-256 a tokens file lists for ``token``."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random token (32 bytes of entropy)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class TokenEntry:
    name: str
    sha256: str
    roles: frozenset[Role]
    #: Glob patterns of the server_ids a ``server`` token may claim; empty: any.
    server_ids: tuple[str, ...] = ()

    def may_claim(self, server_id: str) -> bool:
        """True if this entry may say Hello as ``server_id``."""
        if Role.SERVER not in self.roles:
            return False
        if not self.server_ids:
            return True
        return any(fnmatch.fnmatchcase(server_id, p) for p in self.server_ids)


@dataclass(frozen=True)
class TokenTable:
    """The entries of one tokens file, by digest and by name."""

    by_digest: Mapping[str, TokenEntry] = field(default_factory=dict)
    by_name: Mapping[str, TokenEntry] = field(default_factory=dict)

    @classmethod
    def of(cls, entries: Iterable[TokenEntry]) -> TokenTable:
        entries = list(entries)
        return cls({e.sha256: e for e in entries}, {e.name: e for e in entries})

    def lookup(self, token: str) -> TokenEntry | None:
        return self.by_digest.get(hash_token(token))

    def __len__(self) -> int:
        return len(self.by_digest)


def _entry(i: int, raw: Any, where: str) -> TokenEntry:
    at = f"{where}: tokens[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{at}: expected a mapping with name, sha256 and roles")
    unknown = set(raw) - {"name", "sha256", "roles", "server_ids"}
    if unknown:
        raise ConfigError(f"{at}: unknown key {sorted(unknown)[0]!r}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{at}.name: a non-empty string is required")
    digest = raw.get("sha256")
    if not isinstance(digest, str) or not _HEX64.match(digest.lower()):
        raise ConfigError(
            f"{at}.sha256: expected the 64 hex digits of the token's SHA-256 "
            "(atlas-sidecar token hash), never the token itself"
        )
    roles_raw = raw.get("roles")
    if not isinstance(roles_raw, list) or not roles_raw:
        raise ConfigError(f"{at}.roles: a non-empty list is required")
    roles: set[Role] = set()
    valid = ", ".join(r.value for r in Role)
    for j, r in enumerate(roles_raw):
        try:
            roles.add(Role(r))
        except ValueError:
            raise ConfigError(f"{at}.roles[{j}]: {r!r} is not a role ({valid})") from None
    ids_raw = raw.get("server_ids", [])
    if not isinstance(ids_raw, list) or not all(isinstance(p, str) and p for p in ids_raw):
        raise ConfigError(f"{at}.server_ids: a list of non-empty glob patterns is required")
    if ids_raw and Role.SERVER not in roles:
        raise ConfigError(f"{at}.server_ids: only an entry with the server role may list ids")
    return TokenEntry(name.strip(), digest.lower(), frozenset(roles), tuple(ids_raw))


def parse_tokens(text: str, where: str) -> TokenTable:
    """Parses a tokens file's text; raises ConfigError naming the bad entry and key."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("tokens"), list):
        raise ConfigError(f"{where}: expected a mapping with a 'tokens' list")
    entries = [_entry(i, raw, where) for i, raw in enumerate(doc["tokens"])]
    seen_names: set[str] = set()
    seen_digests: set[str] = set()
    for i, e in enumerate(entries):
        if e.name in seen_names:
            raise ConfigError(f"{where}: tokens[{i}].name: {e.name!r} is listed twice")
        if e.sha256 in seen_digests:
            raise ConfigError(f"{where}: tokens[{i}].sha256: the same token is listed twice")
        seen_names.add(e.name)
        seen_digests.add(e.sha256)
    return TokenTable.of(entries)


def load_tokens(path: Path) -> TokenTable:
    """Reads ``path``; raises ConfigError naming the file and the bad entry."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"auth.tokens_file: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"auth.tokens_file: {path} is not UTF-8 text") from None
    return parse_tokens(text, f"auth.tokens_file {path}")
