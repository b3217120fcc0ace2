#!/usr/bin/env bash
# shellcheck disable=SC2317  # functions are called through run_step and traps
# The one command that runs tiproxy's whole test suite against real servers:
#   1. builds the workspace (binaries and tests) and TiDB (tests/scripts/build-tidb.sh, cached);
#   2. builds (first run only; cached under ~/.cache/tiproxy-rs) helm, kube-apiserver and etcd 3.6
#      with tests/scripts/build-go-tool.sh, for the operator and Helm chart tests;
#   3. starts 2 TiDB servers and a private MariaDB in a temporary test-bed directory;
#   4. runs `cargo test --workspace`, then `python3 -m pytest -q tests/python` when that exists,
#      with TIPROXY_TEST_TIDB, TIPROXY_TEST_MARIADB, TIPROXY_TEST_MARIADB_CA, TIPROXY_BIN,
#      TIPROXY_HELM, TIPROXY_KUBE_APISERVER and TIPROXY_ETCD3 set;
#   5. always stops the servers it started (trap), prints a summary, exits non-zero on failure.
#
# TiDB instance i listens on 127.0.0.(10+i):4000; when 127.0.0.11/12 are taken (another test
# bed), the next free pair of instance numbers is used. MariaDB uses 3307, or the next free port.
# The session-migration tests (tests/tests/migration.rs) start and stop TiDBs and an etcd of
# their own: a free block of 17 instance numbers from 51 up (tests/src/cluster.rs).
# The operator and chart tests start one private etcd + kube-apiserver per test process on free
# 127.0.0.1 ports (tests/scripts/kube-apiserver.sh, tests/src/kube.rs); it stops by itself when
# the test process exits.
#
# Environment:
#   TIPROXY_TESTBED_DIR  where to put the test bed (default: a new directory under /tmp, removed
#                        afterwards unless something failed)
#   TIPROXY_REUSE_TESTBED=1  with TIPROXY_TEST_TIDB, TIPROXY_TEST_MARIADB and
#                        TIPROXY_TEST_MARIADB_CA already set: use those servers, start/stop none
#   CARGO_TEST_ARGS      extra arguments for cargo test (e.g. "-- --test-threads=1")
#   TIPROXY_MIGRATION_FIRST  first instance number of the migration tests' block (default: the
#                        first free one of 51, 68, 85, ...)
#   PYTEST_ARGS          extra arguments for pytest
#   TIPROXY_HELM, TIPROXY_KUBE_APISERVER, TIPROXY_ETCD3  use these binaries instead of building
#                        helm v3, kube-apiserver and etcd 3.6 (the system etcd is 3.4: too old)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRIPTS="$ROOT/tests/scripts"
cd "$ROOT" || exit 1

SUITE_START=$SECONDS
STEP_NAMES=()
STEP_RESULTS=()
STEP_TIMES=()
FAILED=0

log() { echo "run-all.sh: $*" >&2; }
banner() { printf '\n==== %s ====\n' "$*" >&2; }

# run_step NAME CMD...: runs a step, records its result and duration
run_step() {
  local name=$1 start=$SECONDS rc
  shift
  banner "$name"
  "$@"
  rc=$?
  STEP_NAMES+=("$name")
  STEP_TIMES+=($((SECONDS - start)))
  if [[ $rc -eq 0 ]]; then
    STEP_RESULTS+=("ok")
  else
    STEP_RESULTS+=("FAILED (exit $rc)")
    FAILED=1
  fi
  return "$rc"
}

summary() {
  local i
  printf '\n==== summary ====\n' >&2
  for i in "${!STEP_NAMES[@]}"; do
    printf '  %-34s %-18s %4ss\n' "${STEP_NAMES[$i]}" "${STEP_RESULTS[$i]}" "${STEP_TIMES[$i]}" >&2
  done
  printf '  %-34s %-18s %4ss\n' "total" "$([[ $FAILED -eq 0 ]] && echo ok || echo FAILED)" \
    $((SECONDS - SUITE_START)) >&2
  # a test that fails with ENOSPC fails many others; this line tells whether the disk was the cause
  printf '  free disk in %s: %s\n' "${TMPDIR:-/tmp}" \
    "$(df -h --output=avail "${TMPDIR:-/tmp}" 2>/dev/null | tail -n 1 | tr -d ' ')" >&2
}

# ---- test bed ---------------------------------------------------------------------------------

STARTED_TIDB=0
STARTED_MARIADB=0
TESTBED=""
OWN_TESTBED_DIR=0

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ $STARTED_TIDB -eq 1 ]]; then
    bash "$SCRIPTS/tidb.sh" stop --dir "$TESTBED/tidb" >&2 || log "warning: stopping TiDB failed"
  fi
  if [[ $STARTED_MARIADB -eq 1 ]]; then
    bash "$SCRIPTS/mariadb.sh" stop --dir "$TESTBED/mariadb" >&2 || log "warning: stopping MariaDB failed"
  fi
  if [[ -n "$TESTBED" && $OWN_TESTBED_DIR -eq 1 ]]; then
    if [[ $FAILED -eq 0 && $rc -eq 0 ]]; then
      rm -rf "$TESTBED"
    else
      log "test bed logs kept in $TESTBED"
    fi
  fi
  summary
  if [[ $FAILED -ne 0 && $rc -eq 0 ]]; then rc=1; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; FAILED=1; exit 130' INT TERM

listening() {  # true if something listens on $1:$2 (or on a wildcard address)
  ss -Hltn 2>/dev/null | awk '{print $4}' | grep -qE "^(\\[?::\\]?|0\\.0\\.0\\.0|\\*|$1):$2\$"
}

# first K such that instances K and K+1 have free SQL and status ports
free_tidb_first() {
  local k ip1 ip2
  for ((k = 1; k <= 200; k += 2)); do
    ip1="127.0.0.$((10 + k))" ip2="127.0.0.$((11 + k))"
    if ! listening "$ip1" 4000 && ! listening "$ip1" 10080 \
      && ! listening "$ip2" 4000 && ! listening "$ip2" 10080; then
      echo "$k"
      return 0
    fi
  done
  return 1
}

free_mariadb_port() {
  local p
  for ((p = 3307; p < 3400; p++)); do
    if ! listening 127.0.0.1 "$p"; then echo "$p"; return 0; fi
  done
  return 1
}

start_testbed() {
  local first port out
  if [[ -n "${TIPROXY_TESTBED_DIR:-}" ]]; then
    TESTBED=$TIPROXY_TESTBED_DIR
    mkdir -p "$TESTBED" || return 1
  else
    TESTBED=$(mktemp -d /tmp/tiproxy-testbed.XXXXXX) || return 1
    OWN_TESTBED_DIR=1
  fi
  first=$(free_tidb_first) || { log "no free pair of 127.0.0.x:4000 addresses for TiDB"; return 1; }
  port=$(free_mariadb_port) || { log "no free port for MariaDB in 3307..3399"; return 1; }
  log "test bed in $TESTBED (TiDB instances $first,$((first + 1)); MariaDB port $port)"

  STARTED_TIDB=1
  out=$(bash "$SCRIPTS/tidb.sh" start 2 --first "$first" --dir "$TESTBED/tidb") || return 1
  echo "$out" >&2
  STARTED_MARIADB=1
  out=$(bash "$SCRIPTS/mariadb.sh" start --port "$port" --dir "$TESTBED/mariadb") || return 1
  echo "$out" >&2

  export TIPROXY_TEST_TIDB="127.0.0.$((10 + first)):4000,127.0.0.$((11 + first)):4000"
  export TIPROXY_TEST_MARIADB="127.0.0.1:$port"
  export TIPROXY_TEST_MARIADB_CA="$TESTBED/mariadb/ssl/ca.pem"
}

# ---- steps ------------------------------------------------------------------------------------

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
[[ "$TARGET_DIR" = /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"

build_rust() {
  cargo build --workspace && cargo test --workspace --no-run
}

build_tidb() {
  if [[ -n "${TIDB_SERVER:-}" ]]; then
    log "using TIDB_SERVER=$TIDB_SERVER"
    [[ -x "$TIDB_SERVER" ]]
    return
  fi
  local out
  out=$(bash "$SCRIPTS/build-tidb.sh") || return 1
  log "tidb-server: $(tail -n 1 <<<"$out")"
}

# Exports TIPROXY_HELM, TIPROXY_KUBE_APISERVER and TIPROXY_ETCD3 (each kept when already set).
build_kube_tools() {
  local var tool path
  for var in TIPROXY_HELM:helm TIPROXY_KUBE_APISERVER:kube-apiserver TIPROXY_ETCD3:etcd; do
    tool=${var#*:}
    var=${var%%:*}
    path=${!var:-}
    if [[ -z "$path" ]]; then
      path=$(bash "$SCRIPTS/build-go-tool.sh" "$tool" | tail -n 1) || { log "building $tool failed"; return 1; }
    fi
    [[ -x "$path" ]] || { log "$tool binary '$path' is not executable"; return 1; }
    export "$var=$path"
    log "$var=$path"
  done
}

run_cargo_tests() {
  # shellcheck disable=SC2086  # CARGO_TEST_ARGS is split on purpose
  cargo test --workspace --no-fail-fast ${CARGO_TEST_ARGS:-}
}

run_pytest() {
  python3 -m pytest --version >/dev/null 2>&1 \
    || { log "pytest is not installed (tests/scripts/install-deps.sh)"; return 1; }
  local rc
  # shellcheck disable=SC2086
  python3 -m pytest -q tests/python ${PYTEST_ARGS:-}
  rc=$?
  if [[ $rc -eq 5 ]]; then
    log "pytest collected no tests in tests/python"
  fi
  return "$rc"
}

run_step "build workspace (cargo)" build_rust || exit 1
export TIPROXY_BIN=${TIPROXY_BIN:-$TARGET_DIR/debug/tiproxy}
[[ -x "$TIPROXY_BIN" ]] || { log "proxy binary $TIPROXY_BIN missing after the build"; FAILED=1; exit 1; }

run_step "build helm, kube-apiserver, etcd 3.6" build_kube_tools || exit 1

if [[ "${TIPROXY_REUSE_TESTBED:-0}" == 1 && -n "${TIPROXY_TEST_TIDB:-}" \
  && -n "${TIPROXY_TEST_MARIADB:-}" && -n "${TIPROXY_TEST_MARIADB_CA:-}" ]]; then
  log "reusing the running test bed: TiDB $TIPROXY_TEST_TIDB, MariaDB $TIPROXY_TEST_MARIADB"
else
  run_step "build TiDB" build_tidb || exit 1
  run_step "start TiDB x2 + MariaDB" start_testbed || exit 1
fi
log "TIPROXY_TEST_TIDB=$TIPROXY_TEST_TIDB TIPROXY_TEST_MARIADB=$TIPROXY_TEST_MARIADB"
log "TIPROXY_TEST_MARIADB_CA=$TIPROXY_TEST_MARIADB_CA TIPROXY_BIN=$TIPROXY_BIN"

run_step "cargo test --workspace" run_cargo_tests
if [[ -d "$ROOT/tests/python" ]]; then
  run_step "pytest tests/python" run_pytest
else
  log "no tests/python directory: skipping pytest"
fi
exit "$FAILED"
