# shellcheck shell=bash
# Helpers shared by the test-bed scripts (sourced; the caller sets PROG).

die() { echo "$PROG: error: $*" >&2; exit 1; }
log() { echo "$PROG: $*" >&2; }

# The first of the named programs found on PATH, /usr/bin or /usr/sbin.
find_bin() {
  local b
  for b in "$@"; do
    if command -v "$b" >/dev/null 2>&1; then command -v "$b"; return 0; fi
    if [[ -x /usr/bin/$b ]]; then echo "/usr/bin/$b"; return 0; fi
    if [[ -x /usr/sbin/$b ]]; then echo "/usr/sbin/$b"; return 0; fi
  done
  return 1
}

# Prints the pid recorded in PIDFILE if that process is alive (not a zombie: PID 1 here does not
# reap orphans) and its command line contains PATTERN, so a recycled pid is never mistaken for
# ours.
live_pid() {
  local pidfile=$1 pattern=$2 pid state
  [[ -s "$pidfile" ]] || return 0
  pid=$(<"$pidfile")
  [[ "$pid" =~ ^[0-9]+$ && -r /proc/$pid/stat ]] || return 0
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)
  [[ -n "$state" && "$state" != Z ]] || return 0
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qE -- "$pattern" || return 0
  echo "$pid"
}

# True if something listens on port $1 (any address) or accepts on 127.0.0.1:$1.
port_in_use() {
  ss -Hltn "( sport = :$1 )" 2>/dev/null | grep -q . && return 0
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
  return 1
}

# True while process $1 exists and is not a zombie.
alive() { [[ -r /proc/$1/stat ]] && [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]; }

# Stops the given child processes: SIGTERM to all, up to 5 s each to exit, then SIGKILL.
stop_children() {
  local pid
  for pid in "$@"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "$@"; do
    for _ in {1..50}; do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}

tail_log() {
  if [[ -f "$1" ]]; then
    echo "---- last 30 lines of $1 ----" >&2
    tail -n 30 "$1" >&2 || true
  fi
}
