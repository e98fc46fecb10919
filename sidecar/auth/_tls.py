"""TLS and mutual TLS for the gRPC and HTTP listeners, reloaded when the files change.

``server.tls.cert_file`` and ``key_file`` (PEM) turn TLS on for every TCP
listener; ``client_ca_file`` also requires a client certificate signed by
that CA (mTLS). A renewed certificate (cert-manager rewrites the Secret's
files in place) is picked up without restart: gRPC asks for its certificate
on each handshake and gets the new pair once the files' stamps change; the
HTTP listener's context loads the new pair in place. A pair that does not
load (half-written, key and cert that do not match) keeps the previous one
and is logged.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from pathlib import Path

import grpc

from sidecar.errors import ConfigError

__all__ = ["TlsFiles"]

log = logging.getLogger(__name__)


class TlsFiles:
    """The PEM files of ``server.tls`` and the credentials built from them."""

    def __init__(
        self, cert_file: Path, key_file: Path, client_ca_file: Path | None, *, check_seconds: float
    ) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.client_ca_file = client_ca_file
        self._check_seconds = check_seconds
        self._next_check = 0.0
        self.reloads = 0
        self.reload_failures = 0
        self._stamp = self._stamps()
        self._pem = self._read()
        self._http: ssl.SSLContext | None = None
        try:
            self._validate(self._pem)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"server.tls: {cert_file} and {key_file} do not load as a certificate and "
                f"its key: {exc}"
            ) from None

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None

    def _paths(self) -> list[Path]:
        return [p for p in (self.cert_file, self.key_file, self.client_ca_file) if p is not None]

    def _stamps(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for p in self._paths():
            try:
                st = os.stat(p)
            except OSError:
                out.append((0, 0, 0))
                continue
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def _read(self) -> tuple[bytes, bytes, bytes | None]:
        def read(p: Path, key: str) -> bytes:
            try:
                return p.read_bytes()
            except OSError as exc:
                raise ConfigError(f"server.tls.{key}: cannot read {p}: {exc.strerror}") from None

        ca = read(self.client_ca_file, "client_ca_file") if self.client_ca_file else None
        return read(self.cert_file, "cert_file"), read(self.key_file, "key_file"), ca

    def _validate(self, pem: tuple[bytes, bytes, bytes | None]) -> None:
        """Raises ssl.SSLError unless the pair on disk (and the CA) load."""
        self._load_into(self._new_context(), pem[2])

    @staticmethod
    def _new_context() -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def _load_into(self, ctx: ssl.SSLContext, ca: bytes | None) -> None:
        ctx.load_cert_chain(self.cert_file, self.key_file)
        if ca is not None:
            # OpenSSL adds CAs to a live context: one taken out stays trusted until restart.
            ctx.load_verify_locations(cadata=ca.decode("ascii", errors="replace"))
            ctx.verify_mode = ssl.CERT_REQUIRED

    def _maybe_reload(self) -> bool:
        """Rereads the files if their stamps changed; True if a new pair took."""
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + self._check_seconds
        stamp = self._stamps()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            pem = self._read()
            self._validate(pem)
        except (ConfigError, ssl.SSLError, OSError, ValueError) as exc:
            self.reload_failures += 1
            log.error(
                "TLS files not reloaded; the previous certificate stays in use",
                extra={"cert_file": str(self.cert_file), "error": str(exc)},
            )
            return False
        self._pem = pem
        self.reloads += 1
        log.info("TLS certificate reloaded", extra={"cert_file": str(self.cert_file)})
        if self._http is not None:
            self._reload_http(self._http)
        return True

    # -- gRPC ----------------------------------------------------------------

    def _grpc_config(self) -> grpc.ServerCertificateConfiguration:
        cert, key, ca = self._pem
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def grpc_credentials(self) -> grpc.ServerCredentials:
        # The HTTP watcher may be the one to notice a renewal: gRPC compares
        # the reload count it last served, not whether this call reloaded.
        served = [self.reloads]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            try:
                self._maybe_reload()
                if self.reloads == served[0]:
                    return None
                served[0] = self.reloads
                return self._grpc_config()
            except Exception:  # never fail a handshake because of a reload
                log.exception("TLS reload check failed")
                return None

        return grpc.dynamic_ssl_server_credentials(
            self._grpc_config(), fetch, require_client_authentication=self.mutual
        )

    # -- HTTP ----------------------------------------------------------------

    def http_context(self) -> ssl.SSLContext:
        """The HTTP listener's context; :meth:`check` loads a renewed pair into it."""
        if self._http is None:
            self._http = self._new_context()
            self._load_into(self._http, self._pem[2])
        return self._http

    def _reload_http(self, ctx: ssl.SSLContext) -> None:
        self._load_into(ctx, self._pem[2])

    def check(self) -> None:
        """For a periodic task: reload if the files changed (HTTP needs the push)."""
        self._maybe_reload()
