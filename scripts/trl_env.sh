#!/usr/bin/env bash
# Build the training venv once into a cache outside the clone: torch, transformers, TRL,
# peft and gguf at pinned versions, then the project itself (editable, with the `trl`
# extra) so `VENV/bin/atlas-sidecar train` runs. The trainer runs torch on the CPU, but
# the registry's torch wheel is the CUDA build and links the CUDA runtime libraries at
# import (libcudart, cublas, cudnn, nccl ...): without their nvidia-* wheels
# `import torch` fails, so they are installed (about 2.8 GB). Only triton, which torch
# imports lazily for compilation, is left out.
#
# Idempotent: the heavy part sits behind a stamp named after the pins; only the
# editable install of this clone is redone when the venv points at another clone.
#
# Usage: scripts/trl_env.sh [PYTHON]   (PYTHON creates the venv; default python3)
# Env:   ATLAS_SIDECAR_CACHE (default ~/.cache/atlas-sidecar)
# Prints the venv's python on the last line.
set -euo pipefail

# Keep in step with the `trl` extra in pyproject.toml.
TORCH=2.13.0
PINS=(transformers==5.24.0 trl==1.16.0 peft==0.21.2 accelerate==1.16.0 datasets==5.2.0 gguf==0.19.0)
# Never installed: torch's compiler backend (a GPU kernel compiler; never imported here).
SKIP='^(triton)$'

PYTHON="${1:-python3}"
CACHE="${ATLAS_SIDECAR_CACHE:-$HOME/.cache/atlas-sidecar}"
STAMP_ID="$(printf '%s\n' "torch==$TORCH" "${PINS[@]}" "skip=$SKIP" | sha256sum | cut -c1-10)"
DEST="$CACHE/trl-$STAMP_ID"
VENV="$DEST/venv"
REPO="$(cd "$(dirname "$0")/.." && pwd)"

say() { echo "trl-env: $*" >&2; }

# install_closure PY ARGS...: resolve ARGS with pip (dry run, nothing installed), drop
# the SKIP names, install the rest --no-deps. (pip's resolver follows the requirements
# of packages already installed, so a plain install would fetch them all the same.)
install_closure() {
    local py="$1"; shift
    local report; report="$(mktemp)"
    "$py" -m pip install -q --dry-run --ignore-installed --report "$report" "$@"
    local reqs; reqs="$(mktemp)"
    "$py" - "$report" "$SKIP" >"$reqs" <<'PY'
import json, re, sys
report, skip = json.load(open(sys.argv[1])), re.compile(sys.argv[2])
for item in report["install"]:
    meta = item["metadata"]
    if skip.match(meta["name"].lower()):
        continue
    url = item["download_info"]["url"]
    if url.startswith("file:") and item.get("is_direct"):
        print(("-e " if item["download_info"].get("dir_info", {}).get("editable") else "") + url[len("file://"):])
    else:
        print(f"{meta['name']}=={meta['version']}")
PY
    "$py" -m pip install -q --progress-bar off --no-deps -r "$reqs"
    rm -f "$report" "$reqs"
}

if [ ! -f "$DEST/.installed" ]; then
    start=$(date +%s)
    mkdir -p "$CACHE"
    # Built in a sibling folder and renamed at the end: an interrupted run leaves no
    # half-filled venv behind the stamp. (A venv's scripts name its path, so it is
    # created at its final path inside the stage and the stage is renamed as a whole.)
    rm -rf "$DEST.part"
    mkdir -p "$DEST.part"
    trap 'rm -rf "$DEST.part"' EXIT
    say "[1/4] venv at $DEST (building in $DEST.part)"
    "$PYTHON" -m venv "$DEST.part/venv"
    P="$DEST.part/venv/bin/python"
    "$P" -m pip install -q -U pip
    say "[2/4] resolving torch==$TORCH ${PINS[*]} (torch's wheel is about 900 MB)"
    say "[3/4] installing them (with the CUDA runtime wheels torch links, not triton)"
    install_closure "$P" "torch==$TORCH" "${PINS[@]}"
    say "[4/4] checking that the torch stack imports and trains on CPU"
    "$P" -c 'import torch, transformers, trl, peft; x = torch.ones(2, requires_grad=True); (x * 2).sum().backward(); assert x.grad is not None; print("torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__, "peft", peft.__version__)' >&2
    touch "$DEST.part/.installed"
    trap - EXIT
    if [ -e "$DEST" ]; then rm -rf "$DEST"; fi
    mv "$DEST.part" "$DEST"
    # The venv was made under DEST.part: repoint its scripts and config at DEST.
    grep -rlI --null "$DEST.part" "$VENV" | xargs -0 -r sed -i "s#$DEST.part#$DEST#g"
    say "built in $(( $(date +%s) - start )) s, $(du -sh "$DEST" | cut -f1)"
else
    say "cached at $DEST"
fi

# The project, editable, without re-resolving the pinned stack.
if [ "$(cat "$DEST/.repo" 2>/dev/null)" != "$REPO" ]; then
    say "installing $REPO (editable) into the venv"
    install_closure "$VENV/bin/python" -e "$REPO/clients/python" -e "$REPO[trl]"
    echo "$REPO" > "$DEST/.repo"
fi
echo "$VENV/bin/python"
