#!/usr/bin/env bash
# Builds tidb-server from its Go module through a wrapper module and caches the binary under
# $HOME/.cache/tiproxy-rs/tidb-<version>/bin/tidb-server. Prints the binary's path.
# Recipe: shared/reference/tidb-protocol.md B.3.
#
# The version is a release-8.5 commit of 2025-11-26 (e4e814fdc0af): the Go module proxy reachable
# here serves that pseudo-version of github.com/pingcap/tidb but not the v8.5.3 tag commit, and
# release-8.5 of late 2025 still starts under Go 1.26 (the 2026 patches panic in pkg/util/hack).
set -euo pipefail

TIDB_VERSION="${TIDB_VERSION:-v8.5-e4e814fdc0af}"
case "$TIDB_VERSION" in
  v8.5-e4e814fdc0af) COMMIT=e4e814fdc0afe9c3a6e5e96f129d83df802ab820; STAMP=20251126154744 ;;
  *) echo "build-tidb.sh: unsupported TIDB_VERSION $TIDB_VERSION (supported: v8.5-e4e814fdc0af)" >&2; exit 2 ;;
esac
export GOTOOLCHAIN=local

CACHE="${TIPROXY_CACHE:-$HOME/.cache/tiproxy-rs}/tidb-$TIDB_VERSION"
BIN="$CACHE/bin/tidb-server"
if [[ -x "$BIN" ]] && "$BIN" -V >/dev/null 2>&1; then
  echo "$BIN"
  exit 0
fi

# shellcheck source=/dev/null
source "$(dirname "$0")/go-env.sh"
mkdir -p "$CACHE"
cd "$CACHE"
SHORT=${COMMIT:0:12}
cat > go.mod <<GOMOD
module local.test/tidbserver

go 1.26

require (
	github.com/pingcap/tidb v1.1.0-beta.0.$STAMP-$SHORT
	github.com/pingcap/tidb/pkg/parser v0.0.0-$STAMP-$SHORT
)

replace (
	github.com/go-ldap/ldap/v3 => github.com/YangKeao/ldap/v3 v3.4.5-0.20230421065457-369a3bab1117
	sourcegraph.com/sourcegraph/appdash => github.com/sourcegraph/appdash v0.0.0-20190731080439-ebfcffb1b5c0
	sourcegraph.com/sourcegraph/appdash-data => github.com/sourcegraph/appdash-data v0.0.0-20151005221446-73f23eafcf67
)

tool github.com/pingcap/tidb/cmd/tidb-server
GOMOD
echo "build-tidb.sh: resolving modules for TiDB $TIDB_VERSION" >&2
go mod tidy >&2
echo "build-tidb.sh: building tidb-server (several minutes on 2 cores)" >&2
go build -tags codes -trimpath \
  -ldflags "-X github.com/pingcap/tidb/pkg/parser/mysql.TiDBReleaseVersion=$TIDB_VERSION
            -X github.com/pingcap/tidb/pkg/util/versioninfo.TiDBGitHash=$COMMIT
            -X github.com/pingcap/tidb/pkg/util/versioninfo.TiDBEdition=Community" \
  -o bin/tidb-server.tmp github.com/pingcap/tidb/cmd/tidb-server >&2
mv bin/tidb-server.tmp "$BIN"
"$BIN" -V >&2
echo "$BIN"
