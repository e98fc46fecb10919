#!/usr/bin/env bash
# make image: the OCI image $IMAGE (default localhost/atlas-sidecar:<version>),
# built with no container registry.
#
# 1. A Debian rootfs (python3, venv, CA certificates) made by mmdebstrap from
#    the Debian mirror this machine's apt already uses (read from
#    /etc/apt/sources.list*, or MIRROR=), cached outside the clone and keyed
#    by suite and package list, then `podman import`ed as the base.
# 2. Wheels of the project and every dependency built on the host
#    (`pip wheel`): inside a fresh rootfs the package index's TLS chain may not
#    verify, and the build has no network anyway.
# 3. `podman build --pull=never --network=none`: a venv installed from those
#    wheels only (`pip install --no-index`), a non-root user, the data dir a
#    VOLUME, `atlas-sidecar` the entrypoint.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/pyproject.toml")
IMAGE=${IMAGE:-localhost/atlas-sidecar:$version}
PY=${PY:-$root/.venv/bin/python}
# The suite's python3 must be the minor version the wheels are built for.
SUITE=${SUITE:-bookworm}
PACKAGES=python3,python3-venv,ca-certificates
cache=${ATLAS_SIDECAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/atlas-sidecar}
export CONTAINERS_CONF=$root/deploy/image/containers.conf

for tool in podman mmdebstrap; do
  command -v "$tool" >/dev/null || {
    echo "image: $tool is missing (Debian: apt-get install podman mmdebstrap)" >&2; exit 1; }
done

want=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
case $SUITE in
  bookworm) have=3.11 ;; trixie) have=3.13 ;; *) have=$want ;;
esac
if [ "$want" != "$have" ]; then
  echo "image: $SUITE has python $have, the wheels would be for $want: set SUITE= or PY=" >&2
  exit 1
fi

mirror() {
  # The first archive (not -security) that serves $SUITE, deb822 or one-line.
  python3 - "$SUITE" /etc/apt/sources.list /etc/apt/sources.list.d/* <<'PYEOF'
import pathlib, sys
suite, files = sys.argv[1], sys.argv[2:]
for name in files:
    p = pathlib.Path(name)
    if not p.is_file():
        continue
    text = p.read_text(errors="replace")
    if name.endswith(".sources"):
        for stanza in text.split("\n\n"):
            f = {}
            for line in stanza.splitlines():
                k, sep, v = line.partition(":")
                if sep and not line.startswith((" ", "#")):
                    f[k.strip()] = v.split()
            if "deb" in f.get("Types", []) and suite in f.get("Suites", []):
                print(f["URIs"][0]); sys.exit(0)
    elif name.endswith(".list"):
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            words = [w for w in words if not w.startswith("[")]
            if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                print(words[1]); sys.exit(0)
sys.exit("image: no Debian mirror for %s in /etc/apt/sources.list*: set MIRROR=" % suite)
PYEOF
}

# Reused when an image of that name was built from the same sources.
source_key=$(cd "$root" && git ls-files -z --cached --others --exclude-standard -- sidecar clients/python pyproject.toml deploy/image scripts/build_image.sh \
  | xargs -0 sha256sum | { cat; echo "$SUITE $PACKAGES $want"; } | sha256sum | cut -c1-16)
if [ "$(podman image inspect --format '{{index .Config.Labels "atlas-sidecar.source"}}' "$IMAGE" 2>/dev/null)" = "$source_key" ]; then
  echo "image: $IMAGE is up to date (sources $source_key)"
  exit 0
fi

key="$SUITE-$(printf '%s' "$PACKAGES" | sha256sum | cut -c1-12)"
base_tar=$cache/image-base-$key.tar
base_image=localhost/atlas-sidecar-base:$key
mkdir -p "$cache"
t0=$SECONDS
if [ ! -s "$base_tar" ]; then
  url=${MIRROR:-$(mirror)}
  echo "image: base rootfs $SUITE from the apt mirror of this machine"
  rm -rf "$base_tar.partial"
  mmdebstrap --quiet --variant=apt --format=tar --include="$PACKAGES" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    "$SUITE" "$base_tar.partial" "$url"
  mv "$base_tar.partial" "$base_tar"
fi
if ! podman image exists "$base_image"; then
  podman import --quiet "$base_tar" "$base_image" >/dev/null
fi
echo "image: base ready in $((SECONDS - t0)) s"

t1=$SECONDS
ctx=$root/build/image
rm -rf "$ctx"
mkdir -p "$ctx/wheels"
"$PY" -m pip wheel --quiet --wheel-dir "$ctx/wheels" "$root/clients/python" "$root"
echo "image: wheels built in $((SECONDS - t1)) s ($(ls "$ctx/wheels" | wc -l) files)"

t2=$SECONDS
# --no-cache: the wheels come through a bind mount, which the layer cache does not see.
podman build --quiet --pull=never --network=none --no-cache \
  --build-arg BASE="$base_image" --build-arg VERSION="$version" --label atlas-sidecar.source="$source_key" \
  -f "$root/deploy/image/Containerfile" -t "$IMAGE" "$ctx" >/dev/null
echo "image: $IMAGE built in $((SECONDS - t2)) s, $(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%d MB", $1/1e6}')"
