"""Fixtures for tiproxy's PyMySQL compatibility suite.

The suite runs against REAL servers started by tests/scripts/{tidb.sh,mariadb.sh} (normally via
tests/run-all.sh), described by these environment variables:

  TIPROXY_BIN              proxy binary (default <repo>/target/debug/tiproxy)
  TIPROXY_TEST_TIDB        comma list of TiDB SQL addresses, e.g. 127.0.0.11:4000,127.0.0.12:4000
                           (status port: same IP, port 10080)
  TIPROXY_TEST_MARIADB     MariaDB SQL address, e.g. 127.0.0.1:3307
  TIPROXY_TEST_MARIADB_CA  CA certificate of that MariaDB (<dir>/ssl/ca.pem)

A missing variable is a test FAILURE (not a skip): run tests/run-all.sh.

Every TiDB instance is a separate volatile database, so tests that compare "through the proxy"
with "directly" use a proxy whose only backend is the FIRST TiDB of the list (or the MariaDB).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import pymysql
import pytest

REPO = Path(__file__).resolve().parents[2]
RUN_ALL_HINT = "run tests/run-all.sh (it starts TiDB and MariaDB and sets the TIPROXY_* variables)"
TEST_DB = "tp_test"
TIDB_STATUS_PORT = 10080
STARTED_TIMEOUT = 10.0
ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
STARTED_RE = re.compile(r"tiproxy started\b.*?\baddr=\"?([0-9A-Fa-f.:\[\]]+):(\d+)\"?.*?\bapi=\"?([0-9A-Fa-f.:\[\]]+):(\d+)")


# ---- environment -------------------------------------------------------------------------------


def _require_env(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        pytest.fail(f"environment variable {name} is not set; {RUN_ALL_HINT}", pytrace=False)
    return value


def _split_addr(addr: str) -> Tuple[str, int]:
    host, _, port = addr.strip().rpartition(":")
    if not host or not port.isdigit():
        pytest.fail(f"bad address {addr!r} (expected host:port); {RUN_ALL_HINT}", pytrace=False)
    return host, int(port)


def pytest_sessionstart(session):
    """Refuse to run (exit status 1, one clear message) when the test bed is not described."""
    missing = [n for n in ("TIPROXY_TEST_TIDB", "TIPROXY_TEST_MARIADB", "TIPROXY_TEST_MARIADB_CA")
               if not os.environ.get(n, "").strip()]
    if missing:
        pytest.exit(f"environment variable(s) {', '.join(missing)} not set; {RUN_ALL_HINT}",
                    returncode=1)


@dataclass(frozen=True)
class Env:
    bin: Path
    tidb: List[Tuple[str, int]]
    mariadb: Tuple[str, int]
    mariadb_ca: Path


@pytest.fixture(scope="session")
def env() -> Env:
    tidb = [_split_addr(a) for a in _require_env("TIPROXY_TEST_TIDB").split(",") if a.strip()]
    if not tidb:
        pytest.fail(f"TIPROXY_TEST_TIDB lists no address; {RUN_ALL_HINT}", pytrace=False)
    mariadb = _split_addr(_require_env("TIPROXY_TEST_MARIADB"))
    ca = Path(_require_env("TIPROXY_TEST_MARIADB_CA"))
    if not ca.is_file():
        pytest.fail(f"TIPROXY_TEST_MARIADB_CA={ca} is not a file; {RUN_ALL_HINT}", pytrace=False)
    binary = Path(os.environ.get("TIPROXY_BIN") or REPO / "target" / "debug" / "tiproxy")
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(
            f"proxy binary {binary} is missing or not executable (cargo build -p tiproxy, "
            f"or set TIPROXY_BIN); {RUN_ALL_HINT}",
            pytrace=False,
        )
    return Env(bin=binary, tidb=tidb, mariadb=mariadb, mariadb_ca=ca)


# ---- connections -------------------------------------------------------------------------------


def connect(host: str, port: int, **kw) -> pymysql.connections.Connection:
    """A PyMySQL connection with the suite's defaults (root, tp_test, utf8mb4, autocommit).

    PyMySQL >= 1.2 uses TLS whenever the server offers it ("preferred"); the suite wants to know
    which legs are encrypted, so TLS is off unless `ssl=` is given."""
    args = dict(
        host=host,
        port=port,
        user="root",
        password="",
        database=TEST_DB,
        charset="utf8mb4",
        autocommit=True,
        connect_timeout=10,
        read_timeout=60,
        write_timeout=60,
    )
    if "ssl" not in kw:
        args["ssl_disabled"] = True
    args.update(kw)
    return pymysql.connect(**args)


@dataclass
class Backend:
    """One kind of backend under test ("tidb" or "mariadb") and its direct address."""

    kind: str
    host: str
    port: int
    env: Env
    # the proxy's [proxy] backends entry (TOML inline value)
    toml_backend: str = ""

    @property
    def is_tidb(self) -> bool:
        return self.kind == "tidb"

    def connect(self, **kw) -> pymysql.connections.Connection:
        return connect(self.host, self.port, **kw)


def tidb_backend_toml(host: str, port: int) -> str:
    return f'{{ addr = "{host}:{port}", status-addr = "{host}:{TIDB_STATUS_PORT}" }}'


def _prepare_tidb(host: str, port: int) -> None:
    conn = connect(host, port, database=None)
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE IF NOT EXISTS {TEST_DB}")
    finally:
        conn.close()


@pytest.fixture(scope="session")
def tidb_prepared(env: Env) -> Env:
    for host, port in env.tidb:
        _prepare_tidb(host, port)
    return env


@pytest.fixture(params=["tidb", "mariadb"])
def backend(request, env: Env) -> Backend:
    if request.param == "tidb":
        request.getfixturevalue("tidb_prepared")
        host, port = env.tidb[0]
        return Backend("tidb", host, port, env, tidb_backend_toml(host, port))
    host, port = env.mariadb
    return Backend("mariadb", host, port, env, f'"{host}:{port}"')


# ---- the proxy process -------------------------------------------------------------------------


@dataclass
class ProxyProcess:
    config_path: Path
    log_path: Path
    proc: Optional[subprocess.Popen] = None
    host: str = ""
    port: int = 0
    api: Tuple[str, int] = ("", 0)
    _log_file: Optional[object] = field(default=None, repr=False)

    def log_text(self) -> str:
        try:
            return ANSI_RE.sub("", self.log_path.read_text(errors="replace"))
        except OSError as e:
            return f"<cannot read {self.log_path}: {e}>"

    def connect(self, **kw) -> pymysql.connections.Connection:
        return connect(self.host, self.port, **kw)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def base_toml(backends: List[str], extra: str = "") -> str:
    """A proxy config listening on ephemeral ports with the given TOML backend values."""
    return (
        "[proxy]\n"
        'addr = "127.0.0.1:0"\n'
        f"backends = [{', '.join(backends)}]\n"
        "graceful-close-conn-timeout = 1\n"
        "[api]\n"
        'addr = "127.0.0.1:0"\n'
        "[log]\n"
        'level = "info"\n'
        'format = "text"\n' + extra
    )


def _start(env: Env, toml: str, workdir: Path) -> ProxyProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    p = ProxyProcess(config_path=workdir / "tiproxy.toml", log_path=workdir / "tiproxy.stderr")
    p.config_path.write_text(toml)
    child_env = dict(os.environ)
    child_env.pop("RUST_LOG", None)  # the config's log level must win: we need the INFO line
    child_env["NO_COLOR"] = "1"
    p._log_file = open(p.log_path, "wb")
    p.proc = subprocess.Popen(
        [str(env.bin), "--config", str(p.config_path)],
        stdin=subprocess.DEVNULL,
        stdout=p._log_file,
        stderr=p._log_file,
        env=child_env,
        cwd=str(workdir),
    )
    deadline = time.monotonic() + STARTED_TIMEOUT
    while True:
        text = p.log_text()
        for line in text.splitlines():
            m = STARTED_RE.search(line)
            if m:
                p.host, p.port = m.group(1).strip("[]"), int(m.group(2))
                p.api = (m.group(3).strip("[]"), int(m.group(4)))
                return p
        if p.proc.poll() is not None:
            p.stop()
            pytest.fail(
                f"tiproxy exited with code {p.proc.returncode} before printing 'tiproxy started'\n"
                f"config:\n{toml}\n---- stderr ----\n{p.log_text()}",
                pytrace=False,
            )
        if time.monotonic() > deadline:
            p.stop()
            pytest.fail(
                f"tiproxy did not print 'tiproxy started addr=... api=...' within "
                f"{STARTED_TIMEOUT:.0f}s\nconfig:\n{toml}\n---- stderr ----\n{p.log_text()}",
                pytrace=False,
            )
        time.sleep(0.02)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Attach every proxy's config and stderr to the report of a failed test."""
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and rep.when in ("setup", "call"):
        for i, p in enumerate(getattr(item, "_tiproxy_procs", [])):
            rep.sections.append(
                (f"tiproxy #{i} ({p.host}:{p.port}) config", p.config_path.read_text())
            )
            rep.sections.append((f"tiproxy #{i} ({p.host}:{p.port}) stderr", p.log_text()))


@pytest.fixture
def start_proxy(request, env: Env) -> Callable[[str], ProxyProcess]:
    """Factory: start_proxy(toml) starts tiproxy with that config (in a temp dir) and returns the
    running ProxyProcess (.host, .port, .connect()). Every proxy is terminated after the test; when
    the test failed, each proxy's stderr is dumped."""
    started: List[ProxyProcess] = []
    tmp = Path(tempfile.mkdtemp(prefix="tiproxy-pytest-"))

    def factory(toml: str) -> ProxyProcess:
        p = _start(env, toml, tmp / f"proxy-{len(started)}")
        started.append(p)
        return p

    request.node._tiproxy_procs = started
    yield factory

    for p in started:
        p.stop()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def proxy(start_proxy, backend: Backend) -> ProxyProcess:
    """A proxy whose single backend is `backend`."""
    return start_proxy(base_toml([backend.toml_backend]))


# ---- tables ------------------------------------------------------------------------------------


@pytest.fixture
def new_table(backend: Backend):
    """Factory for unique table names on `backend`; the tables are dropped (directly) afterwards."""
    names: List[str] = []

    def factory(prefix: str = "t") -> str:
        name = f"tp_py_{prefix}_{uuid.uuid4().hex[:10]}"
        names.append(name)
        return name

    yield factory
    if names:
        try:
            conn = backend.connect()
            try:
                with conn.cursor() as cur:
                    for n in names:
                        cur.execute(f"DROP TABLE IF EXISTS {n}")
            finally:
                conn.close()
        except pymysql.MySQLError:
            pass
