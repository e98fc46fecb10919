#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kube-scheduler and kubelet
# of one Kubernetes release, and a static pause binary, into the cache
# (outside the clone), for make deploy-test. Nothing here needs a container
# registry: the sources come through the Go module proxy.
#
# `go install k8s.io/kubernetes/cmd/...` refuses the module's replace
# directives (./staging/...), so a wrapper module requires k8s.io/kubernetes
# and maps each staging replace to the published k8s.io/<name> v0.<minor>.<patch>.
#
# Prints the folder holding bin/. Reuses it when its stamp names the same
# release and the same Go.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.36.3}
cache=${ATLAS_SIDECAR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/atlas-sidecar}/kubernetes-$K8S_VERSION
stamp="$K8S_VERSION $(go env GOVERSION)"
if [ -f "$cache/stamp" ] && [ "$(cat "$cache/stamp")" = "$stamp" ]; then
  echo "$cache"
  exit 0
fi

rm -rf "$cache"
mkdir -p "$cache/mod" "$cache/bin"
cd "$cache/mod"

minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
patch=${K8S_VERSION##*.}
staging=v0.$minor.$patch
modfile=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p')
moddir=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')

go mod init atlas-sidecar.invalid/kubernetes-build >/dev/null 2>&1
go mod edit -require="k8s.io/kubernetes@$K8S_VERSION"
sed -n 's#^\s*\(k8s.io/[a-z0-9.-]*\) => ./staging/src/.*#\1#p' "$modfile" | while read -r name; do
  go mod edit -replace="$name=$name@$staging"
done

cmds=(kube-apiserver kube-controller-manager kube-scheduler kubelet)
for c in "${cmds[@]}"; do
  go get -tool "k8s.io/kubernetes/cmd/$c@$K8S_VERSION" >&2
done

# Without these the servers report v0.0.0-master, which kubectl cannot parse.
pkg=k8s.io/component-base/version
ldflags="-s -w -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
ldflags="$ldflags -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
targets=()
for c in "${cmds[@]}"; do targets+=("k8s.io/kubernetes/cmd/$c"); done
go build -trimpath -ldflags "$ldflags" -o "$cache/bin/" "${targets[@]}" >&2

# The pod sandbox's process: the release's own pause.c, static.
gcc -Os -static -o "$cache/bin/pause" "$moddir/build/pause/linux/pause.c" >&2
strip "$cache/bin/pause"

echo "$stamp" >"$cache/stamp"
echo "$cache"
