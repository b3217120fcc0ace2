#!/usr/bin/env bash
# A local playground like `tiup playground` + `tiup tiproxy`: N real TiDB servers (default 2,
# sharing one session-token signing cert) behind one tiproxy.
#
#   playground.sh [up] [--tidb N]   build what is missing, start everything, print how to connect
#   playground.sh down              stop the proxy and every TiDB
#   playground.sh status            show what is running
#
# State lives in ./.playground (ignored by git).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DIR="${PLAYGROUND_DIR:-$ROOT/.playground}"
SCRIPTS="$ROOT/tests/scripts"
PROXY_ADDR="${PLAYGROUND_PROXY_ADDR:-127.0.0.1:6000}"
API_ADDR="${PLAYGROUND_API_ADDR:-127.0.0.1:3080}"
# TiDB instance numbers start here (instance i listens on 127.0.0.(10+i)), away from the
# instances the test suite uses, so both can run at once.
FIRST=21

die() { echo "playground: $*" >&2; exit 1; }

proxy_pid() { [[ -f "$DIR/proxy.pid" ]] && kill -0 "$(cat "$DIR/proxy.pid")" 2>/dev/null && cat "$DIR/proxy.pid"; }

write_proxy_config() {
  local n=$1 backends="" i
  for ((i = FIRST; i < FIRST + n; i++)); do
    backends+="${backends:+, }{ addr = \"127.0.0.$((10 + i)):4000\", status-addr = \"127.0.0.$((10 + i)):10080\" }"
  done
  cat > "$DIR/proxy.toml" <<TOML
# Written by tests/scripts/playground.sh
[proxy]
addr = "$PROXY_ADDR"
backends = [$backends]
graceful-wait-before-shutdown = 0

[api]
addr = "$API_ADDR"

[log]
level = "info"
TOML
}

up() {
  local n=2
  while [[ $# -gt 0 ]]; do
    case $1 in
      --tidb) n=$2; shift 2 ;;
      *) die "unknown option $1" ;;
    esac
  done
  [[ -z "$(proxy_pid || true)" ]] || die "already running (playground.sh down first)"
  mkdir -p "$DIR"
  echo "playground: building tiproxy (release)" >&2
  (cd "$ROOT" && cargo build --release -p tiproxy -q)
  echo "playground: building/locating tidb-server (first build takes several minutes)" >&2
  bash "$SCRIPTS/build-tidb.sh" > /dev/null
  bash "$SCRIPTS/tidb.sh" start "$n" --first "$FIRST" --dir "$DIR/tidb"
  trap 'echo "playground: start failed, stopping what was started" >&2; down >&2' ERR
  write_proxy_config "$n"
  "$ROOT/target/release/tiproxy" --config "$DIR/proxy.toml" > "$DIR/proxy.log" 2>&1 &
  echo $! > "$DIR/proxy.pid"
  for _ in $(seq 50); do
    grep -q "tiproxy started" "$DIR/proxy.log" && break
    kill -0 "$(cat "$DIR/proxy.pid")" 2>/dev/null || { cat "$DIR/proxy.log" >&2; down >&2; die "tiproxy exited"; }
    sleep 0.1
  done
  grep -q "tiproxy started" "$DIR/proxy.log" || { down >&2; die "tiproxy did not start; see $DIR/proxy.log"; }
  trap - ERR
  cat <<MSG

Playground is up: $n TiDB servers behind tiproxy.
  Connect:   mysql --comments -h ${PROXY_ADDR%:*} -P ${PROXY_ADDR##*:} -u root
  Metrics:   curl http://$API_ADDR/metrics
  Logs:      $DIR/proxy.log, $DIR/tidb/*.log
  Stop:      bash tests/scripts/playground.sh down
MSG
}

down() {
  local pid
  if pid=$(proxy_pid); then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$DIR/proxy.pid"
  [[ -d "$DIR/tidb" ]] && bash "$SCRIPTS/tidb.sh" stop --dir "$DIR/tidb" || true
  echo "playground: stopped"
}

status() {
  if pid=$(proxy_pid); then echo "tiproxy pid=$pid addr=$PROXY_ADDR api=$API_ADDR"; else echo "tiproxy stopped"; fi
  [[ -d "$DIR/tidb" ]] && bash "$SCRIPTS/tidb.sh" status --dir "$DIR/tidb" || true
}

cmd=${1:-up}
[[ $# -gt 0 ]] && shift
case $cmd in
  up) up "$@" ;;
  down) down ;;
  status) status ;;
  -h|--help|help) sed -n '2,10p' "$0" ;;
  *) die "unknown command $cmd (up, down, status)" ;;
esac
