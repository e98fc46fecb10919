"""Bearer tokens and a sign-in cookie on the HTTP listener.

API callers (Prometheus, curl, scripts) send ``authorization: Bearer
<token>``. A browser cannot add that header to a page load, so ``/login``
takes the token once in a form and sets a session cookie: HttpOnly,
SameSite=Strict, Secure under TLS, valid for ``auth.session_seconds``. The
cookie carries the entry's name, an expiry and an HMAC over both and the
entry's current digest under a key made at start; rotating or removing the
token, or restarting the daemon, ends the session.

Open without a token: ``/healthz`` (liveness probes send nothing), ``/login``,
``/logout`` and the dashboard's static assets (no data in them).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from sidecar.auth._authenticator import Authenticator, Denied
from sidecar.auth._tokens import Role, TokenEntry

__all__ = ["SESSION_COOKIE", "HttpAuth"]

SESSION_COOKIE = "atlas_sidecar_session"
_OPEN_PATHS = frozenset({"/healthz", "/login", "/logout"})
_OPEN_PREFIXES = ("/static/",)
#: Page loads a browser makes: sent to /login instead of a bare 401.
_PAGES = frozenset({"/", "/dashboard"})
#: Routes that take events (the ingest role), not read the daemon's state.
_INGEST_PATHS = frozenset({"/v1/feedback"})

_LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>atlas-sidecar: sign in</title>
<link rel="stylesheet" href="/static/dashboard.css"></head>
<body><main style="max-width:28rem;margin:4rem auto">
<h1>atlas-sidecar</h1>
<p>This sidecar needs a token with the <code>read</code> role.</p>
{error}
<form method="post" action="/login">
<input type="hidden" name="next" value="{next}">
<label>Token <input type="password" name="token" autocomplete="off" autofocus required></label>
<button type="submit">Sign in</button>
</form></main></body></html>
"""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _safe_next(value: str) -> str:
    """A local path to go back to after sign-in (never another site)."""
    if value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/dashboard"


class HttpAuth:
    """The aiohttp middleware and the /login and /logout routes."""

    def __init__(
        self, auth: Authenticator, *, session_seconds: float, secure_cookie: bool = False
    ) -> None:
        self._auth = auth
        self._session_seconds = session_seconds
        self._secure = secure_cookie
        self._key = secrets.token_bytes(32)

    def install(self, app: web.Application) -> None:
        app.middlewares.append(self.middleware)
        app.router.add_get("/login", self._login_page)
        app.router.add_post("/login", self._login)
        app.router.add_get("/logout", self._logout)

    # -- sessions ----------------------------------------------------------------

    def _mac(self, entry: TokenEntry, expires: int) -> str:
        msg = f"{entry.name}\n{entry.sha256}\n{expires}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()

    def _cookie_for(self, entry: TokenEntry) -> str:
        expires = int(time.time() + self._session_seconds)
        name = base64.urlsafe_b64encode(entry.name.encode()).decode().rstrip("=")
        return f"{name}.{expires}.{self._mac(entry, expires)}"

    def _session_entry(self, cookie: str | None) -> TokenEntry | None:
        if not cookie:
            return None
        parts = cookie.split(".")
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        try:
            name = base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        expires = int(parts[1])
        entry = self._auth.table.by_name.get(name)
        if entry is None or expires < time.time():
            return None
        if not hmac.compare_digest(self._mac(entry, expires), parts[2]):
            return None
        return entry

    # -- the middleware ------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if not self._auth.enabled or path in _OPEN_PATHS or path.startswith(_OPEN_PREFIXES):
            return await handler(request)
        header = request.headers.get("Authorization")
        who: TokenEntry | Denied | None
        if path in _INGEST_PATHS:
            # Feedback is ingest: a token with that role, never a dashboard cookie.
            who = self._auth.authorize(header, Role.INGEST)
            if isinstance(who, Denied):
                self._auth.count("http", who)
                status = 401 if who.unauthenticated else 403
                return web.Response(status=status, text=who.message + "\n")
            return await handler(request)
        if header is None:
            entry = self._session_entry(request.cookies.get(SESSION_COOKIE))
            if entry is not None:
                who = (
                    entry
                    if Role.READ in entry.roles
                    else Denied("missing_role", f"token {entry.name!r} lacks the 'read' role")
                )
            else:
                who = self._auth.authorize(None, Role.READ)
        else:
            who = self._auth.authorize(header, Role.READ)
        if not isinstance(who, Denied):
            return await handler(request)
        self._auth.count("http", who)
        if who.unauthenticated and request.method == "GET" and path in _PAGES:
            raise web.HTTPSeeOther(f"/login?next={path}")
        if who.unauthenticated:
            raise web.HTTPUnauthorized(
                text=who.message + "\n",
                headers={"WWW-Authenticate": 'Bearer realm="atlas-sidecar"'},
            )
        raise web.HTTPForbidden(text=who.message + "\n")

    # -- sign-in -----------------------------------------------------------------

    def _page(self, next_path: str, error: str = "", status: int = 200) -> web.Response:
        err = f'<p role="alert">{html.escape(error)}</p>' if error else ""
        body = _LOGIN_PAGE.format(error=err, next=html.escape(_safe_next(next_path), quote=True))
        return web.Response(text=body, content_type="text/html", status=status)

    async def _login_page(self, request: web.Request) -> web.Response:
        return self._page(request.query.get("next", "/dashboard"))

    async def _login(self, request: web.Request) -> web.Response:
        form: Any = await request.post()
        token = str(form.get("token", "")).strip()
        next_path = _safe_next(str(form.get("next", "/dashboard")))
        who = self._auth.authorize(f"Bearer {token}" if token else None, Role.READ)
        if isinstance(who, Denied):
            self._auth.count("http", who)
            status = 401 if who.unauthenticated else 403
            return self._page(next_path, who.message, status=status)
        if who is None:  # auth is off: nothing to sign in to
            raise web.HTTPSeeOther(next_path)
        response = web.HTTPSeeOther(next_path)
        response.set_cookie(
            SESSION_COOKIE,
            self._cookie_for(who),
            max_age=int(self._session_seconds),
            httponly=True,
            samesite="Strict",
            secure=self._secure,
            path="/",
        )
        raise response

    async def _logout(self, request: web.Request) -> web.Response:
        response = web.HTTPSeeOther("/login")
        response.del_cookie(SESSION_COOKIE, path="/")
        raise response
