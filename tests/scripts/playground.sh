#!/usr/bin/env bash
# A local playground like `tiup playground` + `tiup tiproxy`: N real TiDB servers (default 2,
# sharing one session-token signing cert) behind one tiproxy.
#
#   playground.sh [up] [--tidb N]   build what is missing, start everything, print how to connect
#   playground.sh scale-out         start one more TiDB and add it to the proxy
#   playground.sh scale-in [i]      gracefully stop TiDB i (default: the newest); its sessions move
#   playground.sh status            backends as the proxy sees them, with their sessions
#   playground.sh down              stop the proxy and every TiDB
#
# The proxy learns its backends from the playground through PUT /api/v1/backends, the same API
# the Kubernetes operator uses.
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
  cat > "$DIR/proxy.toml" <<TOML
# Written by tests/scripts/playground.sh; backends are pushed to the API.
[proxy]
addr = "$PROXY_ADDR"
graceful-wait-before-shutdown = 0

[api]
addr = "$API_ADDR"

[health]
interval = 1.0

[log]
level = "info"
TOML
}

# Instance numbers of the running TiDB servers.
running_tidbs() {
  local f
  for f in "$DIR"/tidb/tidb-*.pid; do
    [[ -e $f ]] || continue
    f=${f##*/tidb-}; f=${f%.pid}
    kill -0 "$(cat "$DIR/tidb/tidb-$f.pid")" 2>/dev/null && echo "$f"
  done | sort -n
}

# Pushes the running TiDB servers to the proxy (generation = time in ms, always rising).
push_backends() {
  local list="" i
  for i in $(running_tidbs); do
    list+="${list:+,}{\"addr\":\"127.0.0.$((10 + i)):4000\",\"status-addr\":\"127.0.0.$((10 + i)):10080\"}"
  done
  curl -fsS -X PUT "http://$API_ADDR/api/v1/backends" \
    -d "{\"generation\":$(date +%s%3N),\"backends\":[$list]}" > /dev/null
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
  write_proxy_config
  "$ROOT/target/release/tiproxy" --config "$DIR/proxy.toml" > "$DIR/proxy.log" 2>&1 &
  echo $! > "$DIR/proxy.pid"
  for _ in $(seq 50); do
    grep -q "tiproxy started" "$DIR/proxy.log" && break
    kill -0 "$(cat "$DIR/proxy.pid")" 2>/dev/null || { cat "$DIR/proxy.log" >&2; down >&2; die "tiproxy exited"; }
    sleep 0.1
  done
  grep -q "tiproxy started" "$DIR/proxy.log" || { down >&2; die "tiproxy did not start; see $DIR/proxy.log"; }
  push_backends
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

scale_out() {
  [[ -n "$(proxy_pid || true)" ]] || die "not running (playground.sh up first)"
  local last next
  last=$(running_tidbs | tail -1)
  next=$(( ${last:-$((FIRST - 1))} + 1 ))
  bash "$SCRIPTS/tidb.sh" start 1 --first "$next" --dir "$DIR/tidb"
  push_backends
  echo "playground: TiDB $next added; sessions rebalance onto it"
}

scale_in() {
  [[ -n "$(proxy_pid || true)" ]] || die "not running (playground.sh up first)"
  local victim=${1:-$(running_tidbs | tail -1)}
  [[ -n "$victim" ]] || die "no TiDB running"
  [[ $(running_tidbs | wc -l) -gt 1 ]] || die "refusing to stop the last TiDB"
  echo "playground: stopping TiDB $victim gracefully; the proxy moves its sessions while it drains" >&2
  bash "$SCRIPTS/tidb.sh" stop "$victim" --graceful --dir "$DIR/tidb"
  push_backends
  echo "playground: TiDB $victim removed"
}

# Formats GET /api/v1/backends for people.
STATUS_PY='
import json, sys
view = json.load(sys.stdin)
for b in view["backends"]:
    h = b["health"]
    health = h["state"] + (": " + h["reason"] if "reason" in h else "")
    print("%-22s %-9s sessions=%-4d %s" % (b["addr"], b["state"], b["sessions"], health))
    for s in b["blocked-sessions"]:
        print("    session %d cannot move: %s" % (s["id"], s["reason"]))
'

status() {
  if [[ -z "$(proxy_pid || true)" ]]; then
    echo "tiproxy stopped"
  else
    echo "tiproxy pid=$(proxy_pid) addr=$PROXY_ADDR api=$API_ADDR"
    curl -fsS "http://$API_ADDR/api/v1/backends" | python3 -c "$STATUS_PY"
  fi
}


cmd=${1:-up}
[[ $# -gt 0 ]] && shift
case $cmd in
  up) up "$@" ;;
  scale-out) scale_out ;;
  scale-in) scale_in "$@" ;;
  down) down ;;
  status) status ;;
  -h|--help|help) sed -n '2,14p' "$0" ;;
  *) die "unknown command $cmd (up, scale-out, scale-in, status, down)" ;;
esac
