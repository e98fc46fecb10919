#!/usr/bin/env bash
# The compiled ingest path (sidecar/_fastpath.c) under AddressSanitizer and
# UndefinedBehaviorSanitizer: builds it with -fsanitize=address,undefined into
# a scratch folder, loads it as sidecar._fastpath and runs the decoder's property tests (the C
# path against upb + EventValidator, random and mutated batches) and the
# real-gRPC decoder tests against it, with EXAMPLES_SCALE times the examples.
# Any memory error or undefined behaviour aborts the run. Not part of
# `make test` (a few minutes); run it after changing _fastpath.c.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SCALE=${EXAMPLES_SCALE:-5}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
inc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
ext=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
gcc -shared -fPIC -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined \
    -fno-sanitize-recover=undefined -Wall -Wextra -Wno-missing-field-initializers \
    -I"$inc" sidecar/_fastpath.c -o "$work/_fastpath$ext"
asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
echo "sanitize: ASan + UBSan build in $work, examples x$SCALE"
# Python's own allocations are not leaks worth reporting here.
LD_PRELOAD="$asan:$ubsan" \
    ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ATLAS_SIDECAR_EXAMPLES_SCALE="$SCALE" \
    "$PY" -c '
import importlib.util, sys
import pytest
import sidecar
# the sanitized build stands in for the installed one before anything imports it
spec = importlib.util.spec_from_file_location("sidecar._fastpath", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
sys.modules["sidecar._fastpath"] = sidecar._fastpath = mod
from sidecar import _compiled
assert _compiled._fastpath is mod and _compiled.compiled_decoder() is not None
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider",
    "tests/unit/test_ingest_decode.py", "tests/integration/test_ingest_decoder.py"]))
' "$work/_fastpath$ext"
