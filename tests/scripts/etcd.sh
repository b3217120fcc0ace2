#!/usr/bin/env bash
# Private etcd for tiproxy's discovery tests, standing in for PD's embedded etcd: one member,
# client URL http://127.0.0.1:P, peer URL http://127.0.0.1:(P+1), everything under DIR.
# Never touches a system etcd. Also registers / unregisters fake TiDBs exactly as TiDB does
# (pingcap/tidb pkg/domain/infosync): /topology/tidb/<addr>/info without a lease, and
# /topology/tidb/<addr>/ttl (time.Now().UnixNano()) under a 45 s lease kept alive in the
# background — a TiDB is "alive" for discovery while its ttl key exists.
set -euo pipefail

PROG=$(basename "$0")

usage() {
  cat <<EOF
Usage:
  $PROG start    [--dir DIR] [--port P] [--timeout S]
  $PROG stop     [--dir DIR]
  $PROG status   [--dir DIR]
  $PROG put-tidb ADDR STATUS_PORT [--labels k=v,...] [--ttl S] [--keyspace KS]
                 [--version V] [--dir DIR] [--endpoints URL]
  $PROG del-tidb ADDR [--keyspace KS] [--dir DIR] [--endpoints URL]

  --dir DIR        state directory (default \$PWD/.testbed/etcd): data/, etcd.pid, etcd.log,
                   port, and tidb/ (one lease id + keep-alive pid per registered TiDB)
  --port P         client port on 127.0.0.1 (default 2479; peer port P+1). 'start' only; the
                   other commands read it from DIR
  --timeout S      seconds to wait for a healthy etcd (default 30)
  --endpoints URL  etcd to write to (default http://127.0.0.1:<port from DIR, else 2479>)
  ADDR             TiDB's SQL address ip:port as it appears in the key (e.g. 127.0.0.1:4000)
  STATUS_PORT      TiDB's status port (written into info.status_port)
  --labels k=v,... info.labels (default none: {})
  --ttl S          lease TTL of the ttl key (default 45, TiDB's TopologySessionTTL)
  --keyspace KS    use /keyspaces/tidb/KS/topology/tidb/... instead of /topology/tidb/...
  --version V      info.version (default v8.5.3)

'start' wipes DIR/data (a fresh, empty etcd every time) and prints: etcd endpoints=http://127.0.0.1:P pid=PID
'put-tidb' replaces an earlier registration of the same ADDR; 'del-tidb' deletes both keys and
revokes the lease (a TiDB that is gone); 'stop' also ends every keep-alive.
EOF
}

# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"


CMD=${1:-}
[[ -n "$CMD" ]] || { usage >&2; exit 2; }
shift
case "$CMD" in -h|--help|help) usage; exit 0 ;; esac

DIR="$PWD/.testbed/etcd"
PORT=""
TIMEOUT=30
ENDPOINTS=""
LABELS=""
TTL=45
KEYSPACE=""
VERSION="v8.5.3"
POS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir) [[ $# -ge 2 ]] || die "--dir needs a value"; DIR=$2; shift 2 ;;
    --dir=*) DIR=${1#*=}; shift ;;
    --port) [[ $# -ge 2 ]] || die "--port needs a value"; PORT=$2; shift 2 ;;
    --port=*) PORT=${1#*=}; shift ;;
    --timeout) [[ $# -ge 2 ]] || die "--timeout needs a value"; TIMEOUT=$2; shift 2 ;;
    --timeout=*) TIMEOUT=${1#*=}; shift ;;
    --endpoints) [[ $# -ge 2 ]] || die "--endpoints needs a value"; ENDPOINTS=$2; shift 2 ;;
    --endpoints=*) ENDPOINTS=${1#*=}; shift ;;
    --labels) [[ $# -ge 2 ]] || die "--labels needs a value"; LABELS=$2; shift 2 ;;
    --labels=*) LABELS=${1#*=}; shift ;;
    --ttl) [[ $# -ge 2 ]] || die "--ttl needs a value"; TTL=$2; shift 2 ;;
    --ttl=*) TTL=${1#*=}; shift ;;
    --keyspace) [[ $# -ge 2 ]] || die "--keyspace needs a value"; KEYSPACE=$2; shift 2 ;;
    --keyspace=*) KEYSPACE=${1#*=}; shift ;;
    --version) [[ $# -ge 2 ]] || die "--version needs a value"; VERSION=$2; shift 2 ;;
    --version=*) VERSION=${1#*=}; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) usage >&2; die "unknown option: $1" ;;
    *) POS+=("$1"); shift ;;
  esac
done
[[ -z "$PORT" || ( "$PORT" =~ ^[0-9]+$ && $PORT -ge 1 && $PORT -le 65534 ) ]] \
  || die "--port must be a number in 1..65534, got '$PORT'"
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || die "--timeout must be a number of seconds, got '$TIMEOUT'"
[[ "$TTL" =~ ^[0-9]+$ && $TTL -ge 1 ]] || die "--ttl must be a positive number of seconds, got '$TTL'"
[[ -z "$KEYSPACE" || "$KEYSPACE" != */* ]] || die "--keyspace must not contain '/'"
mkdir -p "$DIR" 2>/dev/null || true
DIR=$(cd "$DIR" 2>/dev/null && pwd) || die "cannot use directory $DIR"

DATADIR="$DIR/data"
PIDFILE="$DIR/etcd.pid"
LOGFILE="$DIR/etcd.log"
PORTFILE="$DIR/port"
TIDBDIR="$DIR/tidb"

export ETCDCTL_API=3

# pid of our etcd if it is running (not a zombie, really an etcd with our data dir), else empty
running_pid() { live_pid "$PIDFILE" "--data-dir $DATADIR"; }



endpoints() {
  if [[ -n "$ENDPOINTS" ]]; then echo "$ENDPOINTS"; return; fi
  local p=2479
  [[ -s "$PORTFILE" ]] && p=$(<"$PORTFILE")
  echo "http://127.0.0.1:$p"
}

ctl() {
  "$ETCDCTL" --endpoints="$(endpoints)" --dial-timeout=3s --command-timeout=5s "$@"
}

healthy() { ctl endpoint health >/dev/null 2>&1; }

# Kills a pid if it is alive and its command line contains $2; waits for it to go.
kill_if() {
  local pid=$1 pattern=$2 i
  [[ "$pid" =~ ^[0-9]+$ && -r /proc/$pid/cmdline ]] || return 0
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$pattern" || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 50; i++)); do
    [[ -r /proc/$pid/stat ]] || return 0
    [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" == Z ]] && return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}

# ---- TiDB registrations ----------------------------------------------------------------------
# One registration = DIR/tidb/<name>.{lease,pid,log}, name derived from keyspace + addr.
reg_name() {
  local n="${KEYSPACE:+ks_${KEYSPACE}__}$1"
  echo "${n//[^A-Za-z0-9._-]/_}"
}

key_prefix() {
  if [[ -n "$KEYSPACE" ]]; then
    echo "/keyspaces/tidb/$KEYSPACE/topology/tidb/$1"
  else
    echo "/topology/tidb/$1"
  fi
}

# Ends the keep-alive of a registration and forgets it; prints its lease id (may be empty).
drop_registration() {
  local name=$1 lease="" pid
  [[ -s "$TIDBDIR/$name.lease" ]] && lease=$(<"$TIDBDIR/$name.lease")
  if [[ -s "$TIDBDIR/$name.pid" ]]; then
    pid=$(<"$TIDBDIR/$name.pid")
    kill_if "$pid" "lease keep-alive"
  fi
  rm -f "$TIDBDIR/$name.pid" "$TIDBDIR/$name.lease"
  echo "$lease"
}

json_str() {
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  printf '"%s"' "$s"
}

cmd_put_tidb() {
  [[ ${#POS[@]} -eq 2 ]] || { usage >&2; die "put-tidb needs ADDR and STATUS_PORT"; }
  local addr=${POS[0]} status_port=${POS[1]} host name prefix old lease out labels_json pair k v
  [[ "$addr" =~ ^(\[[0-9A-Fa-f:.]+\]|[^/:[:space:]]+):[0-9]+$ ]] || die "ADDR must be host:port, got '$addr'"
  [[ "$status_port" =~ ^[0-9]+$ && $status_port -ge 1 && $status_port -le 65535 ]] \
    || die "STATUS_PORT must be a port number, got '$status_port'"
  host=${addr%:*}; host=${host#[}; host=${host%]}
  name=$(reg_name "$addr")
  prefix=$(key_prefix "$addr")
  mkdir -p "$TIDBDIR"
  healthy || die "etcd at $(endpoints) is not healthy (start it with '$PROG start --dir $DIR')"

  labels_json=""
  if [[ -n "$LABELS" ]]; then
    IFS=',' read -r -a pairs <<<"$LABELS"
    for pair in "${pairs[@]}"; do
      [[ "$pair" == *=* && -n "${pair%%=*}" ]] || die "--labels wants k=v,..., got '$pair'"
      k=${pair%%=*}; v=${pair#*=}
      labels_json+="${labels_json:+,}$(json_str "$k"):$(json_str "$v")"
    done
  fi

  # Replace an earlier registration of the same TiDB (as a restarted TiDB does).
  old=$(drop_registration "$name")
  [[ -z "$old" ]] || ctl lease revoke "$old" >/dev/null 2>&1 || true

  # Field order and types as Go's json.Marshal of serverinfo.TopologyInfo.
  local info
  info="{\"version\":$(json_str "$VERSION"),\"git_hash\":\"0000000000000000000000000000000000000000\""
  info+=",\"ip\":$(json_str "$host"),\"status_port\":$status_port,\"deploy_path\":\"/usr/local/bin\""
  info+=",\"start_timestamp\":$(date +%s),\"labels\":{$labels_json}}"

  out=$(ctl lease grant "$TTL") || die "etcdctl lease grant $TTL failed"
  # "lease 694d7d8e1d2e2c0a granted with TTL(45s)"
  lease=$(awk '$1 == "lease" && $3 == "granted" {print $2}' <<<"$out")
  [[ "$lease" =~ ^[0-9a-f]+$ ]] || die "cannot parse lease id from: $out"
  echo "$lease" > "$TIDBDIR/$name.lease"

  ctl put -- "$prefix/info" "$info" >/dev/null || die "etcdctl put $prefix/info failed"
  ctl put --lease="$lease" -- "$prefix/ttl" "$(date +%s%N)" >/dev/null \
    || die "etcdctl put $prefix/ttl failed"

  # setsid: outlives the caller (a test's process group); its pid is what del-tidb/stop kill.
  setsid "$ETCDCTL" --endpoints="$(endpoints)" --dial-timeout=3s lease keep-alive "$lease" \
    </dev/null >"$TIDBDIR/$name.log" 2>&1 &
  echo $! > "$TIDBDIR/$name.pid"
  log "registered TiDB $addr (status port $status_port) under $prefix/, lease $lease TTL ${TTL}s, keep-alive pid $(<"$TIDBDIR/$name.pid")"
}

cmd_del_tidb() {
  [[ ${#POS[@]} -eq 1 ]] || { usage >&2; die "del-tidb needs ADDR"; }
  local addr=${POS[0]} name prefix lease
  name=$(reg_name "$addr")
  prefix=$(key_prefix "$addr")
  lease=$(drop_registration "$name")
  ctl del -- "$prefix/info" >/dev/null || die "etcdctl del $prefix/info failed"
  ctl del -- "$prefix/ttl" >/dev/null || die "etcdctl del $prefix/ttl failed"
  [[ -z "$lease" ]] || ctl lease revoke "$lease" >/dev/null 2>&1 || true
  log "unregistered TiDB $addr (deleted $prefix/info and $prefix/ttl)"
}

# ---- the server --------------------------------------------------------------------------------
cmd_start() {
  local pid etcd waited peer
  PORT=${PORT:-2479}
  peer=$((PORT + 1))
  pid=$(running_pid)
  [[ -z "$pid" ]] || die "etcd from $DIR is already running (pid $pid, port $(cat "$PORTFILE" 2>/dev/null || echo '?')); run '$PROG stop --dir $DIR' first"
  etcd=$(find_bin etcd) || die "etcd not found; install etcd-server (tests/scripts/install-deps.sh)"
  port_in_use "$PORT" && die "port $PORT is already in use on 127.0.0.1; pick another with --port"
  port_in_use "$peer" && die "peer port $peer (--port + 1) is already in use on 127.0.0.1; pick another --port"

  stop_keepalives
  rm -rf "$DATADIR" "$TIDBDIR"
  echo "$PORT" > "$PORTFILE"
  ENDPOINTS=""
  log "starting $etcd on 127.0.0.1:$PORT (peer $peer, dir $DIR)"
  # setsid: detach from the caller's process group so the server outlives it
  setsid "$etcd" \
    --name tiproxy-test \
    --data-dir "$DATADIR" \
    --listen-client-urls "http://127.0.0.1:$PORT" \
    --advertise-client-urls "http://127.0.0.1:$PORT" \
    --listen-peer-urls "http://127.0.0.1:$peer" \
    --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "tiproxy-test=http://127.0.0.1:$peer" \
    --initial-cluster-state new \
    --initial-cluster-token "tiproxy-test-$PORT" \
    </dev/null >>"$LOGFILE" 2>&1 &
  pid=$!
  echo "$pid" > "$PIDFILE"

  waited=0
  while ! healthy; do
    # by pid, not running_pid: until the child has exec'd etcd its command line is the shell's
    if ! alive "$pid"; then
      tail_log "$LOGFILE"
      die "etcd exited during start-up (log $LOGFILE)"
    fi
    if (( waited >= TIMEOUT * 4 )); then
      tail_log "$LOGFILE"
      die "etcd not healthy after ${TIMEOUT}s (log $LOGFILE)"
    fi
    sleep 0.25
    waited=$((waited + 1))
  done
  echo "etcd endpoints=http://127.0.0.1:$PORT pid=$(<"$PIDFILE")"
}

stop_keepalives() {
  local f
  [[ -d "$TIDBDIR" ]] || return 0
  for f in "$TIDBDIR"/*.pid; do
    [[ -e "$f" ]] || continue
    kill_if "$(<"$f")" "lease keep-alive"
    rm -f "$f"
  done
}

cmd_stop() {
  local pid i
  stop_keepalives
  pid=$(running_pid)
  if [[ -z "$pid" ]]; then
    log "etcd from $DIR is not running"
    rm -f "$PIDFILE"
    return 0
  fi
  log "stopping etcd (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    [[ -n "$(running_pid)" ]] || break
    sleep 0.1
  done
  if [[ -n "$(running_pid)" ]]; then
    log "etcd (pid $pid) ignored SIGTERM for 10s; killing"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.2
  fi
  rm -f "$PIDFILE"
}

cmd_status() {
  local pid
  pid=$(running_pid)
  if [[ -n "$pid" ]] && healthy; then
    echo "etcd endpoints=$(endpoints) pid=$pid healthy"
  elif [[ -n "$pid" ]]; then
    echo "etcd endpoints=$(endpoints) pid=$pid unhealthy"
    exit 1
  else
    echo "etcd from $DIR is not running"
    exit 1
  fi
}

case "$CMD" in
  start|put-tidb|del-tidb|status)
    ETCDCTL=$(find_bin etcdctl) || die "etcdctl not found; install etcd-client (tests/scripts/install-deps.sh)" ;;
esac
case "$CMD" in
  start|stop|status) [[ ${#POS[@]} -eq 0 ]] || die "unexpected argument: ${POS[0]}" ;;
esac

case "$CMD" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  put-tidb) cmd_put_tidb ;;
  del-tidb) cmd_del_tidb ;;
  *) usage >&2; die "unknown command: $CMD" ;;
esac
