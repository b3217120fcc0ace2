#!/usr/bin/env bash
# Session migration against two real TiDB servers: how long the proxy takes to empty a TiDB,
# and how long a busy client is paused while its own session moves.
#
#   tests/bench/migration.sh [--sessions 1000,10000] [--clients K] [--round-trips M] [--quick] ...
#
# 1. Drain: N authenticated idle sessions, all on TiDB A. (a) Push A "draining" (B active) and
#    time until the proxy reports 0 sessions on A and N on B; then check every session with a
#    query that names its TiDB. (b) With everything on B, SIGTERM TiDB B (graceful wait) and time
#    until B is empty again. Repeated for each N.
# 2. Busy clients: K processes run a point select in a tight loop; sessions are pushed A -> B ->
#    A M times; per-query latency during migrations vs a baseline without them, the queries that
#    spanned their own session's move, and the proxy's tiproxy_balance_migrate_duration_seconds.
# Method and caveats: docs/benchmarks.md ("Session migration"). Every process started here
# (two TiDB servers, the proxy, the Python clients) is stopped on exit.
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BENCH="$ROOT/tests/bench"
TIDB_SH="$ROOT/tests/scripts/tidb.sh"
PROG=tests/bench/migration.sh
CMDLINE="$0"
for a in "$@"; do CMDLINE+=" $(printf '%q' "$a")"; done

usage() {
  cat <<EOF
Usage: $PROG [options]

  --sessions LIST     idle-session counts for the drain test, comma-separated (default
                      1000,10000; each lowered, with a warning, to what the fd limit allows)
  --clients LIST      busy client processes, comma-separated: one busy test per count
                      (default 1,8: one client alone, then 8 that saturate a 2-core machine)
  --round-trips M     busy test: A -> B -> A round trips per client count (default 150)
  --baseline S        busy test: seconds measured without migrations first (default 10)
  --dwell S           busy test: seconds between a completed move and the next push (default 0.5)
  --quick             smoke test: --sessions 200 --round-trips 5 --baseline 3 (explicit options win)
  --graceful-wait S   TiDB graceful-wait-before-shutdown for the SIGTERM test (default 30)
  --first K           TiDB instance numbers K and K+1 of tests/scripts/tidb.sh, i.e. SQL on
                      127.0.0.\$((10+K)):4000 and 127.0.0.\$((11+K)):4000 (default 71 -> .81, .82)
  --port P            proxy SQL port (default 6470); its HTTP API uses P+1
  --procs P           processes holding the idle sessions (default 4)
  --verify-sample S   sessions per drain also checked with information_schema.cluster_info
                      (default 100; every session is checked with a point select anyway)
  --dir DIR           work directory (default: a new /tmp/tiproxy-migration.XXXXXX); must not
                      exist or be empty. Removed at exit after a successful run unless --keep
  --keep              keep the work directory (TiDB and proxy logs, results.jsonl)
  --tiproxy BIN       tiproxy binary (default target/release/tiproxy, built if missing)
  --skip-drain / --skip-sigterm / --skip-busy   leave out a part
  -h, --help

Needs the TiDB binary of tests/scripts/build-tidb.sh (built on first use), python3, curl, a
mysql/mariadb client, openssl and ss. A full run takes roughly 5-10 minutes on 2 cores.
EOF
}

# shellcheck source-path=SCRIPTDIR source=../scripts/common.sh
source "$ROOT/tests/scripts/common.sh"

SESSIONS="" CLIENTS=1,8 ROUND_TRIPS="" BASELINE="" DWELL=0.5 QUICK=0 GRACEFUL_WAIT=30 FIRST=71
PORT=6470 PROCS=4 VERIFY_SAMPLE=100 WORK="" KEEP=0 TIPROXY=""
DO_DRAIN=1 DO_SIGTERM=1 DO_BUSY=1
need() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --sessions) need "$@"; SESSIONS=$2; shift 2 ;;
    --clients) need "$@"; CLIENTS=$2; shift 2 ;;
    --round-trips) need "$@"; ROUND_TRIPS=$2; shift 2 ;;
    --baseline) need "$@"; BASELINE=$2; shift 2 ;;
    --dwell) need "$@"; DWELL=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --graceful-wait) need "$@"; GRACEFUL_WAIT=$2; shift 2 ;;
    --first) need "$@"; FIRST=$2; shift 2 ;;
    --port) need "$@"; PORT=$2; shift 2 ;;
    --procs) need "$@"; PROCS=$2; shift 2 ;;
    --verify-sample) need "$@"; VERIFY_SAMPLE=$2; shift 2 ;;
    --dir) need "$@"; WORK=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --tiproxy) need "$@"; TIPROXY=$2; shift 2 ;;
    --skip-drain) DO_DRAIN=0; shift ;;
    --skip-sigterm) DO_SIGTERM=0; shift ;;
    --skip-busy) DO_BUSY=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
if (( QUICK )); then
  : "${SESSIONS:=200}" "${ROUND_TRIPS:=5}" "${BASELINE:=3}"
fi
: "${SESSIONS:=1000,10000}" "${ROUND_TRIPS:=150}" "${BASELINE:=10}"
for v in ROUND_TRIPS GRACEFUL_WAIT FIRST PORT PROCS; do
  [[ "${!v}" =~ ^[0-9]+$ && "${!v}" -gt 0 ]] || die "--${v,,} must be a positive integer, got '${!v}'"
done
[[ "$VERIFY_SAMPLE" =~ ^[0-9]+$ ]] || die "--verify-sample must be a non-negative integer"
for v in BASELINE DWELL; do
  [[ "${!v}" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--${v,,} must be a number of seconds, got '${!v}'"
done
[[ "$CLIENTS" =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || die "--clients must be a comma-separated list of positive counts, got '$CLIENTS'"
IFS=, read -r -a CLIENT_LIST <<<"$CLIENTS"
[[ "$SESSIONS" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--sessions must be a comma-separated list of counts, got '$SESSIONS'"
IFS=, read -r -a SESSION_LIST <<<"$SESSIONS"
for n in "${SESSION_LIST[@]}"; do (( n >= 1 )) || die "--sessions: counts must be at least 1"; done
(( FIRST + 1 <= 244 )) || die "--first must be at most 243"
(( PORT + 1 < 65536 )) || die "--port too large"
API_PORT=$((PORT + 1))
INST_A=$FIRST INST_B=$((FIRST + 1))
IP_A="127.0.0.$((10 + INST_A))" IP_B="127.0.0.$((10 + INST_B))"
A="$IP_A:4000" B="$IP_B:4000" A_STATUS="$IP_A:10080" B_STATUS="$IP_B:10080"

# ---- prerequisites ---------------------------------------------------------------------------
PYTHON=$(command -v python3) || die "python3 not found"
MYSQL=$(command -v mariadb || command -v mysql) || die "mysql/mariadb client not found (apt-get install mariadb-client)"
command -v curl >/dev/null || die "curl not found"
command -v ss >/dev/null || die "ss not found (apt-get install iproute2)"
command -v openssl >/dev/null || die "openssl not found"

# fds: each proxied session costs the proxy 2 (client + backend socket) and one more while it
# migrates (old and new backend socket). TiDB servers and helpers inherit this limit.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
# 1000 fds of head room: listeners, logs, and sessions in the middle of a migration
MAX_SESSIONS=$(( (NOFILE - 1000) / 2 ))
(( MAX_SESSIONS >= 1 )) || die "fd limit $NOFILE is too low"
CAPPED=()
for i in "${!SESSION_LIST[@]}"; do
  if (( SESSION_LIST[i] > MAX_SESSIONS )); then
    CAPPED+=("${SESSION_LIST[i]}->$MAX_SESSIONS")
    SESSION_LIST[i]=$MAX_SESSIONS
  fi
done

if [[ -z "$TIPROXY" ]]; then
  TIPROXY="$ROOT/target/release/tiproxy"
  if [[ ! -x "$TIPROXY" ]]; then
    log "building tiproxy (cargo build --release -p tiproxy)"
    (cd "$ROOT" && cargo build --release -p tiproxy) || die "cargo build --release -p tiproxy failed"
  fi
fi
[[ -x "$TIPROXY" ]] || die "tiproxy binary $TIPROXY not found or not executable"

for p in "$PORT" "$API_PORT"; do
  port_in_use "$p" && die "port $p is already in use; pick another with --port (uses P and P+1)"
done

# ---- work dir and cleanup --------------------------------------------------------------------
if [[ -z "$WORK" ]]; then
  WORK=$(mktemp -d /tmp/tiproxy-migration.XXXXXX)
else
  [[ ! -e "$WORK" || -z "$(ls -A "$WORK" 2>/dev/null)" ]] || die "--dir $WORK exists and is not empty"
  mkdir -p "$WORK"
  WORK=$(cd "$WORK" && pwd)
fi
TIDB_DIR="$WORK/tidb"
RESULTS="$WORK/results.jsonl"
PIDS=()          # processes started here (proxy, Python drivers)
TIDB_STARTED=0
OK=0

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_children "${PIDS[@]}"
  if (( TIDB_STARTED )); then
    bash "$TIDB_SH" stop --dir "$TIDB_DIR" >/dev/null 2>&1 \
      || log "warning: stopping the TiDB servers in $TIDB_DIR failed"
  fi
  if (( OK && ! KEEP )); then
    rm -rf "$WORK"
  else
    log "work directory kept: $WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM


# Run a Python driver in the background (so a signal to this script can stop it) and wait.
run_py() {
  local pid rc=0
  "$PYTHON" "$BENCH/migration_bench.py" "$@" &
  pid=$!
  PIDS+=("$pid")
  wait "$pid" || rc=$?
  local keep=() p
  for p in "${PIDS[@]}"; do [[ "$p" == "$pid" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
  return "$rc"
}

# The proxy binary is copied so that a rebuild of target/ during the run cannot change it.
cp "$TIPROXY" "$WORK/tiproxy"
TP_REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$ROOT" diff --quiet HEAD -- proxy 2>/dev/null || TP_REV+="+dirty"
STALE=$(find "$ROOT/proxy" -name '*.rs' -newer "$TIPROXY" 2>/dev/null | head -n 3 | tr '\n' ' ')

# ---- TiDB ------------------------------------------------------------------------------------
tidb_sql() {  # ip sql
  "$MYSQL" --no-defaults --connect-timeout=5 -h "$1" -P 4000 -u root --batch --skip-column-names -e "$2"
}
prepare_tidb() {  # ip: the one-row table naming the instance (each unistore TiDB is its own db)
  tidb_sql "$1" "CREATE DATABASE IF NOT EXISTS tiproxy_bench;
    CREATE TABLE IF NOT EXISTS tiproxy_bench.whoami (id INT PRIMARY KEY, name VARCHAR(64));
    REPLACE INTO tiproxy_bench.whoami VALUES (1, '$1:4000')" || die "preparing TiDB $1 failed"
}
start_tidb() {  # count first
  TIDB_STARTED=1
  bash "$TIDB_SH" start "$1" --first "$2" --dir "$TIDB_DIR" --graceful-wait "$GRACEFUL_WAIT" \
    >>"$WORK/tidb-start.log" 2>&1 || { tail -n 30 "$WORK/tidb-start.log" >&2; die "starting TiDB failed"; }
}
restart_b() {
  log "restarting TiDB $B"
  bash "$TIDB_SH" stop --dir "$TIDB_DIR" "$INST_B" >>"$WORK/tidb-start.log" 2>&1 || die "stopping TiDB $B failed"
  # a killed multi-threaded process can look gone a moment before its sockets are closed
  local i
  for ((i = 0; i < 100; i++)); do
    ss -Hltn 2>/dev/null | awk '{print $4}' | grep -qE "^$IP_B:(4000|10080)\$" || break
    sleep 0.1
  done
  start_tidb 1 "$INST_B"
  prepare_tidb "$IP_B"
}

log "starting TiDB $A and $B ($TIDB_DIR, graceful wait ${GRACEFUL_WAIT}s)"
start_tidb 2 "$INST_A"
prepare_tidb "$IP_A"
prepare_tidb "$IP_B"
TIDB_PID_A=$(cat "$TIDB_DIR/tidb-$INST_A.pid")
TIDB_VERSION=$(curl -s "http://$A_STATUS/status" | sed -n 's/.*"version":"\([^"]*\)".*/\1/p')
TIDB_MAXCONN=$(tidb_sql "$IP_A" "SELECT @@max_connections")
TIDB_NOFILE=$(awk '/Max open files/ {print $4 "/" $5}' "/proc/$TIDB_PID_A/limits")

# ---- proxy -----------------------------------------------------------------------------------
cat > "$WORK/tiproxy.toml" <<EOF
# written by tests/bench/migration.sh; backends are pushed through PUT /api/v1/backends
[proxy]
addr = "127.0.0.1:$PORT"

[api]
addr = "127.0.0.1:$API_PORT"

[health]
interval = 0.5

[log]
level = "info"
EOF
"$WORK/tiproxy" check-config "$WORK/tiproxy.toml" >/dev/null || die "tiproxy rejected $WORK/tiproxy.toml"
env -u RUST_LOG "$WORK/tiproxy" --config "$WORK/tiproxy.toml" >"$WORK/tiproxy.log" 2>&1 &
TP_PID=$!
PIDS+=("$TP_PID")
for ((i = 0; i < 200; i++)); do
  port_in_use "$API_PORT" && port_in_use "$PORT" && break
  alive "$TP_PID" || { tail -n 20 "$WORK/tiproxy.log" >&2; die "tiproxy exited during start-up"; }
  sleep 0.05
done
port_in_use "$PORT" || die "tiproxy is not listening on 127.0.0.1:$PORT after 10 s"

# ---- header ----------------------------------------------------------------------------------
echo "# command: $CMDLINE"
echo "# cwd: $PWD"
echo "# date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')  host: $(hostname)  kernel: $(uname -r)"
echo "# cpu: $(nproc) x $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)  load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# tiproxy: $("$WORK/tiproxy" --version 2>/dev/null | awk '{print $2}') ($TIPROXY, git $TP_REV, built $(date -u -r "$TIPROXY" '+%Y-%m-%d %H:%M UTC'))"
echo "# tidb: $TIDB_VERSION ($A, $B; unistore; graceful-wait-before-shutdown $GRACEFUL_WAIT s; max_connections $TIDB_MAXCONN; fd limit soft/hard $TIDB_NOFILE)"
echo "# proxy config: [health] interval = 0.5; everything else default ([balance] status-drain-seconds = 5, conn-count-ratio-threshold = 1.2; [health] timeout = 2)"
echo "# settings: sessions=$(IFS=,; echo "${SESSION_LIST[*]}") procs=$PROCS verify-sample=$VERIFY_SAMPLE clients=$CLIENTS round-trips=$ROUND_TRIPS baseline=${BASELINE}s dwell=${DWELL}s"
echo "# ports: proxy 127.0.0.1:$PORT, API 127.0.0.1:$API_PORT; fd limit (ulimit -n): $NOFILE (hard $(ulimit -Hn)); work dir: $WORK"
if (( ${#CAPPED[@]} )); then
  echo "# WARNING: the fd limit $NOFILE allows at most $MAX_SESSIONS sessions through one proxy (2 fds each + 1000 head room) and cannot be raised here: sessions ${CAPPED[*]}"
fi
if [[ -n "$STALE" ]]; then
  echo "# WARNING: $TIPROXY is older than $STALE(not rebuilt: build first)"
fi
load1=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$load1" 'BEGIN {exit !(l > 0.5)}'; then
  echo "# WARNING: load average $load1 at start: the machine is not quiet, expect noisy numbers"
fi
echo

COMMON=(--proxy "127.0.0.1:$PORT" --api "127.0.0.1:$API_PORT" --a "$A" --a-status "$A_STATUS"
  --b "$B" --b-status "$B_STATUS" --proxy-pid "$TP_PID" --out "$RESULTS")
: >"$RESULTS"

# ---- 1. drain --------------------------------------------------------------------------------
if (( DO_DRAIN )); then
  for n in "${SESSION_LIST[@]}"; do
    log "== drain: $n idle sessions =="
    args=(drain "${COMMON[@]}" --sessions "$n" --procs "$PROCS" --verify-sample "$VERIFY_SAMPLE"
      --a-pid-file "$TIDB_DIR/tidb-$INST_A.pid" --b-pid-file "$TIDB_DIR/tidb-$INST_B.pid"
      --graceful-wait "$GRACEFUL_WAIT")
    (( DO_SIGTERM )) || args+=(--no-sigterm)
    run_py "${args[@]}" || die "drain test with $n sessions failed (logs in $WORK)"
    (( DO_SIGTERM )) && restart_b
    run_py wait --api "127.0.0.1:$API_PORT" --healthy "$A" --healthy "$B" --idle \
      --tidb-idle "$A_STATUS" --tidb-idle "$B_STATUS" --timeout 120 \
      || die "the proxy or TiDB did not return to idle after the drain test"
  done
fi

# ---- 2. busy clients -------------------------------------------------------------------------
if (( DO_BUSY )); then
  for k in "${CLIENT_LIST[@]}"; do
    log "== busy clients: $k clients, $ROUND_TRIPS round trips =="
    run_py busy "${COMMON[@]}" --clients "$k" --round-trips "$ROUND_TRIPS" \
      --baseline "$BASELINE" --dwell "$DWELL" --work "$WORK" || die "busy-client test failed (logs in $WORK)"
  done
fi

alive "$TP_PID" || die "tiproxy died during the run (log $WORK/tiproxy.log)"

# ---- report ----------------------------------------------------------------------------------
echo "== results =="
echo
"$PYTHON" "$BENCH/migration_bench.py" report "$RESULTS"
warns=$(grep -c ' WARN ' "$WORK/tiproxy.log" || true)
errs=$(grep -c ' ERROR ' "$WORK/tiproxy.log" || true)
stays=$(grep -c 'session stays: migration failed' "$WORK/tiproxy.log" || true)
echo "# proxy log: $warns WARN, $errs ERROR, $stays 'session stays: migration failed' lines"
if (( warns + errs + stays > 0 )); then
  grep -E ' (WARN|ERROR) |session stays' "$WORK/tiproxy.log" | sed -E 's/conn=[0-9]+/conn=N/; s/client=[0-9.:]+/client=X/' \
    | cut -c 28- | sort | uniq -c | sort -rn | head -n 8 | sed 's/^/#   /'
fi
echo "# load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
(( KEEP )) && echo "# raw data: $RESULTS; logs: $WORK/tiproxy.log, $TIDB_DIR/"
OK=1
