#!/usr/bin/env bash
# Installs what tiproxy's integration tests need on a Debian (bookworm) machine, as root.
# Idempotent: installs only missing packages, runs `apt-get update` at most once, and succeeds
# when everything is already there. Debian's maintainer scripts are prevented from starting the
# system MariaDB/etcd/haproxy services, and any system MariaDB is stopped so that ports 3306/3307
# stay free for the private one started by tests/scripts/mariadb.sh.
#
# Go (for tests/scripts/build-tidb.sh) is not installed here.
set -euo pipefail

PROG=$(basename "$0")
APT_PKGS=(mariadb-server mariadb-client etcd-server etcd-client haproxy sysbench openssl
          protobuf-compiler libprotobuf-dev
          python3-pip curl procps)
PY_MODS=(pytest pymysql cryptography)   # pip names; import names are the same

usage() {
  cat <<EOF
Usage: $PROG [--no-apt] [--no-pip]

Installs (only when missing) the Debian packages
  ${APT_PKGS[*]}
and the Python modules ${PY_MODS[*]} for the python3 first on PATH ($(command -v python3 || echo 'none yet')).
Must run as root (or with sudo available). Safe to re-run.
EOF
}

die() { echo "$PROG: error: $*" >&2; exit 1; }
log() { echo "$PROG: $*" >&2; }

DO_APT=1
DO_PIP=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --no-apt) DO_APT=0; shift ;;
    --no-pip) DO_PIP=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || die "must run as root (sudo not available)"
  SUDO=(sudo)
fi

installed() {
  [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

# ---- Debian packages ------------------------------------------------------------------------
POLICY=/usr/sbin/policy-rc.d
CREATED_POLICY=0
cleanup() {
  if [[ $CREATED_POLICY -eq 1 ]]; then
    "${SUDO[@]}" rm -f "$POLICY"
  fi
}
trap cleanup EXIT

if [[ $DO_APT -eq 1 ]]; then
  command -v apt-get >/dev/null || die "apt-get not found: this script targets Debian/Ubuntu"
  missing=()
  for p in "${APT_PKGS[@]}"; do
    installed "$p" || missing+=("$p")
  done
  if [[ ${#missing[@]} -eq 0 ]]; then
    log "all Debian packages already installed"
  else
    log "installing: ${missing[*]}"
    # Keep maintainer scripts from starting services (invoke-rc.d honours policy-rc.d exit 101).
    if [[ ! -e "$POLICY" ]]; then
      printf '#!/bin/sh\n# temporary, created by %s: do not start services during apt-get install\nexit 101\n' "$PROG" \
        | "${SUDO[@]}" tee "$POLICY" >/dev/null
      "${SUDO[@]}" chmod 755 "$POLICY"
      CREATED_POLICY=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q \
      || die "apt-get update failed"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}" \
      || die "apt-get install ${missing[*]} failed"
    cleanup
    CREATED_POLICY=0
  fi
fi

# ---- System services: never let a system MariaDB/etcd run -----------------------------------
stop_service() {
  local svc=$1
  if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
    if systemctl list-unit-files "$svc.service" >/dev/null 2>&1; then
      "${SUDO[@]}" systemctl disable --now "$svc.service" >/dev/null 2>&1 || true
    fi
  elif [[ -x /etc/init.d/$svc ]]; then
    # no systemd (container): the init script stops a running daemon, if any
    if "${SUDO[@]}" /etc/init.d/"$svc" status >/dev/null 2>&1; then
      log "stopping system service $svc"
      "${SUDO[@]}" /etc/init.d/"$svc" stop >/dev/null 2>&1 || true
    fi
  fi
}
for svc in mariadb mysql etcd haproxy; do
  stop_service "$svc"
done

# Anything still listening on 3306/3307 that is not a private test MariaDB is an error.
if command -v ss >/dev/null; then
  for port in 3306 3307; do
    while read -r pid; do
      [[ -n "$pid" ]] || continue
      cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)
      cnf=$(sed -n 's/.*--defaults-file=\([^ ]*\).*/\1/p' <<<"$cmd")
      if [[ -n "$cnf" ]] && grep -q '^# tiproxy-test mariadb' "$cnf" 2>/dev/null; then
        log "port $port: private test MariaDB (pid $pid, $cnf) — left alone"
        continue
      fi
      die "port $port is held by pid $pid ($cmd); stop it (e.g. 'service mariadb stop') — tests need 3306/3307 free"
    done < <(ss -Hltnp "( sport = :$port )" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u)
  done
fi

# ---- Python modules -------------------------------------------------------------------------
if [[ $DO_PIP -eq 1 ]]; then
  command -v python3 >/dev/null || die "python3 not found (install python3 or python3-pip)"
  PY=$(command -v python3)
  if "$PY" -c 'import pytest, pymysql, cryptography' >/dev/null 2>&1; then
    log "python modules already installed for $PY"
  else
    "$PY" -m pip --version >/dev/null 2>&1 || die "$PY has no pip module (install python3-pip)"
    pip_args=(install --quiet --disable-pip-version-check)
    # Debian's system python is "externally managed" (PEP 668): pip refuses without this flag.
    if "$PY" -c 'import os, sys, sysconfig; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)'; then
      pip_args+=(--break-system-packages)
    fi
    PIP=("$PY" -m pip)
    # root-owned system python needs root; a user's pyenv/venv python does not
    if [[ ! -w "$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" ]]; then
      PIP=("${SUDO[@]}" "$PY" -m pip)
    fi
    export PIP_ROOT_USER_ACTION=ignore
    log "pip ${pip_args[*]} ${PY_MODS[*]} (python: $PY)"
    "${PIP[@]}" "${pip_args[@]}" "${PY_MODS[@]}" || die "pip install ${PY_MODS[*]} failed"
    "$PY" -c 'import pytest, pymysql, cryptography' || die "python modules still not importable by $PY"
  fi
fi

log "done"
