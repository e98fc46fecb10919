"""Channels to the sidecar with its token and, optionally, TLS.

The token is an argument or ``ATLAS_SIDECAR_TOKEN``; it goes on every call as
``authorization: Bearer <token>``. TLS needs the CA that signed the sidecar's
certificate (``ca_file``); mutual TLS also a client certificate and key.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

__all__ = ["TOKEN_ENV", "ChannelSecurity", "open_aio_channel", "open_channel"]

#: The environment variable every client and the CLI read the token from.
TOKEN_ENV = "ATLAS_SIDECAR_TOKEN"


@dataclass(frozen=True)
class ChannelSecurity:
    """A token and TLS files for a channel; every field optional.

    ``token=None`` reads ``ATLAS_SIDECAR_TOKEN`` (empty: no token).
    """

    token: str | None = None
    ca_file: str | os.PathLike[str] | None = None
    cert_file: str | os.PathLike[str] | None = None
    key_file: str | os.PathLike[str] | None = None
    #: The name the sidecar's certificate is checked against, when it is not the target's host.
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file are given together")
        if self.cert_file is not None and self.ca_file is None:
            raise ValueError("a client certificate needs ca_file (mutual TLS is TLS)")

    def resolved_token(self) -> str | None:
        token = self.token if self.token is not None else os.environ.get(TOKEN_ENV, "")
        return token.strip() or None

    @property
    def tls(self) -> bool:
        return self.ca_file is not None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(p: str | os.PathLike[str] | None) -> bytes | None:
            return Path(p).read_bytes() if p is not None else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )

    def options(self) -> list[tuple[str, Any]]:
        if self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []


class _Token(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds ``authorization`` to every call of a blocking channel."""

    def __init__(self, token: str) -> None:
        self._md = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        md = list(details.metadata or ())
        md.append(self._md)
        return (
            details._replace(metadata=md) if hasattr(details, "_replace") else _Details(details, md)
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


class _Details(grpc.ClientCallDetails):  # type: ignore[misc]
    def __init__(self, base: Any, metadata: list[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


class _AioToken(
    grpc.aio.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.aio.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.aio.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.aio.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds ``authorization`` to every call of an asyncio channel."""

    def __init__(self, token: str) -> None:
        self._md = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        md = grpc.aio.Metadata(*(details.metadata or ()))
        md.add(*self._md)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, md, details.credentials, details.wait_for_ready
        )

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)

    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def open_channel(
    target: str,
    security: ChannelSecurity | None = None,
    *,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A blocking channel to ``target`` with ``security``'s token and TLS."""
    sec = security if security is not None else ChannelSecurity()
    opts = [*options, *sec.options()]
    if sec.tls:
        channel = grpc.secure_channel(target, sec.credentials(), options=opts)
    else:
        channel = grpc.insecure_channel(target, options=opts)
    token = sec.resolved_token()
    return grpc.intercept_channel(channel, _Token(token)) if token else channel


def open_aio_channel(
    target: str,
    security: ChannelSecurity | None = None,
    *,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """An asyncio channel to ``target`` with ``security``'s token and TLS."""
    sec = security if security is not None else ChannelSecurity()
    opts = [*options, *sec.options()]
    token = sec.resolved_token()
    interceptors = [_AioToken(token)] if token else None
    if sec.tls:
        return grpc.aio.secure_channel(
            target, sec.credentials(), options=opts, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(target, options=opts, interceptors=interceptors)
