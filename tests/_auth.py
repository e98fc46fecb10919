"""Tokens files and certificates made in the test, for daemons with auth and TLS on."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.auth import hash_token, new_token

#: One token per role, and one a server may use for ids matching ``pod-*``.
ROLE_TOKENS: dict[str, tuple[list[str], list[str]]] = {
    "ingester": (["ingest"], []),
    "server": (["server"], ["pod-*"]),
    "operator": (["operator"], []),
    "reader": (["read"], []),
}


def write_tokens(
    path: Path, entries: Mapping[str, tuple[Iterable[str], Iterable[str]]] = ROLE_TOKENS
) -> dict[str, str]:
    """Writes a tokens file for ``entries`` (name -> (roles, server_ids)); returns name -> token."""
    tokens = {name: new_token() for name in entries}
    doc = {
        "tokens": [
            {
                "name": name,
                "sha256": hash_token(tokens[name]),
                "roles": list(roles),
                **({"server_ids": list(ids)} if list(ids) else {}),
            }
            for name, (roles, ids) in entries.items()
        ]
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc))
    tmp.replace(path)
    return tokens


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class CertAuthority:
    """A CA made in the test; :meth:`issue` signs server and client certificates."""

    def __init__(self, folder: Path, name: str = "test-ca") -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_file = folder / f"{name}.pem"
        self.cert_file.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, cn: str, *, client: bool = False, out: Pem | None = None) -> Pem:
        """A certificate for ``cn`` (a server one valid for localhost and 127.0.0.1)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if client:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            ).add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
        cert = builder.sign(self._key, hashes.SHA256())
        pem = out or Pem(self.folder / f"{cn}.pem", self.folder / f"{cn}.key")
        # Written beside and renamed, as a Secret update or cert-manager does.
        for path, data in (
            (pem.key, _key_pem(key)),
            (pem.cert, cert.public_bytes(serialization.Encoding.PEM)),
        ):
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
        return pem
