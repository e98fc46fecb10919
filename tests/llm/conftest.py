"""The trainer's venv, the real model as a Hugging Face folder, and llama-server.

The venv comes from ``scripts/trl_env.sh`` (``make trl-env``; ``make test-llm`` passes
its python as ``$ATLAS_TRL_PYTHON``). The model import runs once and is cached beside
the GGUF it comes from.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.testing import llama_server_binary, smollm2_gguf

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def trl_python() -> Path:
    env = os.environ.get("ATLAS_TRL_PYTHON")
    if env:
        return Path(env)
    proc = subprocess.run(
        [str(REPO / "scripts" / "trl_env.sh"), sys.executable],
        capture_output=True,
        text=True,
        timeout=1800,
        check=True,
    )
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def trainer_bin(trl_python: Path) -> Path:
    """``atlas-sidecar`` as installed in the trainer's venv (this clone, editable)."""
    return trl_python.parent / "atlas-sidecar"


@pytest.fixture(scope="session")
def hf_base(trainer_bin: Path) -> Path:
    """SmolLM2 as a Hugging Face folder: ``atlas-sidecar model import-gguf``, cached."""
    gguf = smollm2_gguf()
    out = gguf.parent / "hf"
    if not (out / "config.json").exists():
        subprocess.run(
            [str(trainer_bin), "model", "import-gguf", str(gguf), "--out", str(out)],
            check=True,
            timeout=900,
        )
    return out


@pytest.fixture
def models_dir(tmp_path: Path, hf_base: Path) -> Path:
    """A models folder whose root version ``base`` is the imported model."""
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "base").symlink_to(hf_base, target_is_directory=True)
    return folder


@pytest.fixture(scope="session")
def llama_binary() -> Path:
    return llama_server_binary()


@pytest.fixture(scope="session")
def base_model() -> Path:
    return smollm2_gguf()
