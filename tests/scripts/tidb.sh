#!/usr/bin/env bash
# Starts/stops standalone unistore TiDB servers for tiproxy's integration tests.
#
# Address scheme (tests rely on it): instance i (1-based) listens on its own loopback address
#   IP(i)  = 127.0.0.$((10+i))        e.g. 127.0.0.11, 127.0.0.12, ...
#   SQL    = IP(i):4000               status (HTTP) = IP(i):10080
# Linux routes all of 127.0.0.0/8 to lo, so no set-up is needed. i is 1..244.
#
# Every instance of one DIR shares the session-token signing cert/key DIR/session-cert.pem,
# DIR/session-key.pem (ECDSA P-256, ecdsa-with-SHA256), so sessions can migrate between them; accepts
# PROXY protocol v1/v2 headers from any address but also plain connections
# ([proxy-protocol] networks="*", fallbackable=true); drains for graceful-wait-before-shutdown
# seconds on SIGTERM, during which GET /status answers 500. Each instance is a separate volatile
# database (-store unistore -path ""), with root@% and an empty password.
#
# Files per instance i under DIR: tidb-i.toml, tidb-i.log, tidb-i-slow.log, tidb-i.stderr,
# tidb-i.pid, tidb-i.tmp/ (temp-dir, tmp-storage-path, TMPDIR for the unistore data); with --tls
# also tidb-i-cert.pem, tidb-i-key.pem and the shared tls-ca.pem, tls-ca-key.pem.
set -euo pipefail

PROG=$(basename "$0")
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SQL_PORT=4000
STATUS_PORT=10080

usage() {
  cat <<EOF
Usage:
  $PROG start N [--dir DIR] [--graceful-wait S] [--first K] [--timeout S] [--persistent] [--tls]
  $PROG stop    [--dir DIR] [i ...] [--graceful]
  $PROG status  [--dir DIR]

  start N           start instances K..K+N-1 (default K=1) and wait until each answers
                    GET /status with 200 and accepts 'mysql -uroot' logins
  --dir DIR         state directory (default \$PWD/.testbed/tidb)
  --graceful-wait S graceful-wait-before-shutdown in seconds (default 5)
  --first K         number of the first instance (default 1)
  --persistent      keep each instance's data in DIR/tidb-i.data (unistore -path) instead of
                    a volatile store, so it survives a stop and a later 'start' of the same
                    instance number (delete the directory to start afresh)
  --tls             serve TLS on the SQL port too: instance i gets DIR/tidb-i-cert.pem (SAN: its
                    IP) signed by the CA DIR/tls-ca.pem, shared by every instance of DIR
  --timeout S       start: readiness timeout (default 120);
                    stop --graceful: SIGKILL after graceful-wait + S (default 60)
  stop [i ...]      stop the given instances (default: every instance of DIR);
                    SIGKILL, or SIGTERM with --graceful (TiDB then answers /status with 500,
                    keeps serving for graceful-wait seconds, drains and exits). Waits for exit.
  status            one line per known instance, with state and /status HTTP code

Address of instance i: SQL 127.0.0.\$((10+i)):$SQL_PORT, status 127.0.0.\$((10+i)):$STATUS_PORT.
'start' prints one line per instance:  tidb i sql=IP:$SQL_PORT status=IP:$STATUS_PORT pid=PID
Binary: \$TIDB_SERVER if set, else the one cached/built by tests/scripts/build-tidb.sh.
EOF
}

# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

ip_of() { echo "127.0.0.$((10 + $1))"; }

CMD=${1:-}
[[ -n "$CMD" ]] || { usage >&2; exit 2; }
shift
DIR="$PWD/.testbed/tidb"
GRACEFUL_WAIT=5
FIRST=1
TIMEOUT=""
GRACEFUL=0
PERSISTENT=0
TLS=0
N=""
INSTANCES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir) [[ $# -ge 2 ]] || die "--dir needs a value"; DIR=$2; shift 2 ;;
    --dir=*) DIR=${1#*=}; shift ;;
    --graceful-wait) [[ $# -ge 2 ]] || die "--graceful-wait needs a value"; GRACEFUL_WAIT=$2; shift 2 ;;
    --graceful-wait=*) GRACEFUL_WAIT=${1#*=}; shift ;;
    --first) [[ $# -ge 2 ]] || die "--first needs a value"; FIRST=$2; shift 2 ;;
    --first=*) FIRST=${1#*=}; shift ;;
    --timeout) [[ $# -ge 2 ]] || die "--timeout needs a value"; TIMEOUT=$2; shift 2 ;;
    --timeout=*) TIMEOUT=${1#*=}; shift ;;
    --graceful) GRACEFUL=1; shift ;;
    --persistent) PERSISTENT=1; shift ;;
    --tls) TLS=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) usage >&2; die "unknown option: $1" ;;
    *)
      [[ "$1" =~ ^[0-9]+$ ]] || { usage >&2; die "unexpected argument: $1"; }
      if [[ "$CMD" == start && -z "$N" ]]; then N=$1; else INSTANCES+=("$1"); fi
      shift ;;
  esac
done
[[ "$GRACEFUL_WAIT" =~ ^[0-9]+$ ]] || die "--graceful-wait must be a non-negative integer, got '$GRACEFUL_WAIT'"
[[ "$FIRST" =~ ^[0-9]+$ ]] || die "--first must be a positive integer, got '$FIRST'"
[[ -z "$TIMEOUT" || "$TIMEOUT" =~ ^[0-9]+$ ]] || die "--timeout must be a number of seconds, got '$TIMEOUT'"

mkdir -p "$DIR" || die "cannot create $DIR"
DIR=$(cd "$DIR" && pwd)

# ---- helpers --------------------------------------------------------------------------------

pidfile() { echo "$DIR/tidb-$1.pid"; }

# pid of instance $1 if it runs (alive, not a zombie, really our tidb-server), else empty
running_pid() { live_pid "$(pidfile "$1")" "$DIR/tidb-$1.toml"; }

http_code() {
  curl -s -o /dev/null -w '%{http_code}' --connect-timeout 1 --max-time 2 "http://$1:$STATUS_PORT/status" 2>/dev/null || true
}

# every known instance number of DIR, ascending
known_instances() {
  local f n
  for f in "$DIR"/tidb-*.toml; do
    [[ -e "$f" ]] || continue
    n=${f##*/tidb-}; n=${n%.toml}
    [[ "$n" =~ ^[0-9]+$ ]] && echo "$n"
  done | sort -n
}

listening() {  # true if something listens on $1:$2 (or on the wildcard address)
  ss -Hltn 2>/dev/null | awk '{print $4}' | grep -qE "^(\\[?::\\]?|0\\.0\\.0\\.0|\\*|$1):$2\$"
}

tail_log() {
  local i=$1 f
  for f in "$DIR/tidb-$i.stderr" "$DIR/tidb-$i.log"; do
    if [[ -s "$f" ]]; then
      echo "---- last 25 lines of $f ----" >&2
      tail -n 25 "$f" >&2 || true
    fi
  done
}

find_binary() {
  if [[ -n "${TIDB_SERVER:-}" ]]; then
    [[ -x "$TIDB_SERVER" ]] || die "TIDB_SERVER=$TIDB_SERVER is not an executable file"
    echo "$TIDB_SERVER"
    return
  fi
  local b
  b=$("$SCRIPT_DIR/build-tidb.sh") || die "tests/scripts/build-tidb.sh failed (see its output above)"
  b=$(tail -n 1 <<<"$b")
  [[ -x "$b" ]] || die "build-tidb.sh printed '$b', which is not an executable"
  echo "$b"
}

# A self-signed ECDSA P-256 cert for CN $1: key $2, cert $3, each written whole or not at all.
new_self_signed() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 -days 3650 \
    -subj "/CN=$1" -keyout "$2.tmp" -out "$3.tmp" 2>/dev/null || return 1
  mv -f "$2.tmp" "$2"
  mv -f "$3.tmp" "$3"
}

ensure_signing_cert() {
  local cert="$DIR/session-cert.pem" key="$DIR/session-key.pem"
  [[ -s "$cert" && -s "$key" ]] && return 0
  command -v openssl >/dev/null || die "openssl is required (tests/scripts/install-deps.sh)"
  (
    # serialise concurrent 'start' calls on the same DIR
    if command -v flock >/dev/null; then flock 9; fi
    if [[ ! -s "$cert" || ! -s "$key" ]]; then
      log "generating session-token signing cert $cert"
      # ECDSA P-256: TiDB signs a session token on every migration, and an ECDSA signature
      # costs a fraction of an RSA-2048 one.
      new_self_signed tiproxy-tidb-session "$key" "$cert" || die "openssl failed to create the signing cert"
    fi
  ) 9>"$DIR/.cert.lock"
}

# DIR/tls-ca.pem and, for instance $1, a server cert for its IP signed by that CA
ensure_tls_cert() {
  local i=$1 ip ca="$DIR/tls-ca.pem" ca_key="$DIR/tls-ca-key.pem"
  local cert="$DIR/tidb-$1-cert.pem" key="$DIR/tidb-$1-key.pem"
  ip=$(ip_of "$i")
  [[ -s "$cert" && -s "$key" ]] && return 0
  (
    # serialise concurrent 'start' calls on the same DIR (they share the CA and its serial file)
    if command -v flock >/dev/null; then flock 9; fi
    if [[ ! -s "$ca" || ! -s "$ca_key" ]]; then
      log "generating TLS CA $ca"
      new_self_signed tiproxy-tidb-test-ca "$ca_key" "$ca" || die "openssl failed to create the TLS CA"
    fi
    if ! openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -sha256 \
        -subj "/CN=$ip" -keyout "$key.tmp" -out "$cert.csr" 2>/dev/null; then
      die "openssl failed to create the TLS key of tidb $i"
    fi
    if ! openssl x509 -req -sha256 -days 3650 -in "$cert.csr" -CA "$ca" -CAkey "$ca_key" \
        -CAcreateserial -extfile <(printf 'subjectAltName=IP:%s\n' "$ip") -out "$cert.tmp" 2>/dev/null; then
      die "openssl failed to sign the TLS cert of tidb $i"
    fi
    rm -f "$cert.csr"
    mv -f "$key.tmp" "$key"
    mv -f "$cert.tmp" "$cert"
  ) 9>"$DIR/.cert.lock" || exit 1
}

write_config() {
  local i=$1 tmp="$DIR/tidb-$1.tmp" tls=""
  if [[ $TLS -eq 1 ]]; then
    tls=$(printf 'ssl-cert = "%s"\nssl-key = "%s"' "$DIR/tidb-$i-cert.pem" "$DIR/tidb-$i-key.pem")
  fi
  cat > "$DIR/tidb-$i.toml" <<EOF
# generated by tests/scripts/tidb.sh for instance $i ($(ip_of "$i")); rewritten on every start
graceful-wait-before-shutdown = $GRACEFUL_WAIT
temp-dir = "$tmp/temp"
tmp-storage-path = "$tmp/tmp-storage"
# the SQL listener is a TCP port; no unix socket (also forced by -socket "")
socket = ""

[log]
slow-query-file = "$DIR/tidb-$i-slow.log"

[security]
session-token-signing-cert = "$DIR/session-cert.pem"
session-token-signing-key = "$DIR/session-key.pem"
$tls

[proxy-protocol]
networks = "*"
fallbackable = true

[status]
report-status = true
# the status server binds 0.0.0.0 by default, which would clash between instances
status-host = "$(ip_of "$i")"
EOF
}

# ---- start ----------------------------------------------------------------------------------

STARTED_FIRST=0
STARTED_LAST=-1
kill_started() {
  local i pid k
  for ((i = STARTED_FIRST; i <= STARTED_LAST; i++)); do
    pid=$(running_pid "$i")
    [[ -n "$pid" ]] || continue
    log "start failed: killing tidb $i (pid $pid)"
    kill -KILL "$pid" 2>/dev/null || true
    for ((k = 0; k < 40; k++)); do
      [[ -n "$(running_pid "$i")" ]] || break
      sleep 0.25
    done
  done
}

cmd_start() {
  [[ -n "$N" ]] || { usage >&2; die "start needs the number of instances N"; }
  [[ ${#INSTANCES[@]} -eq 0 ]] || die "unexpected arguments: ${INSTANCES[*]}"
  (( N >= 1 )) || die "N must be >= 1"
  (( FIRST >= 1 && FIRST + N - 1 <= 244 )) || die "instances must be within 1..244 (127.0.0.11..127.0.0.254)"
  local timeout=${TIMEOUT:-120}
  command -v curl >/dev/null || die "curl is required (tests/scripts/install-deps.sh)"
  local client
  client=$(command -v mysql || command -v mariadb) || die "a mysql/mariadb command-line client is required (tests/scripts/install-deps.sh)"

  local i ip pid last=$((FIRST + N - 1))
  for ((i = FIRST; i <= last; i++)); do
    ip=$(ip_of "$i")
    pid=$(running_pid "$i")
    [[ -z "$pid" ]] || die "tidb $i is already running (pid $pid, $ip:$SQL_PORT); run '$PROG stop --dir $DIR $i' first"
    listening "$ip" "$SQL_PORT" && die "$ip:$SQL_PORT is already in use (another TiDB from a different --dir?)"
    listening "$ip" "$STATUS_PORT" && die "$ip:$STATUS_PORT is already in use (another TiDB from a different --dir?)"
  done

  local bin
  bin=$(find_binary)
  ensure_signing_cert

  local start_ts=$SECONDS
  # on any failure below, kill whatever this invocation started
  STARTED_FIRST=$FIRST STARTED_LAST=$last
  trap kill_started EXIT
  for ((i = FIRST; i <= last; i++)); do
    ip=$(ip_of "$i")
    local store_path=""
    if [[ $PERSISTENT -eq 1 ]]; then
      store_path="$DIR/tidb-$i.data"
      mkdir -p "$store_path"
    fi
    rm -rf "$DIR/tidb-$i.tmp"
    mkdir -p "$DIR/tidb-$i.tmp/temp" "$DIR/tidb-$i.tmp/tmp-storage" "$DIR/tidb-$i.tmp/os"
    rm -f "$(pidfile "$i")"
    [[ $TLS -eq 1 ]] && ensure_tls_cert "$i"
    write_config "$i"
    : > "$DIR/tidb-$i.stderr"
    # setsid: own session, so the server outlives the caller and its process group.
    # The inner shell records its pid, then exec's tidb-server under that same pid.
    # shellcheck disable=SC2016  # $$ and "$@" are for the inner shell
    TMPDIR="$DIR/tidb-$i.tmp/os" setsid bash -c 'echo $$ > "$1"; shift; exec "$@"' _ "$(pidfile "$i")" \
      "$bin" -store unistore -path "$store_path" \
      -host "$ip" -advertise-address "$ip" -P "$SQL_PORT" -status "$STATUS_PORT" -status-host "$ip" \
      -socket "" -config "$DIR/tidb-$i.toml" -config-strict \
      -log-file "$DIR/tidb-$i.log" \
      </dev/null >>"$DIR/tidb-$i.stderr" 2>&1 &
  done

  # wait for every instance: /status 200, then a SQL login
  local deadline=$((SECONDS + timeout)) code err
  for ((i = FIRST; i <= last; i++)); do
    ip=$(ip_of "$i")
    while :; do
      pid=$(running_pid "$i")
      if [[ -z "$pid" && $((SECONDS - start_ts)) -ge 2 ]]; then
        tail_log "$i"
        die "tidb $i exited during start-up (log $DIR/tidb-$i.log, stderr $DIR/tidb-$i.stderr)"
      fi
      code=$(http_code "$ip")
      if [[ "$code" == 200 ]]; then
        if err=$("$client" --no-defaults --connect-timeout=5 -h "$ip" -P "$SQL_PORT" -u root -e 'select 1' 2>&1 >/dev/null); then
          break
        fi
      fi
      if (( SECONDS >= deadline )); then
        tail_log "$i"
        die "tidb $i ($ip) not ready after ${timeout}s: GET /status -> ${code:-no answer}${err:+, SQL login: $err}"
      fi
      sleep 0.5
    done
  done
  trap - EXIT
  log "$N instance(s) ready in $((SECONDS - start_ts))s"
  for ((i = FIRST; i <= last; i++)); do
    ip=$(ip_of "$i")
    echo "tidb $i sql=$ip:$SQL_PORT status=$ip:$STATUS_PORT pid=$(running_pid "$i")"
  done
}

# ---- stop -----------------------------------------------------------------------------------

wait_gone() {  # instance, seconds; true when gone
  local i=$1 t=$(( $2 * 4 )) k
  for ((k = 0; k < t; k++)); do
    [[ -n "$(running_pid "$i")" ]] || return 0
    sleep 0.25
  done
  [[ -z "$(running_pid "$i")" ]]
}

# The kernel may keep a dead process's listening sockets for a moment; a restart right after
# `stop` must not find its address taken.
wait_ports_free() {
  local ip="127.0.0.$((10 + $1))" k
  for ((k = 0; k < 40; k++)); do
    ss -Hltn "( src $ip:4000 or src $ip:10080 )" 2>/dev/null | grep -q . || return 0
    sleep 0.25
  done
  log "warning: $ip:4000 or :10080 still in use after tidb $1 exited"
}

cmd_stop() {
  local list=("${INSTANCES[@]}")
  if [[ ${#list[@]} -eq 0 ]]; then
    mapfile -t list < <(known_instances)
  fi
  local i pid gw extra=${TIMEOUT:-60} stopping=()
  for i in "${list[@]}"; do
    pid=$(running_pid "$i")
    if [[ -z "$pid" ]]; then
      [[ ${#INSTANCES[@]} -eq 0 ]] || log "tidb $i is not running"
      rm -f "$(pidfile "$i")"
      continue
    fi
    if [[ $GRACEFUL -eq 1 ]]; then
      kill -TERM "$pid" 2>/dev/null || true
    else
      kill -KILL "$pid" 2>/dev/null || true
    fi
    stopping+=("$i:$pid")
  done
  local item
  for item in "${stopping[@]}"; do
    i=${item%%:*}; pid=${item#*:}
    if [[ $GRACEFUL -eq 1 ]]; then
      gw=$(sed -n 's/^graceful-wait-before-shutdown = \([0-9]*\)$/\1/p' "$DIR/tidb-$i.toml" 2>/dev/null)
      if ! wait_gone "$i" $(( ${gw:-0} + extra )); then
        log "tidb $i (pid $pid) still alive $(( ${gw:-0} + extra ))s after SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
      fi
    fi
    wait_gone "$i" 30 || die "could not stop tidb $i (pid $pid)"
    wait_ports_free "$i"
    rm -f "$(pidfile "$i")"
    rm -rf "$DIR/tidb-$i.tmp"
    log "stopped tidb $i (pid $pid)"
  done
}

# ---- status ---------------------------------------------------------------------------------

cmd_status() {
  local i ip pid any=0
  while read -r i; do
    [[ -n "$i" ]] || continue
    ip=$(ip_of "$i")
    pid=$(running_pid "$i")
    if [[ -n "$pid" ]]; then
      any=1
      echo "tidb $i sql=$ip:$SQL_PORT status=$ip:$STATUS_PORT pid=$pid state=running http=$(http_code "$ip")"
    else
      echo "tidb $i sql=$ip:$SQL_PORT status=$ip:$STATUS_PORT pid=- state=stopped"
    fi
  done < <(known_instances)
  [[ $any -eq 1 ]] || return 3
}

case "$CMD" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  -h|--help|help) usage ;;
  *) usage >&2; die "unknown command: $CMD" ;;
esac
