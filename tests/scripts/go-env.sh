# shellcheck shell=bash
# Sourced by the build scripts: puts a Go >= 1.24 toolchain on PATH.
# Go >= 1.24 is needed (wrapper module with a `tool` line). When the machine has none, fetch the
# official toolchain from the Go module proxy, where it is published as golang.org/toolchain.
go_ok() { command -v go >/dev/null && go version | grep -qE 'go1\.(2[4-9]|[3-9][0-9])'; }
if ! go_ok; then
  GO_VERSION=1.26.8
  GOROOT_DIR="${TIPROXY_CACHE:-$HOME/.cache/tiproxy-rs}/go-$GO_VERSION"
  if [[ ! -x "$GOROOT_DIR/go/bin/go" ]]; then
    echo "build-tidb.sh: fetching Go $GO_VERSION from the module proxy" >&2
    mkdir -p "$GOROOT_DIR"
    curl -fsSL -o "$GOROOT_DIR/go.zip" \
      "https://proxy.golang.org/golang.org/toolchain/@v/v0.0.1-go$GO_VERSION.linux-amd64.zip"
    python3 -m zipfile -e "$GOROOT_DIR/go.zip" "$GOROOT_DIR/x"
    mv "$GOROOT_DIR/x/golang.org/toolchain@v0.0.1-go$GO_VERSION.linux-amd64" "$GOROOT_DIR/go"
    chmod +x "$GOROOT_DIR"/go/bin/* "$GOROOT_DIR"/go/pkg/tool/*/*
    rm -rf "$GOROOT_DIR/go.zip" "$GOROOT_DIR/x"
  fi
  export PATH="$GOROOT_DIR/go/bin:$PATH"
  go_ok || { echo "build-tidb.sh: no usable Go toolchain" >&2; exit 1; }
fi

# The Go module and build caches are only needed while a tool builds: its binary is cached by
# version and never rebuilt. Left in place they keep ~8 GiB (TiDB, kube-apiserver) of the disk
# that the tests need next, so each build gets its own caches and removes them when it ends
# (module cache files are read-only unless built with -modcacherw).
GO_SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/tiproxy-go.XXXXXX")
trap 'rm -rf "$GO_SCRATCH"' EXIT
export GOCACHE="$GO_SCRATCH/build" GOMODCACHE="$GO_SCRATCH/mod" GOFLAGS="-modcacherw"
