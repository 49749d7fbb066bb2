#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager and etcd from the Go modules pinned in
# go.mod/go.sum into a cache outside the repository, keyed by the hash of go.sum and of
# this script, and
# prints the folder holding the three binaries. A second run builds nothing.
# KUBEBUILDER_ASSETS, when set, names a ready folder and skips the build entirely.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bins=(kube-apiserver kube-controller-manager etcd)

if [ -n "${KUBEBUILDER_ASSETS:-}" ]; then
  for b in "${bins[@]}"; do
    [ -x "$KUBEBUILDER_ASSETS/$b" ] || { echo "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS has no executable $b" >&2; exit 1; }
  done
  echo "$KUBEBUILDER_ASSETS"
  exit 0
fi

command -v go >/dev/null || { echo "Go is needed to build the test control plane (https://go.dev/doc/install)" >&2; exit 1; }
key=$(cat "$here/go.sum" "$here/build.sh" "$here/cmd/etcd/main.go" | sha256sum | cut -c1-16)
out="${TXMAIL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/txmail}/control-plane/$key"
if [ -x "$out/kube-apiserver" ] && [ -x "$out/kube-controller-manager" ] && [ -x "$out/etcd" ]; then
  echo "$out"
  exit 0
fi

mkdir -p "$out.tmp"
start=$(date +%s)
echo "building the test control plane into $out (first run only; see docs/development.md)" >&2
cd "$here"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=readonly
k8s=$(go list -m -f '{{.Version}}' k8s.io/kubernetes)
v=k8s.io/component-base/version
ldflags="-s -X $v.gitVersion=$k8s -X $v.gitMajor=1 -X $v.gitMinor=$(echo "$k8s" | cut -d. -f2)"
go build -trimpath -ldflags="$ldflags" -o "$out.tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver >&2
go build -trimpath -ldflags="$ldflags" -o "$out.tmp/kube-controller-manager" k8s.io/kubernetes/cmd/kube-controller-manager >&2
go build -trimpath -ldflags=-s -o "$out.tmp/etcd" ./cmd/etcd >&2
rm -rf "$out" && mv "$out.tmp" "$out"
echo "built the test control plane in $(( $(date +%s) - start )) s" >&2
echo "$out"
