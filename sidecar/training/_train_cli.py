"""``atlas-sidecar train`` and ``atlas-sidecar model import-gguf``.

Argument parsing only: the torch stack is imported when a command runs
(:mod:`sidecar.training._trl`), never by the daemon or by ``--help``.

Exit codes of ``train``: 0 a candidate was written; 2 bad input (a malformed
dataset row, a bad config file, no models folder); 3 too little data for the
method; 4 no model for the base version; 5 the trl extra is not installed;
143 stopped by SIGTERM (no candidate); 1 anything else (the log says what).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["register"]

EXIT_BAD_INPUT = 2
EXIT_THIN_DATA = 3
EXIT_NO_BASE = 4
EXIT_NO_TORCH = 5
EXIT_TERMINATED = 128 + 15


def setup_train(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Train a LoRA candidate from a dataset snapshot with TRL (DPO, KTO or SFT) and "
        "write candidate.json. Meant as the command hook: "
        "atlas-sidecar train --data {dataset_dir} --out {output_dir} --base {base_version}"
    )
    p.add_argument("--data", required=True, metavar="DIR", help="the dataset snapshot folder")
    p.add_argument("--out", required=True, metavar="DIR", help="where candidate.json goes")
    p.add_argument("--base", required=True, metavar="VERSION", help="the version to start from")
    p.add_argument(
        "--method",
        choices=("auto", "dpo", "kto", "sft"),
        default="auto",
        help="auto (default): DPO when there are enough pairs, else KTO, else SFT",
    )
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of trainer settings")
    p.add_argument(
        "--models-dir",
        metavar="DIR",
        help="folder of versions (default: models_dir in --config, else $ATLAS_MODELS_DIR)",
    )
    p.add_argument("--steps", type=int, help="optimizer steps (default 12)")


def _settings(args: argparse.Namespace) -> Any:
    from sidecar.training._trl_data import Settings

    doc: dict[str, Any] = {}
    if args.config:
        import yaml

        loaded = yaml.safe_load(Path(args.config).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: expected a mapping of settings")
        doc = dict(loaded or {})
    s = Settings.from_mapping(doc)
    if args.models_dir:
        s.models_dir = args.models_dir
    elif not s.models_dir:
        s.models_dir = os.environ.get("ATLAS_MODELS_DIR", "")
    if args.steps is not None:
        s.steps = args.steps
    return s


def run_train(args: argparse.Namespace) -> int:
    from sidecar.training._trl_data import DatasetError, ThinDataError

    def fail(code: int, msg: str) -> int:
        print(f"trainer: {msg}", file=sys.stderr, flush=True)
        return code

    try:
        settings = _settings(args)
    except (OSError, ValueError) as exc:
        return fail(EXIT_BAD_INPUT, f"bad config: {exc}")
    from sidecar.training import _trl  # imports torch only when a run starts

    try:
        with _trl.stop_on_sigterm():
            _trl.train(Path(args.data), Path(args.out), args.base, args.method, settings)
    except _trl.Terminated:
        return fail(EXIT_TERMINATED, "stopped by SIGTERM; no candidate written")
    except DatasetError as exc:
        return fail(EXIT_BAD_INPUT, f"bad dataset: {exc}")
    except ThinDataError as exc:
        return fail(EXIT_THIN_DATA, str(exc))
    except FileNotFoundError as exc:
        return fail(EXIT_NO_BASE, str(exc))
    except ModuleNotFoundError as exc:
        return fail(EXIT_NO_TORCH, f"the trl extra is not installed ({exc}); see make trl-env")
    except ValueError as exc:
        return fail(EXIT_BAD_INPUT, str(exc))
    return 0


def setup_model(p: argparse.ArgumentParser) -> None:
    p.description = "Model files for the trainer."
    sub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    imp = sub.add_parser(
        "import-gguf",
        help="a GGUF model as the Hugging Face folder training starts from (offline)",
        description=(
            "Dequantize a GGUF model (as llama-server runs it) into a Hugging Face folder "
            "(float32 safetensors, tokenizer): the root version the trainer's LoRA sits on."
        ),
    )
    imp.add_argument("file", metavar="FILE", help="the .gguf file")
    imp.add_argument("--out", required=True, metavar="DIR", help="the folder to create")


def run_model(args: argparse.Namespace) -> int:
    # Offline: the GGUF holds the tokenizer and config; nothing is fetched.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sidecar.training import _trl  # imports torch only when the import starts

    started = time.monotonic()
    try:
        info = _trl.import_gguf(Path(args.file), Path(args.out))
    except (FileExistsError, FileNotFoundError) as exc:
        print(f"model: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ModuleNotFoundError as exc:
        print(f"model: the trl extra is not installed ({exc}); see make trl-env", file=sys.stderr)
        return EXIT_NO_TORCH
    print(
        json.dumps(
            {
                **info,
                "out": str(Path(args.out).resolve()),
                "wall_seconds": round(time.monotonic() - started, 1),
            }
        )
    )
    return 0


def register(commands: dict[str, Any]) -> None:
    commands["train"] = (setup_train, run_train)
    commands["model"] = (setup_model, run_model)
