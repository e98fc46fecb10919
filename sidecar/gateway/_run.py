"""The ``atlas-sidecar gateway`` command: flags over the config file's ``gateway:`` section."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import signal
import sys
from typing import Any

__all__ = ["add_gateway_args", "run_gateway_command"]

_FLAGS = ("upstream", "listen", "sidecar", "backend", "server_id", "base_model", "presets_file")


def add_gateway_args(p: argparse.ArgumentParser) -> None:
    p.description = (
        "An OpenAI-compatible proxy in front of vLLM, SGLang, LoRAX or llama-server: routes "
        "each request by the sidecar's split, records every answer, takes feedback on "
        "POST /v1/feedback and loads the versions the sidecar asks for. Every key is in the "
        "config file's gateway: section (config.example.yaml); flags override it."
    )
    p.epilog = (
        "example: atlas-sidecar gateway --upstream http://127.0.0.1:8000 --backend vllm "
        "--listen 0.0.0.0:8080 --sidecar 127.0.0.1:50051  (see docs/gateway.md)"
    )
    p.add_argument("--upstream", metavar="URL", help="the model server, e.g. http://127.0.0.1:8000")
    p.add_argument("--listen", metavar="HOST:PORT", help="where to serve (default 127.0.0.1:8080)")
    p.add_argument("--sidecar", metavar="ADDR", help="the daemon's gRPC address (127.0.0.1:50051)")
    p.add_argument(
        "--backend",
        choices=["openai", "vllm", "sglang", "lorax", "llama-router", "llama-lora"],
        help="what the upstream is (default openai: model = version, nothing loaded)",
    )
    p.add_argument("--server-id", dest="server_id", metavar="ID", help="replica id (gateway)")
    p.add_argument("--base-model", dest="base_model", metavar="NAME", help="sglang: base model")
    p.add_argument(
        "--presets-file", dest="presets_file", metavar="INI", help="llama-router: presets INI"
    )
    p.add_argument("--config", metavar="FILE", help="YAML config file (its gateway: section)")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")


def run_gateway_command(args: argparse.Namespace) -> int:
    import uvloop

    from sidecar.config import load_config
    from sidecar.errors import ConfigError
    from sidecar.telemetry import configure_logging

    overrides: dict[str, Any] = {
        k: getattr(args, k) for k in _FLAGS if getattr(args, k, None) not in (None, "")
    }
    try:
        config = load_config(args.config, overrides={"gateway": overrides} if overrides else None)
    except ConfigError as exc:
        print(f"atlas-sidecar gateway: {exc}", file=sys.stderr)
        return 2
    gw = config.gateway
    if not gw.upstream:
        print("atlas-sidecar gateway: gateway.upstream (--upstream) is required", file=sys.stderr)
        return 2
    token = None
    if gw.token_file is not None:
        try:
            token = gw.token_file.read_text().strip()
        except OSError as exc:
            print(
                f"atlas-sidecar gateway: gateway.token_file: cannot read {gw.token_file}: "
                f"{exc.strerror}",
                file=sys.stderr,
            )
            return 2
    configure_logging(args.log_level, json_logs=True, log_text=False)
    return int(uvloop.run(_serve(gw, token)))


async def _serve(gw: Any, token: str | None) -> int:
    from sidecar.gateway._proxy import Gateway

    gateway = Gateway(gw, token=token)
    try:
        await gateway.start()
    except OSError as exc:
        print(
            f"atlas-sidecar gateway: cannot listen on {gw.listen}: {exc.strerror}", file=sys.stderr
        )
        await gateway.stop()
        return 1
    # Everything built at start (the app, the client library, protobuf
    # descriptors) is moved out of the collector's sight, and young objects
    # are collected less often: a full collection walking them all was the
    # gateway's worst pause under load.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"event": "ready", "port": gateway.port, "upstream": gw.upstream}), flush=True)
    await stop.wait()
    await gateway.stop()
    return 0
