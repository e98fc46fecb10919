#!/usr/bin/env bash
# Vendors the dashboard's chart library, uPlot (MIT, ~50 KB), at a pinned
# version into the package's static folder. The output is committed, so
# building and testing need no npm; rerun this only to change the version.
set -euo pipefail
VERSION="${UPLOT_VERSION:-1.6.32}"
DEST="$(cd "$(dirname "$0")/.." && pwd)/sidecar/web/static/vendor/uplot"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
npm pack --silent "uplot@${VERSION}" >/dev/null
tar -xzf "uplot-${VERSION}.tgz"
mkdir -p "$DEST"
cp package/dist/uPlot.iife.min.js package/dist/uPlot.min.css package/LICENSE "$DEST/"
echo "uplot ${VERSION} (npm), sha256 of the tarball: $(sha256sum "uplot-${VERSION}.tgz" | cut -d' ' -f1)" > "$DEST/VERSION"
echo "vendored uplot ${VERSION} into ${DEST}"
