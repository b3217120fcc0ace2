"""Text-protocol behaviour through tiproxy compared with a DIRECT connection to the same backend.

Every test runs against TiDB (the first instance of TIPROXY_TEST_TIDB, which is the proxy's only
backend) and MariaDB. Tables have unique names and are dropped afterwards.
"""

from __future__ import annotations

import os
import tempfile

import pymysql
import pytest
from pymysql.constants import CLIENT

from conftest import Backend, connect

MIB = 1024 * 1024
BIG = 20 * MIB
MAX_PACKET = 64 * MIB


def fetch_all(conn, sql, args=None):
    """(description, rows, rowcount) of one statement."""
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.description, cur.fetchall(), cur.rowcount


def both(backend: Backend, proxy, **kw):
    """A direct and a proxied connection with the same options."""
    return backend.connect(**kw), proxy.connect(**kw)


def closing(*conns):
    for c in conns:
        try:
            c.close()
        except Exception:
            pass


def error_of(fn):
    """(errno, message) of the pymysql error raised by fn(), or None if it succeeded."""
    try:
        fn()
    except pymysql.MySQLError as e:
        return e.args[0], str(e.args[1]) if len(e.args) > 1 else ""
    return None


# ---- many column types -------------------------------------------------------------------------


def types_ddl(table: str, tidb: bool) -> str:
    json_col = ", c_json JSON" if tidb else ""
    return f"""CREATE TABLE {table} (
        id INT PRIMARY KEY,
        c_tiny TINYINT, c_utiny TINYINT UNSIGNED, c_small SMALLINT, c_medium MEDIUMINT,
        c_int INT, c_big BIGINT, c_ubig BIGINT UNSIGNED,
        c_dec DECIMAL(30,10), c_float FLOAT, c_double DOUBLE,
        c_char CHAR(10), c_varchar VARCHAR(100), c_text TEXT, c_blob BLOB, c_varbin VARBINARY(300),
        c_date DATE, c_datetime DATETIME(6), c_time TIME(3), c_ts TIMESTAMP(6) NULL, c_year YEAR,
        c_bit BIT(10), c_enum ENUM('a','b','ü'), c_set SET('x','y','z'){json_col}
    ) DEFAULT CHARSET=utf8mb4"""


TYPE_ROWS = [
    # extremes and unicode
    (1, -128, 255, -32768, -8388608, -2147483648, -9223372036854775808, 18446744073709551615,
     "-12345678901234567890.0123456789", 3.5, -1.25e300,
     "abc", "héllo wörld ✓ 中文 😀", "Ünïcödé text " * 50, bytes(range(256)), b"\x00\xff\x00\x01",
     "1000-01-01", "9999-12-31 23:59:59.999999", "-838:59:59.000", "2020-02-29 12:34:56.123456",
     1901, 1023, "ü", "x,z", '{"a": [1, 2, {"b": null}], "ü": "😀", "n": 1.5}'),
    # all NULL
    (2,) + (None,) * 24,
    # zeros and empties
    (3, 0, 0, 0, 0, 0, 0, 0, "0", 0.0, 0.0, "", "", "", b"", b"",
     "2000-02-29", "2000-01-01 00:00:00", "00:00:00", "1999-12-31 23:59:59", 2000, 0, "a", "",
     "[]"),
    # positive extremes
    (4, 127, 0, 32767, 8388607, 2147483647, 9223372036854775807, 0,
     "99999999999999999999.9999999999", -0.125, 2.2250738585072014e-308,
     "0123456789", "'quoted' \"double\" \\back\\slash\t\n", "x", b"\x00", b"\xff" * 300,
     "9999-12-31", "1000-01-01 00:00:00.000001", "838:59:58.999", "2037-12-31 23:59:59.000000",
     2155, 1, "b", "x,y,z", '{"deep": {"deeper": {"deepest": [true, false, null]}}}'),
]


def test_column_types(backend: Backend, proxy, new_table):
    t = new_table("types")
    ncols = 25 if backend.is_tidb else 24
    direct = backend.connect()
    try:
        with direct.cursor() as cur:
            cur.execute(types_ddl(t, backend.is_tidb))
            placeholders = ", ".join(["%s"] * ncols)
            cur.executemany(f"INSERT INTO {t} VALUES ({placeholders})",
                            [r[:ncols] for r in TYPE_ROWS])
    finally:
        direct.close()

    literal_sql = (
        "SELECT 1 AS one, -1, 18446744073709551615 AS u64, 1.5, 1e10, 'ünï 😀' AS s, X'00FF' AS hx, "
        "NULL AS nul, CAST('2020-01-01' AS DATE) AS d, CAST('12:34:56' AS TIME) AS tm, "
        "CAST('2001-02-03 04:05:06.789' AS DATETIME(3)) AS dt, CAST(123.456 AS DECIMAL(10,2)) AS dec2, "
        "_binary 'abc' AS bin, '' AS empty, REPEAT('é', 300) AS longish"
    )
    if backend.is_tidb:
        literal_sql += ", JSON_OBJECT('k', 1, 'ü', JSON_ARRAY(1, 'x', NULL)) AS j"
    queries = [
        f"SELECT * FROM {t} ORDER BY id",
        f"SELECT id, c_varchar, c_blob FROM {t} WHERE id > 100",  # empty result set
        f"SELECT COUNT(*), SUM(c_int), MAX(c_varchar), MIN(c_date) FROM {t}",
        literal_sql,
    ]
    # default conversions, and raw text (conv={}) to compare the exact bytes the server sent
    for opts in ({}, {"conv": {}}):
        d, p = both(backend, proxy, **opts)
        try:
            for q in queries:
                want = fetch_all(d, q)
                got = fetch_all(p, q)
                assert got[0] == want[0], f"column descriptions differ for {q!r} ({opts})"
                assert got[1] == want[1], f"rows differ for {q!r} ({opts})"
                assert got[2] == want[2], f"rowcount differs for {q!r} ({opts})"
            # the data really is what we inserted (sanity of the comparison itself)
            if not opts:
                rows = fetch_all(p, f"SELECT c_varchar, c_blob FROM {t} WHERE id = 1")[1]
                assert rows == (("héllo wörld ✓ 中文 😀", bytes(range(256))),)
        finally:
            closing(d, p)


# ---- executemany and a large result set --------------------------------------------------------


def test_executemany(backend: Backend, proxy, new_table):
    t_direct, t_proxy = new_table("em_d"), new_table("em_p")
    rows = [(i, f"name-{i}-ñ", i * 1.25, None if i % 7 == 0 else f"{i:08d}") for i in range(3000)]
    d, p = both(backend, proxy)
    try:
        counts = {}
        for conn, t in ((d, t_direct), (p, t_proxy)):
            with conn.cursor() as cur:
                cur.execute(f"CREATE TABLE {t} (id INT PRIMARY KEY, name VARCHAR(64), "
                            f"amount DOUBLE, code VARCHAR(16))")
                ins = cur.executemany(f"INSERT INTO {t} (id, name, amount, code) "
                                      f"VALUES (%s, %s, %s, %s)", rows)
                upd = cur.executemany(f"UPDATE {t} SET amount = amount + %s WHERE id = %s",
                                      [(1, i) for i in range(0, 3000, 100)])
                counts[t] = (ins, upd)
        assert counts[t_proxy] == counts[t_direct] == (3000, 30)
        # read both tables through both connections: a 3000-row result set
        sel = "SELECT id, name, amount, code FROM {} ORDER BY id"
        ref = fetch_all(d, sel.format(t_direct))
        assert len(ref[1]) == 3000
        for conn in (d, p):
            for t in (t_direct, t_proxy):
                got = fetch_all(conn, sel.format(t))
                assert got[:2] == ref[:2], f"{t} read via {'proxy' if conn is p else 'direct'}"
    finally:
        closing(d, p)


# ---- transactions ------------------------------------------------------------------------------


def test_transaction(backend: Backend, proxy, new_table):
    t_direct, t_proxy = new_table("tx_d"), new_table("tx_p")
    d, p = both(backend, proxy, autocommit=False)
    observer = backend.connect()
    try:
        for conn, t in ((d, t_direct), (p, t_proxy)):
            with conn.cursor() as cur:
                cur.execute(f"CREATE TABLE {t} (id INT PRIMARY KEY, v VARCHAR(20))")
            conn.commit()
            conn.begin()
            with conn.cursor() as cur:
                cur.execute(f"INSERT INTO {t} VALUES (1, 'rolled back')")
                cur.execute(f"SELECT * FROM {t}")
                assert cur.fetchall() == ((1, "rolled back"),)
            # not visible from another session before commit
            assert fetch_all(observer, f"SELECT * FROM {t}")[1] == ()
            conn.rollback()
            conn.begin()
            with conn.cursor() as cur:
                cur.execute(f"INSERT INTO {t} VALUES (2, 'committed')")
                cur.execute(f"INSERT INTO {t} VALUES (3, 'also committed')")
            conn.commit()
            # autocommit=False: an implicit transaction, rolled back
            with conn.cursor() as cur:
                cur.execute(f"INSERT INTO {t} VALUES (4, 'implicit')")
            conn.rollback()
        want = ((2, "committed"), (3, "also committed"))
        for t in (t_direct, t_proxy):
            assert fetch_all(observer, f"SELECT * FROM {t} ORDER BY id")[1] == want, t
        # the proxied session reports the same transaction state (SERVER_STATUS_IN_TRANS) as
        # the direct one
        states = {}
        for name, conn in (("direct", d), ("proxy", p)):
            conn.begin()
            in_trans = conn.server_status & 1
            conn.rollback()
            states[name] = (in_trans, conn.server_status & 1)
        assert states["direct"] == (1, 0)
        assert states["proxy"] == states["direct"]
    finally:
        closing(d, p, observer)


# ---- multi-statements --------------------------------------------------------------------------


def all_results(conn, sql):
    """Every result of a multi-statement query: [(description, rows, rowcount), ...]."""
    out = []
    with conn.cursor() as cur:
        cur.execute(sql)
        while True:
            out.append((cur.description, cur.fetchall(), cur.rowcount))
            if not cur.nextset():
                break
    return out


def test_multi_statement(backend: Backend, proxy, new_table):
    t = new_table("ms")
    d, p = both(backend, proxy, client_flag=CLIENT.MULTI_STATEMENTS)
    try:
        with d.cursor() as cur:
            cur.execute(f"CREATE TABLE {t} (id INT PRIMARY KEY, v VARCHAR(20))")
            cur.execute(f"INSERT INTO {t} VALUES (1, 'one'), (2, 'two'), (3, 'ü')")
        sql = (f"SELECT 1 AS a, 'x' AS b; SELECT * FROM {t} ORDER BY id; "
               f"UPDATE {t} SET v = v WHERE id < 0; SELECT id FROM {t} WHERE id > 99; "
               f"SET @tp_var = 42; SELECT @tp_var, NULL")
        want = all_results(d, sql)
        got = all_results(p, sql)
        assert len(want) == 6
        assert got == want
        # the connection is in sync afterwards
        assert fetch_all(p, "SELECT 7")[1] == ((7,),)
    finally:
        closing(d, p)


def test_multi_statement_error(backend: Backend, proxy):
    d, p = both(backend, proxy, client_flag=CLIENT.MULTI_STATEMENTS)
    missing = "tp_py_no_such_table_4f1d"
    try:
        results = {}
        for name, conn in (("direct", d), ("proxy", p)):
            seen = []
            with conn.cursor() as cur:
                cur.execute(f"SELECT 1 AS a; SELECT * FROM {missing}; SELECT 2 AS b")
                seen.append(cur.fetchall())
                seen.append(error_of(cur.nextset))
            # the session is usable and in sync after the error
            seen.append(fetch_all(conn, "SELECT 3")[1])
            # an error in the very first statement
            seen.append(error_of(lambda: fetch_all(conn, f"SELECT * FROM {missing}; SELECT 4")))
            seen.append(fetch_all(conn, "SELECT 5")[1])
            results[name] = seen
        assert results["direct"][1] is not None and results["direct"][1][0] == 1146
        assert results["direct"][3] is not None and results["direct"][3][0] == 1146
        assert results["proxy"] == results["direct"]
    finally:
        closing(d, p)


# ---- large packets (> 16 MiB) ------------------------------------------------------------------


@pytest.fixture
def big_packets(backend: Backend):
    """max_allowed_packet = 64 MiB on the backend(s), for sessions opened from now on."""
    if backend.is_tidb:
        for host, port in backend.env.tidb:
            c = connect(host, port)
            try:
                with c.cursor() as cur:
                    cur.execute(f"SET GLOBAL max_allowed_packet = {MAX_PACKET}")
            finally:
                c.close()
    return MAX_PACKET


def test_large_values(backend: Backend, proxy, big_packets):
    d, p = both(backend, proxy, max_allowed_packet=big_packets, read_timeout=120,
                write_timeout=120)
    try:
        for conn in (d, p):
            assert fetch_all(conn, "SELECT @@max_allowed_packet")[1][0][0] >= BIG + MIB
        # a 20 MiB value in a result row (a row split over two packets)
        sql = f"SELECT REPEAT('x', {BIG}) AS big, 'after' AS tail"
        want = fetch_all(d, sql)
        got = fetch_all(p, sql)
        assert want[1] == (("x" * BIG, "after"),)
        assert got[0] == want[0]
        assert got[1] == want[1], "20 MiB value differs through the proxy"
        # a 20 MiB string literal in the query (a COM_QUERY split over two packets)
        lit = "x" * BIG
        sql = f"SELECT LENGTH(s), MD5(s) FROM (SELECT '{lit}' AS s) AS d"
        want = fetch_all(d, sql)
        got = fetch_all(p, sql)
        assert want[1][0][0] == BIG
        assert got[1] == want[1]
        # boundaries: a COM_QUERY payload of exactly 0xFFFFFF bytes (needs an empty trailing
        # packet), and a result row of exactly 0xFFFFFF bytes
        n = 0xFFFFFE - len("SELECT LENGTH('')")
        sql = f"SELECT LENGTH('{'y' * n}')"
        assert len(sql) + 1 == 0xFFFFFF
        assert fetch_all(p, sql)[1] == fetch_all(d, sql)[1] == ((n,),)
        n = 0xFFFFFF - 4  # lenenc string header of 4 bytes
        sql = f"SELECT REPEAT('z', {n})"
        got, want = fetch_all(p, sql), fetch_all(d, sql)
        assert want[1] == (("z" * n,),)
        assert got == want
        # still in sync
        assert fetch_all(p, "SELECT 'ok'")[1] == (("ok",),)
    finally:
        closing(d, p)


# ---- LOAD DATA LOCAL INFILE --------------------------------------------------------------------


def test_load_data_local_infile(backend: Backend, proxy, new_table, tmp_path):
    path = tmp_path / "rows.csv"
    nrows = 20000
    with open(path, "w", encoding="utf-8") as f:
        for i in range(nrows):
            f.write(f'{i},"név-{i}-😀",{i * 0.5}\n')
    assert os.path.getsize(path) > 16 * 1024 * 20  # many LOCAL INFILE data packets
    t_direct, t_proxy = new_table("ld_d"), new_table("ld_p")
    d, p = both(backend, proxy, local_infile=True)
    try:
        res = {}
        for conn, t in ((d, t_direct), (p, t_proxy)):
            with conn.cursor() as cur:
                cur.execute(f"CREATE TABLE {t} (id INT PRIMARY KEY, name VARCHAR(64), v DOUBLE)")
                cur.execute(
                    f"LOAD DATA LOCAL INFILE %s INTO TABLE {t} CHARACTER SET utf8mb4 "
                    f"FIELDS TERMINATED BY ',' ENCLOSED BY '\"' LINES TERMINATED BY '\\n' "
                    f"(id, name, v)",
                    (str(path),),
                )
                affected = cur.rowcount
            # a file the client cannot read: the client sends an empty file; the session goes on
            missing = str(tmp_path / "does-not-exist.csv")
            err = error_of(lambda: fetch_all(
                conn, f"LOAD DATA LOCAL INFILE %s INTO TABLE {t} (id, name, v)", (missing,)))
            after = fetch_all(conn, "SELECT 'alive'")[1]
            res[t] = (affected, err, after)
        assert res[t_direct][0] == nrows
        assert res[t_proxy] == res[t_direct]
        sel = "SELECT * FROM {} ORDER BY id"
        want = fetch_all(d, sel.format(t_direct))
        assert len(want[1]) == nrows and want[1][1] == (1, "név-1-😀", 0.5)
        assert fetch_all(d, sel.format(t_proxy))[:2] == want[:2]
    finally:
        closing(d, p)


# ---- ping, select_db ---------------------------------------------------------------------------
# PyMySQL does not expose COM_CHANGE_USER, so change-user is not tested here.


def test_ping_and_select_db(backend: Backend, proxy):
    d, p = both(backend, proxy)
    try:
        out = {}
        for name, conn in (("direct", d), ("proxy", p)):
            seen = []
            conn.ping(reconnect=False)
            conn.select_db("mysql")
            seen.append(fetch_all(conn, "SELECT DATABASE()")[1])
            conn.ping(reconnect=False)
            seen.append(error_of(lambda: conn.select_db("tp_py_no_such_db_9c2e")))
            seen.append(fetch_all(conn, "SELECT DATABASE()")[1])
            conn.select_db("tp_test")
            seen.append(fetch_all(conn, "SELECT DATABASE()")[1])
            conn.ping(reconnect=False)
            out[name] = seen
        assert out["direct"][0] == (("mysql",),)
        assert out["direct"][1] is not None and out["direct"][1][0] == 1049
        assert out["proxy"] == out["direct"]
        # a connection without a default database
        d2, p2 = both(backend, proxy, database=None)
        try:
            assert fetch_all(p2, "SELECT DATABASE()")[1] == fetch_all(d2, "SELECT DATABASE()")[1] \
                == ((None,),)
        finally:
            closing(d2, p2)
    finally:
        closing(d, p)
