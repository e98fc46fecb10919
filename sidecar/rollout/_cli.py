"""``atlas-sidecar rollout start|promote|abort|rollback|list``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sidecar._client_args import add_client_args, client_channel

__all__ = ["register"]


def _setup(p: argparse.ArgumentParser) -> None:
    p.description = "Start, promote, abort, roll back and list rollouts of a running daemon."
    common = argparse.ArgumentParser(add_help=False)
    add_client_args(common)
    common.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (default 10)")
    common.add_argument("--json", action="store_true", help="print JSON")
    sub = p.add_subparsers(dest="rollout_command", metavar="ACTION", required=True)
    s = sub.add_parser("start", help="start a rollout of a candidate version", parents=[common])
    s.add_argument("candidate", metavar="VERSION")
    s.add_argument("--strategy", choices=["canary", "blue_green"], default=None)
    s.add_argument("--reason", default="")
    for name, text in (
        ("promote", "skip the remaining analysis and send all traffic to the candidate"),
        ("abort", "stop the rollout and return all traffic to the stable version"),
        ("rollback", "return traffic to the previous stable version"),
    ):
        a = sub.add_parser(name, help=text, parents=[common])
        a.add_argument("rollout_id", nargs="?", default="", help="default: the active rollout")
        a.add_argument("--reason", default="")
    ls = sub.add_parser("list", help="list rollouts, newest first", parents=[common])
    ls.add_argument("--limit", type=int, default=20)


def _row(r: Any) -> dict[str, Any]:
    from sidecar.rollout._record import state_name

    return {
        "rollout_id": r.rollout_id,
        "candidate": r.candidate_version,
        "stable": r.stable_version,
        "state": state_name(r.state),
        "stage_index": r.stage_index,
        "candidate_weight_bps": r.candidate_weight_bps,
        "reason": r.transitions[-1].reason if r.transitions else "",
    }


def _run(args: argparse.Namespace) -> int:
    import grpc
    from atlas_sidecar_client.pb import admin_pb2, admin_pb2_grpc

    strategies = {
        None: admin_pb2.ROLLOUT_STRATEGY_UNSPECIFIED,
        "canary": admin_pb2.ROLLOUT_STRATEGY_CANARY,
        "blue_green": admin_pb2.ROLLOUT_STRATEGY_BLUE_GREEN,
    }
    with client_channel(args) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        cmd = args.rollout_command
        try:
            if cmd == "list":
                resp = stub.ListRollouts(
                    admin_pb2.ListRolloutsRequest(limit=args.limit), timeout=args.timeout
                )
                rows = [_row(r) for r in resp.rollouts]
            elif cmd == "start":
                req = admin_pb2.StartRolloutRequest(
                    candidate_version=args.candidate,
                    strategy=strategies[args.strategy],
                    reason=args.reason,
                )
                rows = [_row(stub.StartRollout(req, timeout=args.timeout))]
            else:
                call, msg = {
                    "promote": (stub.PromoteRollout, admin_pb2.PromoteRolloutRequest),
                    "abort": (stub.AbortRollout, admin_pb2.AbortRolloutRequest),
                    "rollback": (stub.Rollback, admin_pb2.RollbackRequest),
                }[cmd]
                rows = [
                    _row(
                        call(
                            msg(rollout_id=args.rollout_id, reason=args.reason),
                            timeout=args.timeout,
                        )
                    )
                ]
        except grpc.RpcError as exc:
            print(
                f"atlas-sidecar: rollout {cmd}: {exc.code().name}: {exc.details()}", file=sys.stderr
            )
            return 1
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no rollouts")
        return 0
    cols = (
        "rollout_id",
        "candidate",
        "stable",
        "state",
        "stage_index",
        "candidate_weight_bps",
        "reason",
    )
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    return 0


def register(commands: dict[str, Any]) -> None:
    commands["rollout"] = (_setup, _run)
