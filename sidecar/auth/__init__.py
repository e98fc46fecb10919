"""Who may call the daemon: bearer tokens with roles, TLS, the sign-in cookie.

See docs/security.md for the threat model and how to mint and rotate tokens.
"""

from sidecar.auth._authenticator import Authenticator, Denied, check_exposure
from sidecar.auth._grpc import METHOD_ROLES, AuthInterceptor
from sidecar.auth._http import SESSION_COOKIE, HttpAuth
from sidecar.auth._tls import TlsFiles
from sidecar.auth._tokens import Role, TokenEntry, TokenTable, hash_token, new_token

__all__ = [
    "METHOD_ROLES",
    "SESSION_COOKIE",
    "AuthInterceptor",
    "Authenticator",
    "Denied",
    "HttpAuth",
    "Role",
    "TlsFiles",
    "TokenEntry",
    "TokenTable",
    "check_exposure",
    "hash_token",
    "new_token",
]
