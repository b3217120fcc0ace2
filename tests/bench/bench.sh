#!/usr/bin/env bash
# tiproxy vs HAProxy vs a direct connection, against one private MariaDB started here.
#
#   tests/bench/bench.sh [--rounds R] [--time S] [--threads T] [--idle-conns N] [--quick] ...
#
# Throughput: for each sysbench workload, R interleaved rounds of [direct, haproxy, tiproxy];
# per (workload, target) the median QPS, QPS ratio to direct, the proxy's CPU-µs per query
# (/proc/PID/stat utime+stime) and, for the large-result workload, bytes forwarded per proxy
# CPU-second. Memory: RSS per idle authenticated connection for a fresh tiproxy and HAProxy.
# Method and caveats: docs/benchmarks.md. Every process started here is stopped on exit.
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BENCH="$ROOT/tests/bench"
PROG=tests/bench/bench.sh
CMDLINE="$0"
for a in "$@"; do CMDLINE+=" $(printf '%q' "$a")"; done

usage() {
  cat <<EOF
Usage: $PROG [options]

  --rounds R        interleaved rounds per workload (default 3)
  --time S          seconds per sysbench run (default 20)
  --threads T       sysbench client threads (default 16)
  --idle-conns N    idle connections for the memory test (default 10000; lowered, with a
                    warning, when the fd limit cannot hold 2 fds per connection in the proxy)
  --quick           smoke test: --time 3 --rounds 1 --idle-conns 500 (explicit options win)
  --port P          MariaDB port (default 3317); HAProxy uses P+1, tiproxy P+2, its API P+3
  --dir DIR         work directory (default: a new /tmp/tiproxy-bench.XXXXXX); must not exist
                    or be empty. Removed at exit after a successful run unless --keep
  --keep            keep the work directory (MariaDB data, configs, every sysbench log)
  --tiproxy BIN     tiproxy binary (default target/release/tiproxy, built if missing)
  --skip-throughput / --skip-memory   run only one half
  -h, --help

Needs sysbench 1.0.x, haproxy, mariadb-server + client, python3, ss (iproute2).
A full run with the defaults takes about 12 minutes.
EOF
}

# shellcheck source-path=SCRIPTDIR source=../scripts/common.sh
source "$ROOT/tests/scripts/common.sh"

ROUNDS="" TIME="" THREADS="" IDLE="" QUICK=0 PORT=3317 WORK="" KEEP=0 TIPROXY=""
DO_TP=1 DO_MEM=1
need() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --rounds) need "$@"; ROUNDS=$2; shift 2 ;;
    --time) need "$@"; TIME=$2; shift 2 ;;
    --threads) need "$@"; THREADS=$2; shift 2 ;;
    --idle-conns) need "$@"; IDLE=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --port) need "$@"; PORT=$2; shift 2 ;;
    --dir) need "$@"; WORK=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --tiproxy) need "$@"; TIPROXY=$2; shift 2 ;;
    --skip-throughput) DO_TP=0; shift ;;
    --skip-memory) DO_MEM=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
if (( QUICK )); then
  : "${ROUNDS:=1}" "${TIME:=3}" "${IDLE:=500}"
fi
: "${ROUNDS:=3}" "${TIME:=20}" "${THREADS:=16}" "${IDLE:=10000}"
for v in ROUNDS TIME THREADS IDLE PORT; do
  [[ "${!v}" =~ ^[0-9]+$ && "${!v}" -gt 0 ]] || die "--${v,,} must be a positive integer, got '${!v}'"
done
[[ "$IDLE" -ge 1 ]] || die "--idle-conns must be at least 1"
(( PORT + 3 < 65536 )) || die "--port too large"
HAP_PORT=$((PORT + 1)) TP_PORT=$((PORT + 2)) API_PORT=$((PORT + 3))
TABLES=4 TABLE_SIZE=10000
WARMUP=$(( TIME < 3 ? 1 : 3 ))
(( QUICK )) && WARMUP=1

# ---- prerequisites ---------------------------------------------------------------------------
SYSBENCH=$(find_bin sysbench) || die "sysbench not found (apt-get install sysbench, or tests/scripts/install-deps.sh)"
HAPROXY=$(find_bin haproxy) || die "haproxy not found (apt-get install haproxy, or tests/scripts/install-deps.sh)"
MYSQL=$(find_bin mariadb mysql) || die "mariadb client not found (apt-get install mariadb-client)"
find_bin mariadbd mysqld >/dev/null || die "mariadbd not found (apt-get install mariadb-server)"
PYTHON=$(find_bin python3) || die "python3 not found"
command -v ss >/dev/null || die "ss not found (apt-get install iproute2)"
"$SYSBENCH" --version | grep -q '^sysbench 1\.' || die "need sysbench 1.0.x, found: $("$SYSBENCH" --version)"
CLK_TCK=$(getconf CLK_TCK)
NCPU=$(nproc)

# fds: each proxied connection costs the proxy 2 fds (client + backend).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
IDLE_REQ=$IDLE
MAX_IDLE=$(( (NOFILE - 200) / 2 ))
if (( IDLE > MAX_IDLE )); then
  IDLE=$MAX_IDLE
fi
(( IDLE >= 1 )) || die "fd limit $NOFILE is too low for the memory test"
HAP_MAXCONN=$(( IDLE + 50 > 1000 ? IDLE + 50 : 1000 ))
(( HAP_MAXCONN * 2 + 64 <= NOFILE )) || HAP_MAXCONN=$(( (NOFILE - 64) / 2 ))

if [[ -z "$TIPROXY" ]]; then
  TIPROXY="$ROOT/target/release/tiproxy"
  if [[ ! -x "$TIPROXY" ]]; then
    log "building tiproxy (cargo build --release -p tiproxy)"
    (cd "$ROOT" && cargo build --release -p tiproxy) || die "cargo build --release -p tiproxy failed"
  fi
fi
[[ -x "$TIPROXY" ]] || die "tiproxy binary $TIPROXY not found or not executable"

for p in "$PORT" "$HAP_PORT" "$TP_PORT" "$API_PORT"; do
  port_in_use "$p" && die "port $p is already in use; pick another base with --port (uses P..P+3)"
done

# ---- work dir and cleanup --------------------------------------------------------------------
if [[ -z "$WORK" ]]; then
  WORK=$(mktemp -d /tmp/tiproxy-bench.XXXXXX)
else
  [[ ! -e "$WORK" || -z "$(ls -A "$WORK" 2>/dev/null)" ]] || die "--dir $WORK exists and is not empty"
  mkdir -p "$WORK"
  WORK=$(cd "$WORK" && pwd)
fi
DBDIR="$WORK/mariadb"
RESULTS="$WORK/results.tsv"
MEMORY="$WORK/memory.tsv"
PIDS=()          # processes started here (proxies, helpers)
DB_STARTED=0
OK=0

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_children "${PIDS[@]}"
  if (( DB_STARTED )); then
    bash "$ROOT/tests/scripts/mariadb.sh" stop --dir "$DBDIR" >/dev/null 2>&1 \
      || log "warning: stopping MariaDB in $DBDIR failed"
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

forget_pid() {  # remove $1 from PIDS
  local keep=() p
  for p in "${PIDS[@]}"; do [[ "$p" == "$1" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

stop_pid() {  # SIGTERM, wait up to 10 s, then SIGKILL
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || true
  for _ in {1..100}; do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  forget_pid "$pid"
}


wait_listen() {  # port pid name logfile
  local i
  for ((i = 0; i < 200; i++)); do
    port_in_use "$1" && return 0
    alive "$2" || { tail -n 20 "$4" >&2 || true; die "$3 exited during start-up (log $4)"; }
    sleep 0.05
  done
  tail -n 20 "$4" >&2 || true
  die "$3 is not listening on 127.0.0.1:$1 after 10 s (log $4)"
}

# utime+stime of a whole process (all threads), in clock ticks
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
wchar() { awk '/^wchar:/ {print $2}' "/proc/$1/io"; }

sql() { "$MYSQL" --defaults-file="$DBDIR/my.cnf" --protocol=socket -uroot --batch --skip-column-names "$@"; }
status_var() { sql -e "SHOW GLOBAL STATUS LIKE '$1'" | awk '{print $2}'; }

# ---- header ----------------------------------------------------------------------------------
TP_REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$ROOT" diff --quiet HEAD -- 2>/dev/null || TP_REV+="+dirty"
echo "# command: $CMDLINE"
echo "# cwd: $PWD"
echo "# date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')  host: $(hostname)  kernel: $(uname -r)"
echo "# cpu: $NCPU x $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)  load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# sysbench: $("$SYSBENCH" --version)  haproxy: $("$HAPROXY" -v | awk 'NR==1 {print $3}')  mariadb: $("$(find_bin mariadbd mysqld)" --version | awk '{print $3}')"
echo "# tiproxy: $("$TIPROXY" --version 2>/dev/null | awk '{print $2}') ($TIPROXY, git $TP_REV)"
echo "# settings: rounds=$ROUNDS time=${TIME}s threads=$THREADS warmup=${WARMUP}s tables=$TABLES table-size=$TABLE_SIZE rand-type=uniform idle-conns=$IDLE"
echo "# ports: mariadb $PORT, haproxy $HAP_PORT (nbthread $NCPU, maxconn $HAP_MAXCONN), tiproxy $TP_PORT (session threads = $NCPU cores)"
echo "# fd limit (ulimit -n): $NOFILE (hard $(ulimit -Hn)); CLK_TCK=$CLK_TCK; work dir: $WORK"
if (( IDLE < IDLE_REQ )); then
  echo "# WARNING: --idle-conns $IDLE_REQ needs about $((2 * IDLE_REQ + 200)) fds in a proxy (client + backend socket per connection) but the fd limit is $NOFILE and cannot be raised here; using $IDLE idle connections"
fi
load1=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$load1" 'BEGIN {exit !(l > 0.5)}'; then
  echo "# WARNING: load average $load1 at start: the machine is not quiet, expect noisy numbers"
fi

# wchar in /proc/PID/io counts write()/writev() on sockets but not send()/sendto()/sendmsg():
# check on this kernel; tiproxy (tokio/mio) and HAProxy both use send*, so bytes forwarded are
# taken from MariaDB's Bytes_sent counter instead (see docs/benchmarks.md).
WCHAR_CHECK=$("$PYTHON" - <<'EOF'
import os, socket, threading
def wchar():
    with open("/proc/self/io") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("wchar"))
a, b = socket.socketpair()
threading.Thread(target=lambda: [None for _ in iter(lambda: b.recv(1 << 20), b"")], daemon=True).start()
data = b"x" * (1 << 20)
res = []
for name, fn in (("write", lambda: os.write(a.fileno(), data)), ("send", lambda: a.sendall(data))):
    w0 = wchar(); fn(); res.append(f"{name}()={'counted' if wchar() - w0 >= len(data) else 'NOT counted'}")
print(", ".join(res))
EOF
) || WCHAR_CHECK="check failed"
echo "# /proc/PID/io wchar on this kernel: socket $WCHAR_CHECK -> bytes forwarded = MariaDB Bytes_sent delta"
echo

# ---- MariaDB ---------------------------------------------------------------------------------
log "starting MariaDB on 127.0.0.1:$PORT ($DBDIR)"
DB_STARTED=1
bash "$ROOT/tests/scripts/mariadb.sh" start --dir "$DBDIR" --port "$PORT" >"$WORK/mariadb-start.log" 2>&1 \
  || { cat "$WORK/mariadb-start.log" >&2; die "MariaDB did not start"; }
DB_PID=$(cat "$DBDIR/mariadb.pid")
MAXCONN_DB=$(( IDLE + 1000 > 20000 ? IDLE + 1000 : 20000 ))
sql -e "SET GLOBAL max_connections = $MAXCONN_DB; CREATE DATABASE IF NOT EXISTS sbtest" \
  || die "configuring MariaDB failed"

SB_COMMON=(--db-driver=mysql --mysql-host=127.0.0.1 --mysql-user=root --mysql-password=
  --mysql-db=sbtest "--tables=$TABLES" "--table-size=$TABLE_SIZE" --rand-type=uniform)

# ---- proxies ---------------------------------------------------------------------------------
cat > "$WORK/haproxy.cfg" <<EOF
# written by tests/bench/bench.sh
global
  nbthread $NCPU
  maxconn $HAP_MAXCONN

defaults
  mode tcp
  maxconn $HAP_MAXCONN
  timeout connect 5s
  timeout client 1h
  timeout server 1h

frontend bench
  bind 127.0.0.1:$HAP_PORT
  default_backend mariadb

backend mariadb
  server db1 127.0.0.1:$PORT
EOF
"$HAPROXY" -c -q -f "$WORK/haproxy.cfg" || die "haproxy rejected $WORK/haproxy.cfg"

cat > "$WORK/tiproxy.toml" <<EOF
# written by tests/bench/bench.sh
[proxy]
addr = "127.0.0.1:$TP_PORT"
backends = ["127.0.0.1:$PORT"]

[api]
addr = "127.0.0.1:$API_PORT"

[log]
level = "warn"
EOF
"$TIPROXY" check-config "$WORK/tiproxy.toml" >/dev/null || die "tiproxy rejected $WORK/tiproxy.toml"

HAP_PID="" TP_PID=""
start_haproxy() {  # tag
  "$HAPROXY" -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy-$1.log" 2>&1 &
  HAP_PID=$!
  PIDS+=("$HAP_PID")
  wait_listen "$HAP_PORT" "$HAP_PID" haproxy "$WORK/haproxy-$1.log"
}
start_tiproxy() {  # tag
  env -u RUST_LOG "$TIPROXY" --config "$WORK/tiproxy.toml" >"$WORK/tiproxy-$1.log" 2>&1 &
  TP_PID=$!
  PIDS+=("$TP_PID")
  wait_listen "$TP_PORT" "$TP_PID" tiproxy "$WORK/tiproxy-$1.log"
}

target_port() {
  case $1 in direct) echo "$PORT" ;; haproxy) echo "$HAP_PORT" ;; tiproxy) echo "$TP_PORT" ;; esac
}
target_pid() {
  case $1 in direct) echo "" ;; haproxy) echo "$HAP_PID" ;; tiproxy) echo "$TP_PID" ;; esac
}

# ---- throughput ------------------------------------------------------------------------------
WORKLOADS=(point_select read_only read_only_range1000)
workload_args() {
  case $1 in
    point_select) echo "oltp_point_select" ;;
    read_only) echo "oltp_read_only" ;;
    # one 1000-row range SELECT per event: no other SELECTs and (--skip-trx) no BEGIN/COMMIT
    read_only_range1000) echo "oltp_read_only --simple-ranges=1 --sum-ranges=0 --order-ranges=0 --distinct-ranges=0 --point-selects=0 --range-size=1000 --skip-trx=on" ;;
  esac
}

# run_sysbench workload target seconds logfile
run_sysbench() {
  local wl=$1 tgt=$2 secs=$3 out=$4
  # shellcheck disable=SC2046
  if ! "$SYSBENCH" $(workload_args "$wl") "${SB_COMMON[@]}" --mysql-port="$(target_port "$tgt")" \
      --threads="$THREADS" --time="$secs" --events=0 --report-interval=0 run >"$out" 2>&1; then
    tail -n 20 "$out" >&2
    die "sysbench $wl via $tgt failed (log $out)"
  fi
}

measure() {  # workload target round
  local wl=$1 tgt=$2 rd=$3 pid out qps queries secs c0 c1 b0 b1 s0 s1 w0="" w1="" ign
  pid=$(target_pid "$tgt")
  out="$WORK/sysbench-$wl-$tgt-r$rd.log"
  [[ -z "$pid" ]] || alive "$pid" || die "$tgt (pid $pid) is no longer running"
  b0=$(status_var Bytes_sent)
  s0=$(cpu_ticks "$DB_PID")
  if [[ -n "$pid" ]]; then c0=$(cpu_ticks "$pid"); w0=$(wchar "$pid"); fi
  run_sysbench "$wl" "$tgt" "$TIME" "$out"
  if [[ -n "$pid" ]]; then c1=$(cpu_ticks "$pid"); w1=$(wchar "$pid"); fi
  s1=$(cpu_ticks "$DB_PID")
  b1=$(status_var Bytes_sent)
  read -r queries qps < <(awk '$1 == "queries:" {gsub(/\(/, "", $3); print $2, $3}' "$out") || true
  secs=$(awk '/total time:/ {sub(/s$/, "", $3); print $3}' "$out")
  ign=$(awk '/ignored errors:/ {print $3}' "$out")
  [[ -n "$qps" && -n "$queries" ]] || die "cannot parse sysbench output $out"
  [[ "${ign:-0}" == 0 ]] || die "sysbench reported $ign errors via $tgt ($out)"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$wl" "$tgt" "$rd" "$qps" "$queries" "$secs" \
    "${pid:+$((c1 - c0))}" "$((b1 - b0))" "$((s1 - s0))" "${pid:+$((w1 - w0))}" >>"$RESULTS"
  if [[ -n "$pid" ]]; then
    printf '  %-20s %-8s round %d: %9.0f QPS  %7.1f proxy-CPU-µs/query  %8.0f B/query\n' "$wl" "$tgt" "$rd" "$qps" \
      "$(awk -v c=$((c1 - c0)) -v t="$CLK_TCK" -v q="$queries" 'BEGIN {print c / t * 1e6 / q}')" \
      "$(awk -v b=$((b1 - b0)) -v q="$queries" 'BEGIN {print b / q}')"
  else
    printf '  %-20s %-8s round %d: %9.0f QPS  %7s                      %8.0f B/query\n' "$wl" "$tgt" "$rd" "$qps" "" \
      "$(awk -v b=$((b1 - b0)) -v q="$queries" 'BEGIN {print b / q}')"
  fi
}

if (( DO_TP )); then
  log "sysbench prepare: $TABLES tables x $TABLE_SIZE rows"
  "$SYSBENCH" oltp_read_only "${SB_COMMON[@]}" --mysql-port="$PORT" --threads="$TABLES" prepare \
    >"$WORK/sysbench-prepare.log" 2>&1 || { tail -n 20 "$WORK/sysbench-prepare.log" >&2; die "sysbench prepare failed"; }
  start_haproxy throughput
  start_tiproxy throughput
  printf 'workload\ttarget\tround\tqps\tqueries\tseconds\tproxy_ticks\tbytes_sent\tserver_ticks\tproxy_wchar\n' >"$RESULTS"
  echo "== throughput: $ROUNDS round(s) x [direct, haproxy, tiproxy] per workload, ${TIME}s each, $THREADS threads =="
  for wl in "${WORKLOADS[@]}"; do
    log "$wl: warm-up ${WARMUP}s per target"
    for tgt in direct haproxy tiproxy; do
      run_sysbench "$wl" "$tgt" "$WARMUP" "$WORK/sysbench-$wl-$tgt-warmup.log"
    done
    for ((rd = 1; rd <= ROUNDS; rd++)); do
      for tgt in direct haproxy tiproxy; do
        measure "$wl" "$tgt" "$rd"
        sleep 1
      done
    done
  done
  stop_pid "$HAP_PID"
  stop_pid "$TP_PID"
  echo
fi

# ---- memory per idle connection --------------------------------------------------------------
wait_backend_idle() {  # until MariaDB has (almost) no client threads left
  local i n
  for ((i = 0; i < 600; i++)); do
    n=$(status_var Threads_connected)
    (( n <= 5 )) && return 0
    sleep 0.1
  done
  log "warning: MariaDB still has $n connections"
}

measure_idle() {  # target
  local tgt=$1 pid port before after hpid line secs i threads
  port=$(target_port "$tgt")
  wait_backend_idle
  if [[ $tgt == haproxy ]]; then start_haproxy memory; pid=$HAP_PID; else start_tiproxy memory; pid=$TP_PID; fi
  sleep 1
  before=$(rss_kib "$pid")
  "$PYTHON" "$BENCH/idle_conns.py" --port "$port" --conns "$IDLE" --procs 4 --hold 3600 \
    >"$WORK/idle-$tgt.out" 2>"$WORK/idle-$tgt.err" &
  hpid=$!
  PIDS+=("$hpid")
  line=""
  for ((i = 0; i < 6000; i++)); do  # up to 10 minutes
    line=$(head -n 1 "$WORK/idle-$tgt.out" 2>/dev/null || true)
    [[ -n "$line" ]] && break
    alive "$hpid" || break
    sleep 0.1
  done
  [[ "$line" == READY* ]] || { cat "$WORK/idle-$tgt.err" >&2; die "opening $IDLE idle connections via $tgt failed: ${line:-no answer from idle_conns.py}"; }
  secs=$(awk '{print $3}' <<<"$line")
  sleep 3
  alive "$pid" || die "$tgt died while holding $IDLE idle connections (log $WORK/$tgt-memory.log)"
  after=$(rss_kib "$pid")
  threads=$(status_var Threads_connected)
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$tgt" "$IDLE" "$before" "$after" "$secs" "$threads" >>"$MEMORY"
  printf '  %-8s %d idle conns (opened in %ss): VmRSS %d KiB -> %d KiB = %.2f KiB/conn (MariaDB Threads_connected %s)\n' \
    "$tgt" "$IDLE" "$secs" "$before" "$after" "$(awk -v a="$after" -v b="$before" -v n="$IDLE" 'BEGIN {print (a - b) / n}')" "$threads"
  stop_pid "$hpid"
  stop_pid "$pid"
}

if (( DO_MEM )); then
  echo "== memory: VmRSS per idle authenticated connection, $IDLE connections, fresh proxy each =="
  printf 'target\tconns\trss_before_kib\trss_after_kib\tconnect_seconds\tthreads_connected\n' >"$MEMORY"
  measure_idle tiproxy
  measure_idle haproxy
  echo
fi

# ---- report ----------------------------------------------------------------------------------
echo "== results =="
echo
args=(--clk-tck "$CLK_TCK" --order "$(IFS=,; echo "${WORKLOADS[*]}")")
(( DO_TP )) && args+=(--results "$RESULTS")
(( DO_MEM )) && args+=(--memory "$MEMORY")
"$PYTHON" "$BENCH/report.py" "${args[@]}"
echo "# load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
(( KEEP )) && echo "# raw data: $RESULTS $MEMORY"
OK=1
