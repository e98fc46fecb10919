"""The flags every CLI command that calls a running daemon shares.

``--target``, ``--token`` (else ``ATLAS_SIDECAR_TOKEN``) and, for a daemon
with TLS, ``--ca-file`` and, for mutual TLS, ``--cert-file``/``--key-file``.
"""

from __future__ import annotations

import argparse

import grpc
from atlas_sidecar_client import TOKEN_ENV, ChannelSecurity, open_channel

__all__ = ["add_client_args", "client_channel"]


def add_client_args(p: argparse.ArgumentParser, *, target: bool = True) -> None:
    """Adds the flags; ``target=False`` where the caller declares ``--target`` itself."""
    if target:
        p.add_argument(
            "--target",
            default="127.0.0.1:50051",
            metavar="ADDR",
            help="gRPC address of the daemon (default 127.0.0.1:50051)",
        )
    p.add_argument(
        "--token",
        default=None,
        metavar="TOKEN",
        help=f"bearer token (default: ${TOKEN_ENV}); needed when the daemon has auth.tokens_file",
    )
    p.add_argument("--ca-file", metavar="PEM", help="CA of the daemon's TLS certificate")
    p.add_argument("--cert-file", metavar="PEM", help="client certificate (mutual TLS)")
    p.add_argument("--key-file", metavar="PEM", help="client certificate's key (mutual TLS)")


def client_channel(args: argparse.Namespace) -> grpc.Channel:
    """A channel to ``args.target`` with the flags' token and TLS.

    Raises:
        ValueError: a client certificate without its key or without a CA.
    """
    security = ChannelSecurity(
        token=args.token,
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
    )
    return open_channel(args.target, security)
