#!/usr/bin/env bash
# Builds the Kubernetes parts the tests run, from the Go modules pinned in go.mod/go.sum (and
# helm/go.mod for Helm), into a cache outside the repository keyed by the hash of those files
# and of this script, and prints the folder holding the binaries. A second run builds nothing.
#   control plane: kube-apiserver, kube-controller-manager, etcd
#   node tier:     kubelet, kube-scheduler, kube-proxy, pause (the pod sandbox, from the
#                  k8s.io/kubernetes module's own pause.c: no registry has a pause image here)
#   chart tier:    helm
# KUBEBUILDER_ASSETS, when set, names a ready folder and skips the build entirely.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bins=(kube-apiserver kube-controller-manager etcd kubelet kube-scheduler kube-proxy pause helm)

if [ -n "${KUBEBUILDER_ASSETS:-}" ]; then
  for b in "${bins[@]}"; do
    [ -x "$KUBEBUILDER_ASSETS/$b" ] || { echo "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS has no executable $b" >&2; exit 1; }
  done
  echo "$KUBEBUILDER_ASSETS"
  exit 0
fi

command -v go >/dev/null || { echo "Go is needed to build the test control plane (https://go.dev/doc/install)" >&2; exit 1; }
key=$(cat "$here/go.sum" "$here/helm/go.sum" "$here/build.sh" "$here/cmd/etcd/main.go" | sha256sum | cut -c1-16)
out="${TXMAIL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/txmail}/control-plane/$key"
complete=1
for b in "${bins[@]}"; do [ -x "$out/$b" ] || complete=0; done
if [ $complete = 1 ]; then
  echo "$out"
  exit 0
fi

mkdir -p "$out.tmp"
start=$(date +%s)
echo "building the test control plane, node and Helm into $out (first run only; see docs/development.md)" >&2
cd "$here"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=readonly
k8s=$(go list -m -f '{{.Version}}' k8s.io/kubernetes)
v=k8s.io/component-base/version
ldflags="-s -X $v.gitVersion=$k8s -X $v.gitMajor=1 -X $v.gitMinor=$(echo "$k8s" | cut -d. -f2)"
go build -trimpath -ldflags="$ldflags" -o "$out.tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver >&2
go build -trimpath -ldflags="$ldflags" -o "$out.tmp/kube-controller-manager" k8s.io/kubernetes/cmd/kube-controller-manager >&2
go build -trimpath -ldflags=-s -o "$out.tmp/etcd" ./cmd/etcd >&2
for c in kubelet kube-scheduler kube-proxy; do
  go build -trimpath -ldflags="$ldflags" -o "$out.tmp/$c" "k8s.io/kubernetes/cmd/$c" >&2
done
# The pause binary is static C: it is the only process of the pod sandbox image.
command -v gcc >/dev/null || { echo "gcc and libc6-dev are needed to build the pause binary (make debs)" >&2; exit 1; }
kdir=$(go list -m -f '{{.Dir}}' k8s.io/kubernetes)
gcc -Os -static -Wall -DVERSION="$k8s-txmail" -o "$out.tmp/pause" "$kdir/build/pause/linux/pause.c" >&2
strip "$out.tmp/pause"
helmv=$(cd helm && go list -m -f '{{.Version}}' helm.sh/helm/v3)
(cd helm && go build -trimpath -ldflags="-s -X helm.sh/helm/v3/internal/version.version=$helmv" \
  -o "$out.tmp/helm" helm.sh/helm/v3/cmd/helm) >&2
rm -rf "$out" && mv "$out.tmp" "$out"
echo "built the test control plane in $(( $(date +%s) - start )) s" >&2
echo "$out"
