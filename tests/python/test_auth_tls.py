"""Authentication, TLS and connection attributes through tiproxy, compared with direct connections.

Not covered, because PyMySQL cannot do it:
  * MariaDB's ed25519 auth plugin (user tp_ed25519): PyMySQL has no client side for
    `client_ed25519` unless PyNaCl is installed, and the suite does not depend on it.
  * COM_CHANGE_USER: PyMySQL does not expose change-user.
"""

from __future__ import annotations

import socket
import ssl
import struct

import pymysql
import pytest

from conftest import Backend, Env, base_toml, connect, tidb_backend_toml

SHA2_USER, SHA2_PW = "tp_sha2", "sha2_pw"
NATIVE_USER, NATIVE_PW = "tp_native", "native_pw"


def no_verify_ctx() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def login(host, port, **kw):
    """("ok", CURRENT_USER(), tls?) or ("error", errno, message) of one login + query."""
    try:
        conn = connect(host, port, **kw)
    except pymysql.MySQLError as e:
        return ("error", e.args[0], str(e.args[1]) if len(e.args) > 1 else "")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT CURRENT_USER()")
            user = cur.fetchone()[0]
        return ("ok", user, isinstance(conn._sock, ssl.SSLSocket))
    finally:
        conn.close()


def query(conn, sql):
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.description, cur.fetchall()


def tls_proxy_toml(backends, extra=""):
    return base_toml(backends, "[security.server-tls]\nauto-certs = true\n" + extra)


@pytest.fixture(scope="session")
def native_user_on_tidb(tidb_prepared: Env) -> Env:
    """tp_native / native_pw (mysql_native_password) on every TiDB, like on MariaDB."""
    for host, port in tidb_prepared.tidb:
        c = connect(host, port)
        try:
            with c.cursor() as cur:
                cur.execute(f"CREATE USER IF NOT EXISTS '{NATIVE_USER}'@'%' "
                            f"IDENTIFIED WITH mysql_native_password BY '{NATIVE_PW}'")
                cur.execute(f"ALTER USER '{NATIVE_USER}'@'%' "
                            f"IDENTIFIED WITH mysql_native_password BY '{NATIVE_PW}'")
                cur.execute(f"GRANT ALL PRIVILEGES ON tp_test.* TO '{NATIVE_USER}'@'%'")
        finally:
            c.close()
    return tidb_prepared


# ---- passwords ---------------------------------------------------------------------------------


def test_login_errors(backend: Backend, proxy, native_user_on_tidb):
    cases = {
        "native user, right password": dict(user=NATIVE_USER, password=NATIVE_PW),
        "native user, wrong password": dict(user=NATIVE_USER, password="wrong_pw"),
        "root, wrong password": dict(user="root", password="wrong_pw"),
        "unknown user": dict(user="tp_py_nobody", password="x"),
        "unknown database": dict(user="root", password="", database="tp_py_no_such_db_71ab"),
    }
    for name, kw in cases.items():
        want = login(backend.host, backend.port, **kw)
        got = login(proxy.host, proxy.port, **kw)
        assert got[:2] == want[:2], f"{name}: proxy {got} vs direct {want}"
        if want[0] == "error" and want[1] == 1045:
            assert kw["user"] in got[2], f"{name}: the message should name the user: {got}"
    assert login(proxy.host, proxy.port, user=NATIVE_USER, password=NATIVE_PW)[:2] == \
        ("ok", f"{NATIVE_USER}@%")
    assert login(proxy.host, proxy.port, user=NATIVE_USER, password="wrong_pw")[1] == 1045


# ---- TLS ---------------------------------------------------------------------------------------


def test_client_tls(backend: Backend, start_proxy):
    proxy = start_proxy(tls_proxy_toml([backend.toml_backend]))
    # Clients send the TLS ClientHello right after the SSLRequest packet, without waiting: both
    # may reach the proxy in one read. Several fresh connections make that case likely.
    for i in range(10):
        got = login(proxy.host, proxy.port, ssl=no_verify_ctx())
        assert got == ("ok", "root@%", True), f"TLS login #{i}: {got}"
    tls_conn = proxy.connect(ssl=no_verify_ctx(), max_allowed_packet=64 * 1024 * 1024)
    plain_conn = proxy.connect()
    direct = backend.connect()
    try:
        assert isinstance(tls_conn._sock, ssl.SSLSocket), "client leg is not TLS"
        assert tls_conn._sock.cipher() is not None
        assert not isinstance(plain_conn._sock, ssl.SSLSocket)
        sql = ("SELECT 1 AS a, 'ünï 😀' AS s, NULL AS n, CAST(1.25 AS DECIMAL(5,2)) AS d, "
               "CAST('2020-01-02 03:04:05' AS DATETIME) AS dt")
        want = query(direct, sql)
        assert query(tls_conn, sql) == want
        assert query(plain_conn, sql) == want
        # a multi-packet value over TLS
        n = 5 * 1024 * 1024
        assert query(tls_conn, f"SELECT REPEAT('t', {n})")[1] == (("t" * n,),)
        tls_conn.ping(reconnect=False)
        assert query(tls_conn, "SELECT 'still ok'")[1] == (("still ok",),)
    finally:
        for c in (tls_conn, plain_conn, direct):
            c.close()


def _read_packet(sock) -> bytes:
    def recv_exact(n):
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise AssertionError(f"proxy closed the connection (got {buf!r})")
            buf += chunk
        return buf

    header = recv_exact(4)
    return recv_exact(int.from_bytes(header[:3], "little"))


def test_tls_client_hello_in_same_segment_as_ssl_request(env: Env, start_proxy):
    """A client may send its TLS ClientHello right behind the SSLRequest packet (there is no
    server reply in between); the proxy must feed those already-read bytes to TLS. Sent here in
    ONE write, so the case is deterministic rather than timing-dependent."""
    host, port = env.mariadb
    proxy = start_proxy(tls_proxy_toml([f'"{host}:{port}"']))
    sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
    try:
        greeting = _read_packet(sock)
        assert greeting[0] == 10, f"not a v10 greeting: {greeting[:16]!r}"
        caps = 0x1 | 0x200 | 0x800 | 0x8000 | 0x80000  # LONG_PASSWORD PROTOCOL_41 SSL SECURE PLUGIN_AUTH
        payload = struct.pack("<IIB23s", caps, 1 << 24, 45, b"")
        ssl_request = len(payload).to_bytes(3, "little") + b"\x01" + payload
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = no_verify_ctx().wrap_bio(incoming, outgoing, server_side=False)
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        client_hello = outgoing.read()
        assert client_hello, "no ClientHello produced"
        sock.sendall(ssl_request + client_hello)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                out = outgoing.read()
                if out:
                    sock.sendall(out)
                data = sock.recv(65536)
                if not data:
                    raise AssertionError(
                        "proxy closed the connection during the TLS handshake") from None
                incoming.write(data)
        out = outgoing.read()
        if out:
            sock.sendall(out)
        assert tls.version() and tls.version().startswith("TLS"), tls.version()
    finally:
        sock.close()
    # and an ordinary TLS login still works
    assert login(proxy.host, proxy.port, ssl=no_verify_ctx()) == ("ok", "root@%", True)


@pytest.mark.parametrize("sql_tls", ["skip-ca", "ca"])
def test_mariadb_backend_tls(env: Env, start_proxy, sql_tls):
    """With [security.sql-tls], the proxy->MariaDB leg is TLS when the client uses TLS."""
    host, port = env.mariadb
    sql_tls_toml = ("skip-ca = true\n" if sql_tls == "skip-ca" else f'ca = "{env.mariadb_ca}"\n')
    proxy = start_proxy(tls_proxy_toml([f'"{host}:{port}"'],
                                       "[security.sql-tls]\n" + sql_tls_toml))
    conn = proxy.connect(ssl=no_verify_ctx())
    try:
        assert isinstance(conn._sock, ssl.SSLSocket), "client leg is not TLS"
        _, rows = query(conn, "SHOW STATUS LIKE 'Ssl_cipher'")
        assert rows and rows[0][1], f"backend leg is not TLS: Ssl_cipher = {rows!r}"
        _, rows = query(conn, "SHOW STATUS LIKE 'Ssl_version'")
        assert rows and rows[0][1].startswith("TLS"), rows
        assert query(conn, "SELECT 'x'")[1] == (("x",),)
    finally:
        conn.close()
    # a native-password user over the TLS legs
    assert login(proxy.host, proxy.port, user=NATIVE_USER, password=NATIVE_PW,
                 ssl=no_verify_ctx()) == ("ok", f"{NATIVE_USER}@%", True)


# ---- caching_sha2_password on TiDB -------------------------------------------------------------


@pytest.fixture(scope="session")
def sha2_user(tidb_prepared: Env) -> Env:
    for host, port in tidb_prepared.tidb:
        c = connect(host, port)
        try:
            with c.cursor() as cur:
                cur.execute(f"CREATE USER IF NOT EXISTS '{SHA2_USER}'@'%' "
                            f"IDENTIFIED WITH caching_sha2_password BY '{SHA2_PW}'")
                cur.execute(f"ALTER USER '{SHA2_USER}'@'%' "
                            f"IDENTIFIED WITH caching_sha2_password BY '{SHA2_PW}'")
                cur.execute(f"GRANT ALL PRIVILEGES ON tp_test.* TO '{SHA2_USER}'@'%'")
        finally:
            c.close()
    return tidb_prepared


def test_tidb_caching_sha2_plain(sha2_user: Env, start_proxy):
    """caching_sha2_password over plain TCP: after TiDB's "full auth needed", PyMySQL asks for
    the server's RSA public key (needs `cryptography`). TiDB (v8.5) implements no RSA exchange:
    it takes the request byte 0x02 as the cleartext password and answers 1045, so a direct
    login fails. The proxy relays auth and must give exactly the direct outcome, for every TiDB
    of the list and on repeated logins."""
    env = sha2_user
    proxy = start_proxy(base_toml([tidb_backend_toml(h, p) for h, p in env.tidb]))
    direct = {login(h, p, user=SHA2_USER, password=SHA2_PW)[:2] for h, p in env.tidb}
    assert len(direct) == 1, f"TiDB instances disagree: {direct}"
    (want,) = direct
    for _ in range(2 * len(env.tidb)):
        got = login(proxy.host, proxy.port, user=SHA2_USER, password=SHA2_PW)
        assert got[:2] == want, f"proxy {got} vs direct {want}"
    want_bad = login(env.tidb[0][0], env.tidb[0][1], user=SHA2_USER, password="bad")
    got_bad = login(proxy.host, proxy.port, user=SHA2_USER, password="bad")
    assert want_bad[:2] == ("error", 1045)
    assert got_bad[:2] == want_bad[:2] and SHA2_USER in got_bad[2]


def test_tidb_caching_sha2_tls(sha2_user: Env, start_proxy):
    """caching_sha2_password with TLS to the proxy: the client sends the password in clear
    over TLS. The test TiDBs have no TLS, so there is no direct equivalent to compare with."""
    env = sha2_user
    proxy = start_proxy(tls_proxy_toml([tidb_backend_toml(h, p) for h, p in env.tidb]))
    for _ in range(2 * len(env.tidb)):
        got = login(proxy.host, proxy.port, user=SHA2_USER, password=SHA2_PW,
                    ssl=no_verify_ctx())
        assert got == ("ok", f"{SHA2_USER}@%", True)
    bad = login(proxy.host, proxy.port, user=SHA2_USER, password="bad", ssl=no_verify_ctx())
    assert bad[:2] == ("error", 1045) and SHA2_USER in bad[2], bad
    # root (empty password) over TLS still works
    assert login(proxy.host, proxy.port, ssl=no_verify_ctx()) == ("ok", "root@%", True)


# ---- connection attributes ---------------------------------------------------------------------


def test_connect_attrs(backend: Backend, proxy):
    if not backend.is_tidb:
        c = backend.connect()
        try:
            on = query(c, "SELECT @@performance_schema")[1][0][0]
        finally:
            c.close()
        if not on:
            pytest.skip("performance_schema is OFF on this MariaDB: no session_connect_attrs")
    sql = ("SELECT ATTR_NAME, ATTR_VALUE FROM performance_schema.session_connect_attrs "
           "WHERE PROCESSLIST_ID = CONNECTION_ID()")
    attrs = {}
    for name, (h, p) in (("direct", (backend.host, backend.port)),
                         ("proxy", (proxy.host, proxy.port))):
        conn = connect(h, p, program_name="tp_pytest_attrs")
        try:
            attrs[name] = dict(query(conn, sql)[1])
        finally:
            conn.close()
    assert attrs["direct"].get("program_name") == "tp_pytest_attrs"
    missing = {k: v for k, v in attrs["direct"].items() if attrs["proxy"].get(k) != v}
    assert not missing, f"attributes lost or changed through the proxy: {missing}; " \
                        f"proxy saw {attrs['proxy']}"
