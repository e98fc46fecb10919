#!/usr/bin/env bash
# Render, apply or delete an overlay of deploy/kubernetes against the current
# kubectl context (KUBECONFIG as usual). Called by make deploy-render, deploy
# and undeploy; see docs/deploy.md.
#
#   OVERLAY    an overlay under deploy/kubernetes/overlays (default simple), or a path
#   NAMESPACE  target namespace (default atlas-sidecar)
#   IMAGE      the sidecar image (default localhost/atlas-sidecar:<version>)
#   ATLAS      the atlas-sidecar command used to mint tokens (default .venv's)
#   ROLLOUT_TIMEOUT  how long apply waits for each rollout (default 300s)
#   KUBECTL    the kubectl to run (default kubectl; a wrapper, for a cluster in a
#              network namespace, as make deploy-test does)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/pyproject.toml")
OVERLAY=${OVERLAY:-simple}
NAMESPACE=${NAMESPACE:-atlas-sidecar}
IMAGE=${IMAGE:-localhost/atlas-sidecar:$version}
ATLAS=${ATLAS:-$root/.venv/bin/atlas-sidecar}
ROLLOUT_TIMEOUT=${ROLLOUT_TIMEOUT:-300s}
KUBECTL=${KUBECTL:-kubectl}

# A name under deploy/kubernetes/overlays, or a path to any kustomization.
case $OVERLAY in
  */*) overlay_dir=$(realpath "$OVERLAY") ;;
  *) overlay_dir=$root/deploy/kubernetes/overlays/$OVERLAY ;;
esac
[ -f "$overlay_dir/kustomization.yaml" ] || { echo "deploy: no overlay $OVERLAY (deploy/kubernetes/overlays or a path)" >&2; exit 2; }

# IMAGE as kustomize wants it: a name and a tag or a digest.
case $IMAGE in
  *@*) image_name=${IMAGE%@*}; image_field="digest: ${IMAGE#*@}" ;;
  *) last=${IMAGE##*/}
     if [[ $last == *:* ]]; then image_name=${IMAGE%:*}; image_field="newTag: \"${IMAGE##*:}\""
     else image_name=$IMAGE; image_field="newTag: latest"; fi ;;
esac

render() {
  local tmp rel
  tmp=$(mktemp -d)
  # kustomize takes relative paths only, so the wrapper points back at the overlay.
  rel=$(realpath --relative-to="$tmp" "$overlay_dir")
  cat >"$tmp/kustomization.yaml" <<YAML
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: $NAMESPACE
resources:
  - $rel
images:
  - name: atlas-sidecar
    newName: $image_name
    $image_field
YAML
  local rc=0
  "$KUBECTL" kustomize "$tmp" || rc=$?
  rm -rf "$tmp"
  return $rc
}

ensure_namespace() {
  if ! "$KUBECTL" get namespace "$NAMESPACE" >/dev/null 2>&1; then
    # A namespace made here enforces the restricted Pod Security profile; an
    # existing one is left as its owner set it.
    "$KUBECTL" create namespace "$NAMESPACE"
    "$KUBECTL" label namespace "$NAMESPACE" \
      pod-security.kubernetes.io/enforce=restricted pod-security.kubernetes.io/warn=restricted
  fi
}

ensure_secrets() {
  # Made once, never replaced: rotating is docs/security.md's procedure.
  if "$KUBECTL" -n "$NAMESPACE" get secret atlas-sidecar-tokens >/dev/null 2>&1; then
    return
  fi
  local dir
  dir=$(umask 077 && mktemp -d)
  trap 'rm -rf "$dir"; trap - RETURN' RETURN
  {
    echo "tokens:"
    "$ATLAS" token new --name in-pod-clients --role ingest --role server 2>"$dir/client.err" | sed 's/^/  /'
    "$ATLAS" token new --name operator --role operator --role read 2>"$dir/operator.err" | sed 's/^/  /'
  } >"$dir/tokens.yaml"
  for who in client operator; do
    sed -n 's/^token [^:]*: //p' "$dir/$who.err" | tr -d '\n' >"$dir/$who.token"
    [ -s "$dir/$who.token" ] || { echo "deploy: could not mint the $who token" >&2; cat "$dir/$who.err" >&2; exit 1; }
  done
  "$KUBECTL" -n "$NAMESPACE" create secret generic atlas-sidecar-tokens --from-file=tokens.yaml="$dir/tokens.yaml"
  "$KUBECTL" -n "$NAMESPACE" create secret generic atlas-sidecar-client-token --from-file=token="$dir/client.token"
  # Not mounted anywhere: for whoever runs atlas-sidecar status or rollout.
  "$KUBECTL" -n "$NAMESPACE" create secret generic atlas-sidecar-operator-token --from-file=token="$dir/operator.token"
}

apply() {
  ensure_namespace
  ensure_secrets
  local rendered names
  rendered=$(render)
  names=$(printf '%s\n' "$rendered" | "$KUBECTL" apply --server-side --field-manager=atlas-sidecar-deploy -n "$NAMESPACE" -o name -f -)
  printf '%s\n' "$names"
  for name in $names; do
    case $name in
      deployment.apps/*|statefulset.apps/*)
        "$KUBECTL" -n "$NAMESPACE" rollout status "$name" --timeout="$ROLLOUT_TIMEOUT" ;;
    esac
  done
}

delete() {
  # Workloads, config and Services go; the Secrets and any PVC of a
  # StatefulSet stay (they hold the tokens and the data): docs/deploy.md.
  render | "$KUBECTL" delete -n "$NAMESPACE" --ignore-not-found --wait=true -f -
}

case ${1:-} in
  render) render ;;
  apply) apply ;;
  delete) delete ;;
  *) echo "usage: $0 render|apply|delete" >&2; exit 2 ;;
esac
