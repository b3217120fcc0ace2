#!/usr/bin/env bash
# Builds a Go program the operator tests need from its Go module and caches the binary under
# $TIPROXY_CACHE (default $HOME/.cache/tiproxy-rs), keyed by version. Prints the binary's path.
#
#   build-go-tool.sh kube-apiserver   # k8s.io/kubernetes/cmd/kube-apiserver (v1.36.2)
#   build-go-tool.sh helm             # helm.sh/helm/v3/cmd/helm (v3.21.4)
#   build-go-tool.sh etcd             # go.etcd.io/etcd/server/v3 (v3.6.14; kube-apiserver needs >= 3.5)
#
# Recipes: shared/reference/tidb-protocol.md B.5-B.7.
set -euo pipefail

TOOL=${1:?usage: build-go-tool.sh kube-apiserver|helm|etcd}
CACHE_ROOT="${TIPROXY_CACHE:-$HOME/.cache/tiproxy-rs}"
K8S_VERSION=1.36.2
HELM_VERSION=3.21.4
ETCD_VERSION=3.6.14

case $TOOL in
  kube-apiserver) VERSION=$K8S_VERSION ;;
  helm) VERSION=$HELM_VERSION ;;
  etcd) VERSION=$ETCD_VERSION ;;
  *) echo "build-go-tool.sh: unknown tool $TOOL" >&2; exit 2 ;;
esac
DIR="$CACHE_ROOT/$TOOL-v$VERSION"
BIN="$DIR/bin/$TOOL"
if [[ -x "$BIN" ]]; then
  echo "$BIN"
  exit 0
fi

# Reuse build-tidb.sh's Go bootstrap (fetches Go from the module proxy when missing).
# shellcheck source=/dev/null
source "$(dirname "$0")/go-env.sh"
export GOTOOLCHAIN=local CGO_ENABLED=0
mkdir -p "$DIR"
cd "$DIR"
rm -f go.mod go.sum
go mod init local.test/"$TOOL" >&2
echo "build-go-tool.sh: building $TOOL v$VERSION (cached in $DIR)" >&2
case $TOOL in
  kube-apiserver)
    S="v0.${VERSION#1.}"
    MINOR=$(echo "$VERSION" | cut -d. -f2)
    M=$(go mod download -json "k8s.io/kubernetes@v$VERSION" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')
    awk -v s="$S" '$2=="=>" && $3 ~ /^\.\/staging\/src\// {print "replace " $1 " => " $1 " " s}' "$M" >> go.mod
    go get "k8s.io/kubernetes@v$VERSION" >&2
    go get -tool "k8s.io/kubernetes/cmd/kube-apiserver@v$VERSION" >&2
    go mod tidy >&2
    go build -trimpath -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=v$VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$MINOR" \
      -o bin/kube-apiserver.tmp k8s.io/kubernetes/cmd/kube-apiserver >&2
    ;;
  helm)
    go get -tool "helm.sh/helm/v3/cmd/helm@v$VERSION" >&2
    go mod tidy >&2
    MINOR=$(echo "$K8S_VERSION" | cut -d. -f2)
    go build -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=v$VERSION -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$MINOR -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$MINOR" \
      -o bin/helm.tmp helm.sh/helm/v3/cmd/helm >&2
    ;;
  etcd)
    go get -tool "go.etcd.io/etcd/server/v3@v$VERSION" >&2
    go mod tidy >&2
    go build -trimpath -ldflags "-s -w" -o bin/etcd.tmp go.etcd.io/etcd/server/v3 >&2
    ;;
esac
mv "bin/$TOOL.tmp" "$BIN"
echo "$BIN"
