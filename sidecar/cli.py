"""atlas-sidecar: the command line.

atlas-sidecar serve [--config FILE] [--listen ADDR] [--http-listen ADDR] [--data-dir DIR]
atlas-sidecar status [--target ADDR] [--json]
atlas-sidecar validate-config FILE
atlas-sidecar export --kind sft|dpo|kto --out FILE [--since TIME]
atlas-sidecar reprocess --data-dir DIR [--config FILE]
atlas-sidecar check --data-dir DIR
atlas-sidecar rollout start|promote|abort|rollback|list
atlas-sidecar demo
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

# The daemon starts trainer hooks as subprocesses while gRPC threads run.
# gRPC's fork handlers then run in the child between fork and exec and can
# crash it (SIGSEGV before the trainer starts). The daemon never forks
# without exec, so it needs none of them. Set before gRPC is first imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from sidecar import __version__
from sidecar._client_args import add_client_args, client_channel
from sidecar.errors import ConfigError, SidecarError, StoreCorruptError

__all__ = ["main"]

EPILOG = """\
configuration precedence: defaults < --config FILE < ATLAS_SIDECAR__SECTION__KEY env < flags
  e.g. ATLAS_SIDECAR__STORE__COMMIT_WINDOW_MS=1 atlas-sidecar serve --data-dir /var/lib/atlas
see config.example.yaml for every key with its default and what it trades off
"""

#: Subcommands registered by later stages (rollout, export, ...): name -> (setup, run).
EXTRA_COMMANDS: dict[
    str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
] = {}


#: One line each for ``atlas-sidecar --help``.
EXTRA_HELP = {
    "export": "write a running (or stopped) daemon's training rows as JSONL",
    "reprocess": "rebuild every score, sample and pair from the log (daemon stopped)",
    "rollout": "start, promote, abort, roll back and list rollouts",
    "train": "the reference trainer: TRL's DPO, KTO or SFT on a LoRA (the command hook)",
    "model": "turn a packaged GGUF into the Hugging Face folder training needs",
}


def _register_stage_commands() -> None:
    """Adds the stages' subcommands (export, reprocess, rollout ...); imported lazily
    so that ``atlas-sidecar status`` does not pay for the whole daemon."""
    from sidecar.rollout._cli import register as register_rollout
    from sidecar.training._cli import register as register_training

    register_training(EXTRA_COMMANDS)
    register_rollout(EXTRA_COMMANDS)


def _parser() -> argparse.ArgumentParser:
    _register_stage_commands()
    p = argparse.ArgumentParser(
        prog="atlas-sidecar",
        description="A continuous-learning sidecar for inference servers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"atlas-sidecar {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser(
        "serve",
        help="run the daemon",
        description="Run the daemon: gRPC ingest/control/admin plus HTTP /metrics and /dashboard.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--config", metavar="FILE", help="YAML config file")
    s.add_argument(
        "--listen",
        metavar="ADDR",
        action="append",
        help="gRPC address, host:port or unix:/path (repeatable; default 127.0.0.1:50051)",
    )
    s.add_argument(
        "--http-listen", metavar="ADDR", help="HTTP address ('' disables; default 127.0.0.1:9464)"
    )
    s.add_argument("--data-dir", metavar="DIR", help="data directory (default ./var/atlas-sidecar)")
    s.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    s.add_argument("--plain-logs", action="store_true", help="human-readable logs instead of JSON")

    st = sub.add_parser("status", help="show a running daemon's status")
    add_client_args(st)
    st.add_argument("--json", action="store_true", help="print JSON")
    st.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")

    c = sub.add_parser(
        "check",
        help="verify a stopped daemon's store; exit non-zero naming what is wrong",
        description="Read every database of the store end to end and check that they agree "
        "(events and their ids, cursors within the log). Run it while the daemon is stopped.",
    )
    c.add_argument("--data-dir", required=True, metavar="DIR", help="the daemon's data dir")

    from sidecar.gateway._run import add_gateway_args

    add_gateway_args(
        sub.add_parser("gateway", help="an OpenAI-compatible proxy in front of a model server")
    )

    t = sub.add_parser(
        "token",
        help="mint a token, or hash one, for auth.tokens_file",
        description="Tokens stand in auth.tokens_file only as their SHA-256. 'token new' "
        "prints a fresh token (give it to the client, e.g. as ATLAS_SIDECAR_TOKEN) and the "
        "entry to add to the file; 'token hash' reads a token on stdin and prints its SHA-256.",
        epilog="example: atlas-sidecar token new --name vllm-0 --role ingest --role server "
        "--server-id 'vllm-*' >> entry.yaml (see docs/security.md)",
    )
    tsub = t.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    tn = tsub.add_parser("new", help="print a new token and its tokens-file entry")
    tn.add_argument("--name", required=True, help="the entry's name (shown in logs and metrics)")
    tn.add_argument(
        "--role",
        action="append",
        required=True,
        choices=["ingest", "server", "operator", "read"],
        help="a role of the token (repeat for more)",
    )
    tn.add_argument(
        "--server-id",
        action="append",
        default=[],
        metavar="GLOB",
        help="with --role server: a server_id pattern the token may claim (repeat for more)",
    )
    tsub.add_parser("hash", help="print the SHA-256 of the token read from stdin")

    v = sub.add_parser(
        "validate-config", help="check a config file; exit non-zero naming the bad key"
    )
    v.add_argument("file", metavar="FILE")

    d = sub.add_parser(
        "demo",
        help="run the whole loop on this machine",
        description="Sidecar, reference inference server and simulated users on loopback, "
        "until updates are promoted and a sabotaged candidate is rolled back.",
    )
    d.add_argument(
        "--data-dir", default="./var/demo", metavar="DIR", help="demo data (default ./var/demo)"
    )
    d.add_argument("--rate", type=float, default=60.0, help="user questions/s (default 60)")
    d.add_argument("--seed", type=int, default=11, help="seed of users and server (default 11)")
    d.add_argument(
        "--deadline", type=float, default=170.0, help="give up after SECONDS (default 170)"
    )
    d.add_argument("--plain", action="store_true", help="print lines instead of a live view")
    d.add_argument(
        "--promotions", type=int, default=3, help="updates to promote before stopping (default 3)"
    )
    d.add_argument(
        "--settle",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="keep measuring the final stable version this long (default 15)",
    )
    d.add_argument(
        "--sabotage-run",
        type=int,
        default=3,
        metavar="N",
        help="which training run is sabotaged on purpose (default 3; 0: none)",
    )

    for name, (setup, _run) in EXTRA_COMMANDS.items():
        setup(sub.add_parser(name, help=EXTRA_HELP.get(name)))
    return p


def _serve(args: argparse.Namespace) -> int:
    from sidecar.config import load_config
    from sidecar.telemetry import configure_logging

    overrides: dict[str, Any] = {}
    if args.listen:
        overrides.setdefault("server", {})["listen"] = args.listen
    if args.http_listen is not None:
        overrides.setdefault("server", {})["http_listen"] = args.http_listen
    if args.data_dir:
        overrides.setdefault("store", {})["data_dir"] = args.data_dir
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"atlas-sidecar: {exc}", file=sys.stderr)
        return 2
    configure_logging(
        args.log_level, json_logs=not args.plain_logs, log_text=config.telemetry.log_text
    )
    return _run_daemon(config)


def _run_daemon(config: Any) -> int:
    import uvloop

    from sidecar.app import SidecarApp

    def store_failed(exc: StoreCorruptError) -> None:
        # A damaged store found while serving: say so once and stop at once.
        # A clean shutdown would keep writing to it (commits, cursors), and
        # every stage that trips over it would log a traceback of its own.
        print(f"atlas-sidecar: {exc}", file=sys.stderr, flush=True)
        os._exit(3)

    async def run() -> int:
        try:
            app = SidecarApp(config, on_store_fatal=store_failed)
        except SidecarError as exc:
            print(f"atlas-sidecar: {exc}", file=sys.stderr)
            return 2
        try:
            await app.start()
        except StoreCorruptError as exc:
            print(f"atlas-sidecar: {exc}", file=sys.stderr)
            return 3
        except SidecarError as exc:
            print(f"atlas-sidecar: {exc}", file=sys.stderr)
            return 1
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, app.request_stop)
        # SIGHUP rereads the tokens file (it is also reread when it changes).
        loop.add_signal_handler(signal.SIGHUP, app.auth.request_reload)
        ready = {"event": "ready", "ports": app.ports, "data_dir": str(app.store.data_dir)}
        print(json.dumps(ready), flush=True)
        await app.wait()
        await app.shutdown()
        return 0

    return int(uvloop.run(run()))


def _rpc_problem(target: str, exc: Any) -> str:
    """One line on why a call to the daemon failed, with what to do about a refusal."""
    import grpc

    code = exc.code()
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return (
            f"the daemon at {target} refused the call: {code.name}: {exc.details()} "
            "(pass --token or set ATLAS_SIDECAR_TOKEN)"
        )
    return f"cannot reach the daemon at {target}: {code.name}: {exc.details()}"


def _status(args: argparse.Namespace) -> int:
    import grpc
    from atlas_sidecar_client.pb import admin_pb2, admin_pb2_grpc

    from sidecar.admin import status_to_dict

    with client_channel(args) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        try:
            status = stub.GetStatus(admin_pb2.GetStatusRequest(), timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"atlas-sidecar: {_rpc_problem(args.target, exc)}", file=sys.stderr)
            return 1
    doc = status_to_dict(status)
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    ev, store = doc["events"], doc["store"]
    rows = [
        ("version", doc["version"]),
        ("uptime", f"{doc['uptime_seconds']:.1f} s"),
        ("events accepted", f"{ev['accepted']:,}"),
        ("events duplicate", f"{ev['duplicates']:,}"),
        ("events rejected", f"{ev['rejected']:,}"),
        ("log", f"{store['log_events']:,} events (seq {store['first_seq']}..{store['last_seq']})"),
        (
            "disk used",
            f"{store['used_bytes'] / 1e6:.1f} MB of map {store['map_size_bytes'] / 1e9:.1f} GB",
        ),
        ("disk free", f"{store['disk_free_bytes'] / 1e9:.1f} GB"),
        ("data dir", store["data_dir"]),
        ("open streams", str(doc["open_streams"])),
        ("connected servers", str(doc["connected_servers"])),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for stage, detail in sorted(doc["details"].items()):
        print(f"{stage}:")
        for key, value in sorted(detail.items()):
            print(f"  {key}: {value}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sidecar.store import check_store

    data_dir = Path(args.data_dir)
    print(f"checking the store in {data_dir}")
    try:
        report = check_store(data_dir, progress=print)
    except SidecarError as exc:
        print(f"atlas-sidecar: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"atlas-sidecar: cannot check {data_dir}: {exc}", file=sys.stderr)
        return 1
    if report.ok:
        print(f"{data_dir}: ok ({len(report.checked)} checks)")
        return 0
    for line in report.problems:
        print(f"atlas-sidecar: {line}", file=sys.stderr)
    print(f"{data_dir}: {len(report.problems)} problem(s) found", file=sys.stderr)
    return 3


def _validate_config(args: argparse.Namespace) -> int:
    from sidecar.config import load_config

    try:
        load_config(args.file, environ={})
    except ConfigError as exc:
        print(f"atlas-sidecar: {exc}", file=sys.stderr)
        return 1
    print(f"{args.file}: ok")
    return 0


def _demo(args: argparse.Namespace) -> int:
    try:
        from sidecar.demo import DemoSettings, run_demo
    except ImportError as exc:
        print(
            f"atlas-sidecar demo: {exc.name} is missing: install the demo extra "
            "(pip install 'atlas-sidecar[demo]'; make demo does)",
            file=sys.stderr,
        )
        return 2

    settings = DemoSettings(
        rate=args.rate,
        seed=args.seed,
        deadline_s=args.deadline,
        live=False if args.plain else None,
        promotions=args.promotions,
        sabotage_run=args.sabotage_run,
        settle_s=args.settle,
    )
    return run_demo(args.data_dir, settings=settings)


def _gateway(args: argparse.Namespace) -> int:
    from sidecar.gateway._run import run_gateway_command

    return run_gateway_command(args)


def _token(args: argparse.Namespace) -> int:
    import yaml

    from sidecar.auth import hash_token, new_token

    if args.token_command == "hash":
        token = sys.stdin.readline().strip()
        if not token:
            print("atlas-sidecar: token hash: no token on stdin", file=sys.stderr)
            return 2
        print(hash_token(token))
        return 0
    if args.server_id and "server" not in args.role:
        print("atlas-sidecar: token new: --server-id needs --role server", file=sys.stderr)
        return 2
    token = new_token()
    entry: dict[str, Any] = {"name": args.name, "sha256": hash_token(token), "roles": args.role}
    if args.server_id:
        entry["server_ids"] = args.server_id
    # The token on stderr (for the client), the entry on stdout (for the file).
    print(f"token (give it to the client; it is not stored anywhere): {token}", file=sys.stderr)
    print(yaml.safe_dump([entry], sort_keys=False), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "serve": _serve,
        "status": _status,
        "validate-config": _validate_config,
        "check": _check,
        "demo": _demo,
        "token": _token,
        "gateway": _gateway,
    }
    commands.update({name: run for name, (_setup, run) in EXTRA_COMMANDS.items()})
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
