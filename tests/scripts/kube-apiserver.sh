#!/usr/bin/env bash
# A private Kubernetes control plane for the operator and Helm chart tests: a real etcd 3.6 and a
# real kube-apiserver (both built from their Go modules by tests/scripts/build-go-tool.sh), on free
# 127.0.0.1 ports, everything under DIR. No controller-manager, scheduler or kubelet: objects are
# stored, validated (OpenAPI schemas, CEL, admission) and watched, but Deployments never create
# Pods and nothing garbage-collects — tests create Pods themselves.
#
# Authentication is a static bearer token (--token-auth-file) for user "admin" in group
# system:masters; authorization is RBAC, so ServiceAccounts get only what their Roles grant. The
# ServiceAccount admission plugin is disabled because there is no token controller to create the
# default ServiceAccount of each namespace (Pods would be rejected without it).
#
# Files under DIR: kubeconfig (server, CA, token — what 'start' prints), certs/ (CA, serving
# cert, service-account key pair), tokens.csv, etcd-data/, etcd.log, kube-apiserver.log,
# etcd.pid, kube-apiserver.pid, watchdog.pid, ports.
set -euo pipefail

PROG=$(basename "$0")
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() {
  cat <<EOF
Usage:
  $PROG start  --dir DIR [--timeout S] [--watch-pid PID] [--rm-on-exit]
  $PROG stop   --dir DIR [--rm]
  $PROG status --dir DIR

  --dir DIR        state directory (created if missing; 'start' wipes its etcd data)
  --timeout S      seconds to wait for /readyz (default 120)
  --watch-pid PID  start a watchdog that stops etcd and kube-apiserver when PID exits (a test
                   process that crashes or is killed does not leak servers)
  --rm-on-exit     with --watch-pid: the watchdog also removes DIR after stopping the servers
  --rm             stop: remove DIR afterwards

'start' prints the path of DIR/kubeconfig on stdout (progress goes to stderr).
Binaries: \$TIPROXY_KUBE_APISERVER and \$TIPROXY_ETCD3 if set, else the ones cached/built by
tests/scripts/build-go-tool.sh (kube-apiserver v1.36, etcd v3.6). Needs openssl and curl.
EOF
}

# shellcheck source=common.sh
source "$SCRIPT_DIR/common.sh"

CMD=${1:-}
[[ -n "$CMD" ]] || { usage >&2; exit 2; }
shift
case "$CMD" in -h|--help|help) usage; exit 0 ;; esac

DIR=""
TIMEOUT=120
WATCH_PID=""
RM_ON_EXIT=0
RM=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir) [[ $# -ge 2 ]] || die "--dir needs a value"; DIR=$2; shift 2 ;;
    --dir=*) DIR=${1#*=}; shift ;;
    --timeout) [[ $# -ge 2 ]] || die "--timeout needs a value"; TIMEOUT=$2; shift 2 ;;
    --timeout=*) TIMEOUT=${1#*=}; shift ;;
    --watch-pid) [[ $# -ge 2 ]] || die "--watch-pid needs a value"; WATCH_PID=$2; shift 2 ;;
    --watch-pid=*) WATCH_PID=${1#*=}; shift ;;
    --rm-on-exit) RM_ON_EXIT=1; shift ;;
    --rm) RM=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
[[ -n "$DIR" ]] || die "--dir is required"
[[ "$TIMEOUT" =~ ^[0-9]+$ && $TIMEOUT -ge 1 ]] || die "--timeout must be a number of seconds, got '$TIMEOUT'"
[[ -z "$WATCH_PID" || "$WATCH_PID" =~ ^[0-9]+$ ]] || die "--watch-pid must be a pid, got '$WATCH_PID'"
mkdir -p "$DIR" 2>/dev/null || true
DIR=$(cd "$DIR" 2>/dev/null && pwd) || die "cannot use directory $DIR"

CERTS="$DIR/certs"
DATADIR="$DIR/etcd-data"
ETCD_PID="$DIR/etcd.pid"
API_PID="$DIR/kube-apiserver.pid"
WATCHDOG_PID="$DIR/watchdog.pid"
ETCD_LOG="$DIR/etcd.log"
API_LOG="$DIR/kube-apiserver.log"
KUBECONFIG_FILE="$DIR/kubeconfig"
PORTS="$DIR/ports"
TOKENS="$DIR/tokens.csv"

# pids of our servers (alive, not zombies, and really started with our DIR)
etcd_pid() { live_pid "$ETCD_PID" "--data-dir $DATADIR"; }
api_pid() { live_pid "$API_PID" "--token-auth-file $TOKENS"; }
watchdog_pid() { live_pid "$WATCHDOG_PID" "kube-apiserver.sh _watch"; }

# The start time of process $1 (clock ticks since boot): with the pid it names a process
# uniquely, so a recycled pid is not mistaken for the watched one.
start_time() { awk '{print $22}' "/proc/$1/stat" 2>/dev/null || true; }

# Binary from env var $1, else build-go-tool.sh $2 (cached; prints the path on its last line).
tool() {
  local var=$1 name=$2 path
  path=${!var:-}
  if [[ -z "$path" ]]; then
    path=$(bash "$SCRIPT_DIR/build-go-tool.sh" "$name" | tail -n 1) \
      || die "building $name failed (tests/scripts/build-go-tool.sh $name)"
  fi
  [[ -x "$path" ]] || die "$name binary '$path' is not executable (\$$var or build-go-tool.sh $name)"
  echo "$path"
}

# A random port that nothing listens on, not in $@ (already chosen), and outside the kernel's
# ephemeral range: a port inside it can be taken between this check and the server's bind by any
# outgoing connection, and kube-apiserver opens dozens to etcd while it starts (CI saw three
# attempts in a row lose that race). 26000..(range start) also stays clear of the migration
# tests' etcd ports (23000..25000, tests/src/cluster.rs).
free_port() {
  local p i taken lo hi
  read -r lo hi </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || { lo=32768; hi=60999; }
  local base=26000 span=$((lo - 26000))
  if (( span < 1000 )); then base=$((hi + 1)); span=$((65536 - base)); fi
  (( span >= 100 )) || return 1
  for ((i = 0; i < 200; i++)); do
    p=$((base + (RANDOM * 32768 + RANDOM) % span))
    taken=0
    for q in "$@"; do [[ "$p" == "$q" ]] && taken=1; done
    [[ $taken -eq 0 ]] || continue
    port_in_use "$p" || { echo "$p"; return 0; }
  done
  return 1
}

gen_certs() {
  rm -rf "$CERTS"
  mkdir -p "$CERTS"
  (
    cd "$CERTS"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=tiproxy-test-kube-ca" \
      -keyout ca.key -out ca.crt
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
      -keyout apiserver.key -out apiserver.csr
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n' >apiserver.ext
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile apiserver.ext -out apiserver.crt
    # Service-account token signing key pair (kube-apiserver refuses to start without one).
    openssl genrsa -out sa.key 2048
    openssl rsa -in sa.key -pubout -out sa.pub
  ) >"$DIR/openssl.log" 2>&1 || { tail_log "$DIR/openssl.log"; die "openssl failed (log $DIR/openssl.log)"; }
}

write_kubeconfig() {
  local port=$1 token=$2 ca
  ca=$(base64 -w0 <"$CERTS/ca.crt")
  cat >"$KUBECONFIG_FILE.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: tiproxy-test
  cluster:
    server: https://127.0.0.1:$port
    certificate-authority-data: $ca
users:
- name: admin
  user:
    token: $token
contexts:
- name: tiproxy-test
  context:
    cluster: tiproxy-test
    user: admin
    namespace: default
current-context: tiproxy-test
EOF
  chmod 600 "$KUBECONFIG_FILE.tmp"
  mv "$KUBECONFIG_FILE.tmp" "$KUBECONFIG_FILE"
}

# Number of the line the next write to log $1 starts (the logs are appended across attempts).
next_line() { echo $(( $(wc -l 2>/dev/null <"$1" || echo 0) + 1 )); }

# Server $1 exited while starting. Returns 3 when its log $2, from line $3 on (this attempt's
# part), says a port was taken meanwhile (the caller retries); otherwise shows the log and dies.
start_failed() {
  if tail -n +"$3" "$2" 2>/dev/null | grep -q "address already in use"; then
    log "$1: a port was taken meanwhile; retrying with other ports"
    return 3
  fi
  tail_log "$2"
  die "$1 exited during start-up (log $2)"
}

# One attempt to start etcd + kube-apiserver on fresh ports. While a server starts, it is checked
# by its pid alone (alive), not with etcd_pid/api_pid: until the forked child has exec'd the
# server, its command line is still this shell's, so the pattern would not match yet and a busy
# machine would see a server that "exited during start-up". Returns 3 when a port was taken by
# someone else in the meantime (the caller retries), dies on any other failure.
start_once() {
  local etcd=$1 apiserver=$2 token=$3 ep pp ap waited code from pid
  ep=$(free_port) || die "no free port for etcd"
  pp=$(free_port "$ep") || die "no free port for etcd's peer URL"
  ap=$(free_port "$ep" "$pp") || die "no free port for kube-apiserver"
  echo "etcd=$ep etcd-peer=$pp apiserver=$ap" >"$PORTS"

  rm -rf "$DATADIR"
  log "starting etcd on 127.0.0.1:$ep (peer $pp, data $DATADIR)"
  # setsid: detach from the caller's process group so the servers outlive this script; all
  # output to files, so a caller reading our stdout is not kept waiting by the servers.
  # --unsafe-no-fsync: a throw-away store; fsync would dominate the tests' latency.
  from=$(next_line "$ETCD_LOG")
  setsid "$etcd" \
    --name tiproxy-kube-test \
    --data-dir "$DATADIR" \
    --listen-client-urls "http://127.0.0.1:$ep" \
    --advertise-client-urls "http://127.0.0.1:$ep" \
    --listen-peer-urls "http://127.0.0.1:$pp" \
    --initial-advertise-peer-urls "http://127.0.0.1:$pp" \
    --initial-cluster "tiproxy-kube-test=http://127.0.0.1:$pp" \
    --initial-cluster-state new \
    --initial-cluster-token "tiproxy-kube-test-$ep" \
    --unsafe-no-fsync \
    --quota-backend-bytes $((1024 * 1024 * 1024)) \
    --log-level warn \
    </dev/null >>"$ETCD_LOG" 2>&1 &
  pid=$!
  echo "$pid" >"$ETCD_PID"

  waited=0
  until curl -fsS --max-time 2 "http://127.0.0.1:$ep/health" 2>/dev/null | grep -q '"health":"true"'; do
    alive "$pid" || { start_failed etcd "$ETCD_LOG" "$from"; return; }
    (( waited < TIMEOUT * 4 )) || { tail_log "$ETCD_LOG"; die "etcd not healthy after ${TIMEOUT}s (log $ETCD_LOG)"; }
    sleep 0.25
    waited=$((waited + 1))
  done

  log "starting kube-apiserver on https://127.0.0.1:$ap"
  # --endpoint-reconciler-type=none: the 'kubernetes' Service's endpoints would be 127.0.0.1,
  #   which Endpoints validation rejects (loopback), so the reconciler would log errors forever.
  # --disable-admission-plugins=ServiceAccount: no controller-manager creates the 'default'
  #   ServiceAccount, and Pods would be rejected without it.
  from=$(next_line "$API_LOG")
  setsid "$apiserver" \
    --etcd-servers "http://127.0.0.1:$ep" \
    --bind-address 127.0.0.1 \
    --advertise-address 127.0.0.1 \
    --secure-port "$ap" \
    --cert-dir "$CERTS" \
    --tls-cert-file "$CERTS/apiserver.crt" \
    --tls-private-key-file "$CERTS/apiserver.key" \
    --client-ca-file "$CERTS/ca.crt" \
    --service-account-key-file "$CERTS/sa.pub" \
    --service-account-signing-key-file "$CERTS/sa.key" \
    --service-account-issuer "https://127.0.0.1:$ap" \
    --token-auth-file "$TOKENS" \
    --authorization-mode RBAC \
    --disable-admission-plugins ServiceAccount \
    --service-cluster-ip-range 10.0.0.0/24 \
    --endpoint-reconciler-type none \
    --allow-privileged=true \
    --profiling=false \
    --v 1 \
    </dev/null >>"$API_LOG" 2>&1 &
  pid=$!
  echo "$pid" >"$API_PID"

  waited=0
  while :; do
    code=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 2 --cacert "$CERTS/ca.crt" \
      -H "Authorization: Bearer $token" "https://127.0.0.1:$ap/readyz" 2>/dev/null || true)
    [[ "$code" == 200 ]] && break
    alive "$pid" || { start_failed kube-apiserver "$API_LOG" "$from"; return; }
    if (( waited >= TIMEOUT * 4 )); then
      tail_log "$API_LOG"
      die "kube-apiserver not ready after ${TIMEOUT}s (last /readyz status: ${code:-none}; log $API_LOG)"
    fi
    sleep 0.25
    waited=$((waited + 1))
  done
  write_kubeconfig "$ap" "$token"
  log "kube-apiserver ready at https://127.0.0.1:$ap (pid $(<"$API_PID")), etcd pid $(<"$ETCD_PID"), after $((SECONDS - START))s"
}

# SIGTERM to pid $1, up to 10 s to exit, then SIGKILL. The servers are not our children (setsid)
# and may linger as zombies (PID 1 here does not always reap), hence 'alive', not 'kill -0'.
terminate() {
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 100; i++)); do
    alive "$pid" || return 0
    sleep 0.1
  done
  log "pid $pid ignored SIGTERM for 10s; killing"
  kill -KILL "$pid" 2>/dev/null || true
}

# Stops kube-apiserver, then etcd (the apiserver first, so it does not log etcd errors).
stop_servers() {
  local pid
  pid=$(api_pid)
  if [[ -n "$pid" ]]; then terminate "$pid"; fi
  pid=$(etcd_pid)
  if [[ -n "$pid" ]]; then terminate "$pid"; fi
  rm -f "$API_PID" "$ETCD_PID"
}

cmd_start() {
  local etcd apiserver token attempt rc pid
  START=$SECONDS
  [[ -z "$(api_pid)" && -z "$(etcd_pid)" ]] \
    || die "a control plane from $DIR is already running; run '$PROG stop --dir $DIR' first"
  if [[ -n "$WATCH_PID" ]] && ! alive "$WATCH_PID"; then
    die "--watch-pid $WATCH_PID is not a running process"
  fi
  command -v openssl >/dev/null || die "openssl not found (tests/scripts/install-deps.sh installs it)"
  command -v curl >/dev/null || die "curl not found (tests/scripts/install-deps.sh installs it)"
  etcd=$(tool TIPROXY_ETCD3 etcd)
  apiserver=$(tool TIPROXY_KUBE_APISERVER kube-apiserver)
  # A fresh admin token per start, so a kubeconfig of an earlier run cannot reach this one.
  token=$(openssl rand -hex 24)
  # token,user,uid,"group1,group2"
  printf '%s,admin,admin,"system:masters"\n' "$token" >"$TOKENS"
  chmod 600 "$TOKENS"
  rm -f "$KUBECONFIG_FILE"
  gen_certs
  # Whatever fails from here on (die exits), leave no half-started server behind.
  trap stop_servers EXIT

  for attempt in 1 2 3; do
    rc=0
    start_once "$etcd" "$apiserver" "$token" || rc=$?
    [[ $rc -eq 3 ]] || break
    stop_servers
    [[ $attempt -lt 3 ]] || die "could not find free ports after 3 attempts"
  done
  [[ $rc -eq 0 ]] || die "start failed"
  trap - EXIT

  if [[ -n "$WATCH_PID" ]]; then
    local args=(_watch --dir "$DIR" --watch-pid "$WATCH_PID")
    [[ $RM_ON_EXIT -eq 0 ]] || args+=(--rm-on-exit)
    # The watched pid's start time travels in the environment: the watchdog compares it, so it
    # notices the watched process exiting even if its pid is reused at once.
    WATCH_START=$(start_time "$WATCH_PID") setsid bash "$SCRIPT_DIR/$PROG" "${args[@]}" \
      </dev/null >>"$DIR/watchdog.log" 2>&1 &
    echo $! >"$WATCHDOG_PID"
    pid=$(<"$WATCHDOG_PID")
    log "watchdog pid $pid stops the servers when pid $WATCH_PID exits"
  fi
  echo "$KUBECONFIG_FILE"
}

# The watchdog (started by 'start --watch-pid'): polls the watched process once a second.
cmd_watch() {
  [[ -n "$WATCH_PID" ]] || die "_watch needs --watch-pid"
  local want=${WATCH_START:-}
  while alive "$WATCH_PID" && [[ -z "$want" || "$(start_time "$WATCH_PID")" == "$want" ]]; do
    # Stop watching when someone else already stopped the servers ('stop').
    [[ -n "$(api_pid)$(etcd_pid)" ]] || exit 0
    sleep 1
  done
  log "watched pid $WATCH_PID exited; stopping kube-apiserver and etcd of $DIR"
  stop_servers
  rm -f "$WATCHDOG_PID"
  if [[ $RM_ON_EXIT -eq 1 ]]; then
    rm -rf "$DIR"
  else
    # The etcd data is the only large part (its WAL is preallocated); logs and certs stay.
    rm -rf "$DATADIR"
  fi
}

cmd_stop() {
  local pid
  pid=$(watchdog_pid)
  if [[ -n "$pid" && "$pid" != "$$" ]]; then
    kill -TERM "$pid" 2>/dev/null || true
  fi
  rm -f "$WATCHDOG_PID"
  if [[ -z "$(api_pid)$(etcd_pid)" ]]; then
    log "no control plane from $DIR is running"
  else
    log "stopping kube-apiserver and etcd of $DIR"
    stop_servers
  fi
  if [[ $RM -eq 1 ]]; then rm -rf "$DIR"; fi
}

cmd_status() {
  local a e
  a=$(api_pid)
  e=$(etcd_pid)
  if [[ -n "$a" && -n "$e" ]]; then
    echo "kube-apiserver pid=$a etcd pid=$e kubeconfig=$KUBECONFIG_FILE ($(cat "$PORTS" 2>/dev/null))"
  else
    echo "control plane of $DIR is not running (kube-apiserver pid=${a:-none}, etcd pid=${e:-none})"
    exit 1
  fi
}

case "$CMD" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  _watch) cmd_watch ;;
  *) usage >&2; die "unknown command: $CMD" ;;
esac
