#!/usr/bin/env python3
"""Measurements behind tests/bench/migration.sh: session migration against real TiDB.

Subcommands (each prints progress on stderr; `drain` and `busy` append one JSON object per
measurement to --out):

  drain   Open N authenticated idle sessions through the proxy, all on backend A; push A as
          "draining" (B active) and time the move to B; verify every session; then (unless
          --no-sigterm) push both active, SIGTERM TiDB B and time the move back to A; verify.
  busy    K client processes run a point select in a tight loop through the proxy; after a
          baseline window the sessions are moved A -> B -> A ... M round trips by pushing
          snapshots; per-query latencies are split into baseline, migration phase, and the
          queries that spanned their own session's migration.
  wait    Wait until the proxy reports given backends healthy and/or holds no sessions.
  report  Print the summary tables from the JSON lines.

Which backend a session is on is read from the session itself: every TiDB gets a one-row table
tiproxy_bench.whoami(id=1, name='<its address>') (each unistore TiDB is its own database), and
`SELECT name FROM tiproxy_bench.whoami WHERE id = 1` is a point get that names the instance.
The MySQL protocol is spoken over raw sockets (handshake from idle_conns.py, text protocol
with classic EOF packets), so a query costs the client a few tens of microseconds.
"""

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import signal
import struct
import sys
import time
import urllib.error
import urllib.request
from array import array

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from idle_conns import HandshakeError, handshake, raise_nofile  # noqa: E402

WHOAMI_SQL = "SELECT name FROM tiproxy_bench.whoami WHERE id = 1"
CLUSTER_INFO_SQL = "SELECT instance FROM information_schema.cluster_info WHERE type = 'tidb'"


def log(msg):
    print(f"migration: {msg}", file=sys.stderr, flush=True)


def now():
    return time.monotonic()


def die_with_parent():
    """In a forked worker: get SIGKILL when the parent dies, however it dies (Linux prctl)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:
        os._exit(1)


def exit_on_sigterm():
    """In the parent: SIGTERM/SIGINT unwind through `finally` so workers are stopped."""
    def handler(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


# ---- MySQL text protocol over a raw socket ------------------------------------------------------


class QueryError(Exception):
    """The server answered with an ERR packet (the connection is still usable)."""


class Conn:
    """An authenticated connection: one COM_QUERY at a time, first column of the first row."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()

    def _fill(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed by the proxy")
            self.buf += chunk

    def _packet(self):
        self._fill(4)
        n = self.buf[0] | (self.buf[1] << 8) | (self.buf[2] << 16)
        self._fill(4 + n)
        payload = bytes(self.buf[4:4 + n])
        del self.buf[:4 + n]
        return payload

    @staticmethod
    def _lenenc(p, pos):
        c = p[pos]
        if c < 0xFB:
            return c, pos + 1
        if c == 0xFB:
            return None, pos + 1
        if c == 0xFC:
            return struct.unpack_from("<H", p, pos + 1)[0], pos + 3
        if c == 0xFD:
            return int.from_bytes(p[pos + 1:pos + 4], "little"), pos + 4
        return struct.unpack_from("<Q", p, pos + 1)[0], pos + 9

    @staticmethod
    def _err(p):
        code = struct.unpack_from("<H", p, 1)[0]
        msg = p[3:]
        if msg[:1] == b"#":
            msg = msg[6:]
        return QueryError(f"ERROR {code}: {msg.decode('utf-8', 'replace')}")

    def query(self, sql):
        data = sql.encode()
        self.sock.sendall(struct.pack("<I", len(data) + 1)[:3] + b"\x00\x03" + data)
        p = self._packet()
        if p[:1] == b"\xff":
            raise self._err(p)
        if p[:1] == b"\x00":
            return None
        ncols, _ = self._lenenc(p, 0)
        for _ in range(ncols):
            self._packet()
        p = self._packet()
        if not (p[:1] == b"\xfe" and len(p) < 9):
            raise ConnectionError("protocol: no EOF after the column definitions")
        first = None
        while True:
            p = self._packet()
            if p[:1] == b"\xfe" and len(p) < 9:
                return first
            if p[:1] == b"\xff":
                raise self._err(p)
            if first is None:
                n, pos = self._lenenc(p, 0)
                first = "NULL" if n is None else p[pos:pos + n].decode("utf-8", "replace")

    def close(self):
        try:
            self.sock.sendall(b"\x01\x00\x00\x00\x01")  # COM_QUIT
        except OSError:
            pass
        self.sock.close()


def connect(host, port, timeout=30.0, attempts=5):
    last = None
    for attempt in range(attempts):
        try:
            return Conn(handshake(host, port, "root", timeout))
        except (OSError, HandshakeError) as e:  # listen backlog, EAGAIN: retry
            last = e
            if isinstance(e, HandshakeError) and "server error" in str(e):
                break
            time.sleep(0.05 * (attempt + 1))
    raise HandshakeError(str(last))


def hostport(s):
    host, _, port = s.rpartition(":")
    return host, int(port)


# ---- proxy API and metrics ----------------------------------------------------------------------


def http_get(url, timeout=5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


class Api:
    def __init__(self, addr, a, a_status, b, b_status):
        self.base = f"http://{addr}"
        self.a, self.a_status, self.b, self.b_status = a, a_status, b, b_status
        self.gen = 0

    def push(self, a_state, b_state):
        # Generations must not go backwards across the several processes of one run.
        self.gen = max(self.gen + 1, time.time_ns() // 1_000_000)
        body = json.dumps({"generation": self.gen, "backends": [
            {"addr": self.a, "status-addr": self.a_status, "state": a_state},
            {"addr": self.b, "status-addr": self.b_status, "state": b_state},
        ]}).encode()
        req = urllib.request.Request(self.base + "/api/v1/backends", data=body, method="PUT",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            if r.status != 200:
                raise RuntimeError(f"PUT /api/v1/backends: HTTP {r.status}")

    def backends(self):
        _, body = http_get(self.base + "/api/v1/backends")
        return {b["addr"]: b for b in json.loads(body)["backends"]}

    def metrics(self):
        _, body = http_get(self.base + "/metrics")
        return parse_metrics(body.decode())


def parse_metrics(text):
    """{name: [(labels dict, value), ...]} for the Prometheus text format."""
    out = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        head, _, value = line.rpartition(" ")
        labels = {}
        if "{" in head:
            name, _, rest = head.partition("{")
            for part in rest.rstrip("}").split('",'):
                if "=" in part:
                    k, _, v = part.partition("=")
                    labels[k.strip()] = v.strip().strip('"')
        else:
            name = head
        try:
            out.setdefault(name, []).append((labels, float(value)))
        except ValueError:
            pass
    return out


def metric(m, name, **want):
    """Sum of a metric's samples whose labels match `want`."""
    return sum(v for labels, v in m.get(name, ())
               if all(labels.get(k) == w for k, w in want.items()))


def metric_by(m, name, keys, **want):
    res = {}
    for labels, v in m.get(name, ()):
        if all(labels.get(k) == w for k, w in want.items()):
            key = tuple(labels.get(k, "") for k in keys)
            res[key] = res.get(key, 0.0) + v
    return res


def histogram(m, name, **want):
    """Cumulative buckets [(le, count)] summed over matching label sets."""
    b = metric_by(m, name + "_bucket", ("le",), **want)
    return sorted(((float(le), c) for (le,), c in b.items()), key=lambda x: x[0])


def hist_delta(h1, h0):
    before = dict(h0)
    return [(le, c - before.get(le, 0.0)) for le, c in h1]


def hist_quantile(buckets, q):
    """Prometheus histogram_quantile: linear interpolation inside the bucket."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if le == float("inf"):
                return prev_le
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le


def max_bucket(buckets):
    top, prev = None, 0.0
    for le, c in buckets:
        if c > prev:
            top = le
        prev = c
    return top


def migration_summary(m0, m1):
    """What the proxy says about the migrations between two metric snapshots."""
    def delta(name, keys):
        a, b = metric_by(m0, name, keys), metric_by(m1, name, keys)
        return {"/".join(k): round(v - a.get(k, 0.0)) for k, v in b.items() if v - a.get(k, 0.0)}
    h = hist_delta(histogram(m1, "tiproxy_balance_migrate_duration_seconds", migrate_res="succeed"),
                   histogram(m0, "tiproxy_balance_migrate_duration_seconds", migrate_res="succeed"))
    sum_d = (metric(m1, "tiproxy_balance_migrate_duration_seconds_sum", migrate_res="succeed")
             - metric(m0, "tiproxy_balance_migrate_duration_seconds_sum", migrate_res="succeed"))
    n = h[-1][1] if h else 0
    q = {f"p{int(p * 100) if p < 0.999 else 99.9}": hist_quantile(h, p) for p in (0.5, 0.9, 0.99, 0.999)}
    return {
        "migrations": delta("tiproxy_balance_migrate_total", ("from", "to", "reason", "migrate_res")),
        "requested": delta("tiproxy_balance_migrate_requested_total", ("from", "to", "reason")),
        "blocked": delta("tiproxy_balance_migrate_blocked_total", ("reason",)),
        "duration_hist_count": round(n),
        "duration_hist_mean_s": (sum_d / n) if n else None,
        "duration_hist_quantiles_s": q,
        # upper bound of the slowest migration: the bound of the highest non-empty bucket
        "duration_hist_max_le_s": max_bucket(h),
    }


def tidb_connections(status_addr):
    """TiDB's own count of client connections (GET /status), or None when it does not answer 200."""
    try:
        code, body = http_get(f"http://{status_addr}/status", timeout=1.0)
        return json.loads(body).get("connections") if code == 200 else None
    except (OSError, ValueError, urllib.error.URLError):
        return None


def cpu_seconds(pid):
    """utime+stime of a process in seconds (None if it is gone)."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def read_pid(path):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# ---- drain: idle session holders --------------------------------------------------------------


def holder(idx, count, args, pipe):
    """Worker process: open `count` sessions, then answer commands from the parent."""
    die_with_parent()
    conns = []
    try:
        raise_nofile(count + 64)
        host, port = hostport(args.proxy)
        for _ in range(count):
            conns.append(connect(host, port))
        pipe.send({"ok": len(conns)})
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        pipe.send({"error": f"holder {idx}: opened {len(conns)}/{count}: {e}"})
        return
    while True:
        try:
            cmd = pipe.recv()
        except EOFError:
            break
        if cmd[0] == "verify":
            sample = cmd[1]
            where, errors, dead, first_err = {}, 0, 0, None
            cluster = {}
            alive = []
            for c in conns:
                try:
                    c.sock.settimeout(30)
                    name = c.query(WHOAMI_SQL)
                    where[name] = where.get(name, 0) + 1
                    alive.append(c)
                except QueryError as e:
                    errors += 1
                    first_err = first_err or str(e)
                    alive.append(c)
                except (OSError, ConnectionError) as e:
                    dead += 1
                    first_err = first_err or f"{type(e).__name__}: {e}"
                    c.sock.close()
            conns = alive  # a dead session stays dead: count it once
            for c in random.sample(conns, min(sample, len(conns))):
                try:
                    inst = c.query(CLUSTER_INFO_SQL)
                    cluster[inst] = cluster.get(inst, 0) + 1
                except (QueryError, OSError, ConnectionError) as e:
                    cluster["error"] = cluster.get("error", 0) + 1
                    first_err = first_err or str(e)
            pipe.send({"where": where, "errors": errors, "dead": dead, "first_error": first_err,
                       "cluster_info": cluster})
        elif cmd[0] == "quit":
            break
    for c in conns:
        c.close()


class Holders:
    def __init__(self, args, n):
        self.ctx = mp.get_context("fork")
        procs = max(1, min(args.procs, n))
        self.workers = []
        for i in range(procs):
            count = n // procs + (1 if i < n % procs else 0)
            parent, child = self.ctx.Pipe()
            p = self.ctx.Process(target=holder, args=(i, count, args, child), daemon=True)
            p.start()
            child.close()
            self.workers.append((p, parent))

    def wait_open(self):
        total, errors = 0, []
        for _, pipe in self.workers:
            r = pipe.recv()
            if "ok" in r:
                total += r["ok"]
            else:
                errors.append(r["error"])
        return total, errors

    def verify(self, sample):
        per = max(1, -(-sample // len(self.workers))) if sample else 0
        for _, pipe in self.workers:
            pipe.send(("verify", per))
        res = {"where": {}, "errors": 0, "dead": 0, "first_error": None, "cluster_info": {}}
        for _, pipe in self.workers:
            r = pipe.recv()
            for k, v in r["where"].items():
                res["where"][k] = res["where"].get(k, 0) + v
            for k, v in r["cluster_info"].items():
                res["cluster_info"][k] = res["cluster_info"].get(k, 0) + v
            res["errors"] += r["errors"]
            res["dead"] += r["dead"]
            res["first_error"] = res["first_error"] or r["first_error"]
        return res

    def close(self):
        for p, pipe in self.workers:
            try:
                pipe.send(("quit",))
            except OSError:
                pass
        for p, _ in self.workers:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()


def watch_move(api, src, dst, src_status, dst_status, n, t0, timeout, poll):
    """Polls /metrics (and both TiDBs' /status) until every session has left `src`.

    Times are seconds since t0. Stops when the proxy shows 0 sessions on src and n on dst (and
    TiDB dst counts >= n connections), when src is empty and nothing changed for 5 s (sessions
    were lost), or at the timeout."""
    r = {"first_move_s": None, "src_empty_s": None, "dst_full_s": None, "tidb_dst_full_s": None,
         "tidb_src_empty_s": None, "src_unroutable_s": None, "timed_out": False, "samples": 0}
    last_change, last = now(), None
    trace = []
    while True:
        t = now()
        m = api.metrics()
        s = metric(m, "tiproxy_balance_b_conn", backend=src)
        d = metric(m, "tiproxy_balance_b_conn", backend=dst)
        routable = metric(m, "tiproxy_backend_b_status", backend=src)
        td = tidb_connections(dst_status)
        ts = tidb_connections(src_status)
        el = t - t0
        r["samples"] += 1
        if r["src_unroutable_s"] is None and routable == 0:
            r["src_unroutable_s"] = el
        if r["first_move_s"] is None and s < n:
            r["first_move_s"] = el
        if r["src_empty_s"] is None and s == 0:
            r["src_empty_s"] = el
        if r["dst_full_s"] is None and d >= n:
            r["dst_full_s"] = el
        if r["tidb_dst_full_s"] is None and td is not None and td >= n:
            r["tidb_dst_full_s"] = el
        if r["tidb_src_empty_s"] is None and ts is not None and ts == 0:
            r["tidb_src_empty_s"] = el
        if (s, d) != last:
            last, last_change = (s, d), t
            trace.append((round(el, 3), int(s), int(d)))
        r["src_sessions_last"], r["dst_sessions_last"] = int(s), int(d)
        r["tidb_dst_connections_last"] = td
        if s == 0 and d >= n and r["tidb_dst_full_s"] is not None:
            break
        if s == 0 and t - last_change > 5:
            break
        if el > timeout:
            r["timed_out"] = True
            break
        time.sleep(max(0.0, poll - (now() - t)))
    # sessions left on src at each whole second after t0 (the last sample before it)
    curve, sec, left = [], 1, n
    for el, s, _ in trace:
        while el >= sec:
            curve.append(left)
            sec += 1
        left = s
    curve.append(left)  # ... and at the end (nothing changed after the last sample in trace)
    r["left_each_second"] = curve
    return r


def wait_for(pred, timeout, what, interval=0.05):
    deadline = now() + timeout
    while True:
        v = pred()
        if v:
            return v
        if now() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def cmd_drain(args):
    api = Api(args.api, args.a, args.a_status, args.b, args.b_status)
    n = args.sessions
    out = open(args.out, "a")
    proxy_pid = args.proxy_pid
    pid_a, pid_b = read_pid(args.a_pid_file), read_pid(args.b_pid_file)

    api.push("active", "draining")  # B known (and probed) but takes no sessions
    wait_for(lambda: api.backends().get(args.b, {}).get("health", {}).get("state") == "healthy",
             30, f"{args.b} healthy")
    log(f"opening {n} idle sessions through {args.proxy} (all on {args.a}), {args.procs} processes")
    t = now()
    holders = Holders(args, n)
    try:
        opened, errors = holders.wait_open()
        open_s = now() - t
        if errors or opened != n:
            raise RuntimeError(f"opened {opened}/{n} sessions: {'; '.join(errors[:3])}")
        wait_for(lambda: metric(api.metrics(), "tiproxy_balance_b_conn", backend=args.a) == n,
                 60, f"{n} sessions on {args.a}")
        log(f"{n} sessions open in {open_s:.1f}s; TiDB {args.a} reports "
            f"{tidb_connections(args.a_status)} connections")
        time.sleep(1)

        def measure(kind, src, dst, src_status, dst_status, trigger, timeout):
            m0 = api.metrics()
            cpu0 = [cpu_seconds(p) for p in (proxy_pid, pid_a, pid_b)]
            load = loadavg()
            t0 = now()
            trigger()
            w = watch_move(api, src, dst, src_status, dst_status, n, t0, timeout, args.poll)
            cpu1 = [cpu_seconds(p) for p in (proxy_pid, pid_a, pid_b)]
            m1 = api.metrics()
            log(f"{kind}: {src} empty after {w['src_empty_s']}s, {dst} holds "
                f"{w['dst_sessions_last']} sessions after {w['dst_full_s']}s; verifying every session")
            tv = now()
            v = holders.verify(args.verify_sample)
            verify_s = now() - tv
            res = {"test": "drain", "kind": kind, "sessions": n, "from": src, "to": dst,
                   "open_seconds": round(open_s, 2), "loadavg_before": load, **w,
                   "verify": v, "verify_seconds": round(verify_s, 2),
                   "alive": sum(v["where"].values()) + v["errors"],
                   "on_target": v["where"].get(dst, 0),
                   "proxy": migration_summary(m0, m1),
                   "proxy_connections": metric(m1, "tiproxy_server_connections"),
                   "cpu_seconds": {name: (None if a is None or b is None else round(b - a, 2))
                                   for name, a, b in zip(("proxy", args.a, args.b), cpu0, cpu1)}}
            out.write(json.dumps(res) + "\n")
            out.flush()
            log(f"{kind}: verified {res['alive']}/{n} alive, {res['on_target']} on {dst} "
                f"({verify_s:.1f}s); load {loadavg()}")
            return res

        measure("push", args.a, args.b, args.a_status, args.b_status,
                lambda: api.push("draining", "active"), args.timeout)

        if not args.no_sigterm:
            if not pid_b:
                raise RuntimeError(f"no pid in {args.b_pid_file}")
            api.push("active", "active")

            def sigterm():
                os.kill(pid_b, signal.SIGTERM)

            log(f"SIGTERM to TiDB {args.b} (pid {pid_b}, graceful wait {args.graceful_wait}s)")
            measure("sigterm", args.b, args.a, args.b_status, args.a_status, sigterm,
                    args.graceful_wait + 30)
    finally:
        holders.close()
        out.close()


# ---- busy clients -----------------------------------------------------------------------------


def busy_client(idx, args, names, stop, ready, path):
    """Worker process: run the point select in a loop until `stop`; record every query."""
    die_with_parent()
    host, port = hostport(args.proxy)
    starts, durs, where = array("q"), array("q"), array("b")
    errors, reconnects, first_err = 0, 0, None
    conn = connect(host, port)
    conn.query(WHOAMI_SQL)
    with ready.get_lock():
        ready.value += 1
    clock = time.monotonic_ns
    q = WHOAMI_SQL
    while not stop.value:
        t = clock()
        try:
            name = conn.query(q)
            code = names.get(name, 2)
        except QueryError as e:
            code = -1
            errors += 1
            first_err = first_err or str(e)
        except (OSError, ConnectionError) as e:
            code = -2
            errors += 1
            first_err = first_err or f"{type(e).__name__}: {e}"
            reconnects += 1
            try:
                conn.sock.close()
                conn = connect(host, port)
            except (OSError, HandshakeError):
                time.sleep(0.1)
        starts.append(t)
        durs.append(clock() - t)
        where.append(code)
    conn.close()
    with open(path, "wb") as f:
        f.write(struct.pack("<q", len(starts)))
        starts.tofile(f)
        durs.tofile(f)
        where.tofile(f)
    with open(path + ".json", "w") as f:
        json.dump({"errors": errors, "reconnects": reconnects, "first_error": first_err}, f)


def load_client(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<q", f.read(8))
        starts, durs, where = array("q"), array("q"), array("b")
        starts.fromfile(f, n)
        durs.fromfile(f, n)
        where.fromfile(f, n)
    with open(path + ".json") as f:
        meta = json.load(f)
    return starts, durs, where, meta


def dist(values_ns, seconds=None):
    """Latency summary in milliseconds."""
    v = sorted(values_ns)
    if not v:
        return {"n": 0}

    def pct(p):  # nearest rank
        return v[min(len(v) - 1, max(0, math.ceil(p * len(v)) - 1))] / 1e6

    d = {"n": len(v), "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "p999": pct(0.999),
         "max": v[-1] / 1e6, "mean": sum(v) / len(v) / 1e6}
    if seconds:
        d["qps"] = len(v) / seconds
    return d


def cmd_busy(args):
    api = Api(args.api, args.a, args.a_status, args.b, args.b_status)
    names = {args.a: 0, args.b: 1}
    k = args.clients
    out = open(args.out, "a")
    api.push("active", "draining")
    wait_for(lambda: api.backends().get(args.b, {}).get("health", {}).get("state") == "healthy",
             30, f"{args.b} healthy")
    ctx = mp.get_context("fork")
    stop, ready = ctx.RawValue("b", 0), ctx.Value("i", 0)
    paths = [os.path.join(args.work, f"busy-client-{i}.bin") for i in range(k)]
    procs = [ctx.Process(target=busy_client, args=(i, args, names, stop, ready, paths[i]), daemon=True)
             for i in range(k)]
    for p in procs:
        p.start()
    halves = []
    try:
        wait_for(lambda: metric(api.metrics(), "tiproxy_balance_b_conn", backend=args.a) == k
                 and ready.value >= k, 60, f"{k} busy clients on {args.a}")
        log(f"{k} clients running on {args.a}; warm-up 1s, baseline {args.baseline}s")
        time.sleep(1)
        load = loadavg()
        base0 = time.monotonic_ns()
        time.sleep(args.baseline)
        base1 = time.monotonic_ns()
        m0 = api.metrics()
        cpu0 = cpu_seconds(args.proxy_pid)
        log(f"migration phase: {args.round_trips} round trips {args.a} -> {args.b} -> {args.a}, "
            f"dwell {args.dwell}s")
        mig0 = time.monotonic_ns()
        for rt in range(args.round_trips):
            for src, dst, states in ((args.a, args.b, ("draining", "active")),
                                     (args.b, args.a, ("active", "draining"))):
                t0 = now()
                api.push(*states)

                def moved(src=src, dst=dst):
                    m = api.metrics()
                    return (metric(m, "tiproxy_balance_b_conn", backend=src) == 0
                            and metric(m, "tiproxy_balance_b_conn", backend=dst) == k)
                try:
                    wait_for(moved, 60, f"all {k} sessions to move {src} -> {dst}", interval=0.02)
                    halves.append(now() - t0)
                except TimeoutError as e:
                    log(f"round trip {rt + 1}: {e}")
                    halves.append(None)
                time.sleep(args.dwell)
        mig1 = time.monotonic_ns()
        m1 = api.metrics()
        cpu1 = cpu_seconds(args.proxy_pid)
        log(f"baseline after the migrations: {args.baseline}s")
        after0 = time.monotonic_ns()
        time.sleep(args.baseline)
        after1 = time.monotonic_ns()
    finally:
        stop.value = 1
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
    base, after, phase, spanning, other = [], [], [], [], []
    errors, reconnects, first_err, unknown = 0, 0, None, 0
    for path in paths:
        starts, durs, where, meta = load_client(path)
        errors += meta["errors"]
        reconnects += meta["reconnects"]
        first_err = first_err or meta["first_error"]
        prev = None
        for t, d, w in zip(starts, durs, where):
            if w == 2:
                unknown += 1
            if base0 <= t < base1:
                base.append(d)
            elif after0 <= t < after1:
                after.append(d)
            elif mig0 <= t < mig1:
                phase.append(d)
                if w >= 0 and prev is not None and prev >= 0 and w != prev:
                    spanning.append(d)
                else:
                    other.append(d)
            if w >= 0:
                prev = w
        os.unlink(path)
        os.unlink(path + ".json")
    moves = [h for h in halves if h is not None]
    mig_s = (mig1 - mig0) / 1e9
    res = {"test": "busy", "clients": k, "round_trips": args.round_trips,
           "baseline_seconds": args.baseline, "dwell_seconds": args.dwell,
           "loadavg_before": load, "migration_phase_seconds": round(mig_s, 2),
           "expected_migrations": 2 * args.round_trips * k,
           "baseline_before": dist(base, (base1 - base0) / 1e9),
           "baseline_after": dist(after, (after1 - after0) / 1e9),
           "baseline": dist(base + after, (base1 - base0 + after1 - after0) / 1e9),
           "migration_phase": dist(phase, mig_s),
           "spanning": dist(spanning), "not_spanning": dist(other, mig_s),
           "client_errors": errors, "client_reconnects": reconnects, "first_error": first_err,
           "unknown_instance_answers": unknown,
           "move_all_seconds": {"n": len(moves), "timeouts": len(halves) - len(moves),
                                "p50": sorted(moves)[len(moves) // 2] if moves else None,
                                "max": max(moves) if moves else None},
           "proxy": migration_summary(m0, m1),
           "proxy_cpu_seconds_migration_phase": (None if cpu0 is None or cpu1 is None
                                                 else round(cpu1 - cpu0, 2))}
    out.write(json.dumps(res) + "\n")
    out.close()
    log(f"busy: {len(spanning)} spanning queries found (expected {res['expected_migrations']}), "
        f"client errors {errors}")


# ---- wait ------------------------------------------------------------------------------------


def cmd_wait(args):
    api = Api(args.api, "", "", "", "")

    def ok():
        bs = api.backends()
        for addr in args.healthy:
            if bs.get(addr, {}).get("health", {}).get("state") != "healthy":
                return False
        if args.idle and metric(api.metrics(), "tiproxy_server_connections") != 0:
            return False
        for st in args.tidb_idle:
            c = tidb_connections(st)
            if c is None or c > 2:  # the proxy's own health probe may hold one briefly
                return False
        return True

    try:
        wait_for(ok, args.timeout, "the proxy's backends", interval=0.2)
    except TimeoutError as e:
        log(str(e))
        sys.exit(1)


# ---- report ------------------------------------------------------------------------------------


def f(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def per_move_ms(r, who):
    """CPU milliseconds a process spent per migration during a drain."""
    cpu = r["cpu_seconds"].get(who)
    return None if cpu is None else cpu * 1000 / r["sessions"]


def cpu_floor_s(r):
    """The least time this machine could have taken for a drain: the CPU the proxy and both
    TiDB servers used for it, spread perfectly over every core."""
    cpu = r["cpu_seconds"].values()
    return None if None in cpu else sum(cpu) / (os.cpu_count() or 1)


def ms(x):
    return "-" if x is None else (f"{x * 1000:.1f}" if x < 10 else f"{x * 1000:.0f}")


def table(header, rows):
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")


def migr_counts(p):
    ok = sum(v for k, v in p["migrations"].items() if k.endswith("/succeed"))
    bad = sum(v for k, v in p["migrations"].items() if k.endswith("/fail"))
    reasons = {}
    for k, v in p["migrations"].items():
        reason = k.split("/")[2]
        reasons[reason] = reasons.get(reason, 0) + v
    return ok, bad, reasons


def cmd_report(args):
    rows = [json.loads(line) for line in open(args.results) if line.strip()]
    drains = [r for r in rows if r["test"] == "drain"]
    busy = [r for r in rows if r["test"] == "busy"]
    if drains:
        for kind, title in (("push", 'push "draining" (A draining, B active) -> sessions move A -> B'),
                            ("sigterm", "SIGTERM to TiDB (graceful wait) -> sessions move to the other TiDB")):
            sel = [r for r in drains if r["kind"] == kind]
            if not sel:
                continue
            print(f"### Idle sessions, {title}")
            print()
            print("Times in seconds from the push / the signal; /metrics polled every "
                  f"{args.poll * 1000:.0f} ms (gauge refreshed every 20 ms). *CPU ms per move*: "
                  "CPU time of the proxy, the source TiDB and the target TiDB during the drain, "
                  "divided by the sessions. *CPU floor*: their CPU time together divided by the "
                  f"{os.cpu_count()} cores, the shortest drain this machine allows.")
            print()
            hdr = ["sessions", "from -> to"]
            if kind == "sigterm":
                hdr.append("unroutable")
            hdr += ["first move", "**source empty**", "target = N (proxy)", "target >= N (TiDB)",
                    "migrations ok / failed", "migrate p50 / p99 / max-bucket (ms)",
                    "alive after", "on target", "CPU ms per move: proxy / src / dst",
                    "CPU floor (s)"]
            out = []
            for r in sel:
                p = r["proxy"]
                ok, bad, reasons = migr_counts(p)
                q = p["duration_hist_quantiles_s"]
                row = [r["sessions"], f"{r['from']} -> {r['to']}"]
                if kind == "sigterm":
                    row.append(f(r["src_unroutable_s"]))
                row += [f(r["first_move_s"]), "**" + f(r["src_empty_s"], ".2f", "not reached") + "**"
                        + (" (timeout)" if r["timed_out"] else ""),
                        f(r["dst_full_s"], ".2f", "never"), f(r["tidb_dst_full_s"], ".2f", "never"),
                        f"{ok} / {bad}" + ("" if set(reasons) <= {"status"} else
                                           " (" + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) + ")"),
                        f"{ms(q.get('p50'))} / {ms(q.get('p99'))} / <= {ms(p['duration_hist_max_le_s'])}",
                        f"{r['alive']}/{r['sessions']}", f"{r['on_target']}",
                        " / ".join(f(per_move_ms(r, k), ".2f") for k in ("proxy", r["from"], r["to"])),
                        f(cpu_floor_s(r), ".1f")]
                out.append(row)
            table(hdr, out)
            print()
            for r in sel:
                v = r["verify"]
                notes = []
                if v["dead"] or v["errors"] or r["alive"] != r["sessions"]:
                    notes.append(f"{r['sessions'] - r['alive']} sessions lost, {v['errors']} query errors"
                                 f" (first: {v['first_error']})")
                if r["on_target"] != r["sessions"]:
                    notes.append(f"sessions by instance: {v['where']}")
                bad = {k: v for k, v in r["proxy"]["migrations"].items() if k.endswith("/fail")}
                if bad:
                    notes.append(f"failed migrations: {bad}")
                if r["proxy"]["blocked"]:
                    notes.append(f"blocked: {r['proxy']['blocked']}")
                ci = v["cluster_info"]
                notes.append(f"cluster_info check on {sum(ci.values())} sampled sessions: {ci}")
                notes.append("CPU-s during the move: " + ", ".join(
                    f"{k} {f(x, '.1f')}" for k, x in r["cpu_seconds"].items()))
                if r.get("tidb_src_empty_s") is not None:
                    notes.append(f"TiDB {r['from']} itself reported 0 connections after "
                                 f"{r['tidb_src_empty_s']:.2f} s")
                notes.append(f"opened in {r['open_seconds']}s; verified in {r['verify_seconds']}s; "
                             f"load before {r['loadavg_before']}")
                curve = r["left_each_second"]
                notes.append("left on the source after 1, 2, 3 ... s: " + ", ".join(
                    str(x) for x in curve[:20]) + (" ..." if len(curve) > 20 else ""))
                print(f"* N={r['sessions']} {kind}: " + "; ".join(notes))
            print()
    for r in busy:
        print(f"### Busy clients (K = {r['clients']}): pause seen by a client during its own migration")
        print()
        print(f"{r['clients']} client processes, each a tight loop of `{WHOAMI_SQL}` through the "
              f"proxy; {r['round_trips']} round trips (A -> B -> A), {r['dwell_seconds']}s dwell "
              f"after each move; baselines of {r['baseline_seconds']}s without migrations before and after. "
              "A query *spanned a migration* when its answer names another TiDB than the "
              "previous query of the same client.")
        print()
        hdr = ["queries", "n", "QPS", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"]
        out = []
        for name, key in (("baseline before the migrations", "baseline_before"),
                          ("baseline after the migrations", "baseline_after"),
                          ("**baseline, both windows**", "baseline"),
                          ("migration phase, all", "migration_phase"),
                          ("migration phase, not spanning", "not_spanning"),
                          ("**spanning its own migration**", "spanning")):
            d = r[key]
            if not d.get("n"):
                out.append([name, 0] + ["-"] * 6)
                continue
            out.append([name, d["n"], f(d.get("qps"), ".0f"), f(d["p50"], ".2f"), f(d["p90"], ".2f"),
                        f(d["p99"], ".2f"), f(d["p999"], ".2f"), f(d["max"], ".1f")])
        table(hdr, out)
        print()
        p = r["proxy"]
        ok, bad, reasons = migr_counts(p)
        q = p["duration_hist_quantiles_s"]
        mv = r["move_all_seconds"]
        print(f"* spanning queries found: {r['spanning'].get('n', 0)} of {r['expected_migrations']} "
              f"migrations expected ({r['clients']} sessions x 2 x {r['round_trips']})")
        print(f"* proxy: {ok} migrations succeeded, {bad} failed; "
              f"`tiproxy_balance_migrate_duration_seconds` (request -> result, from buckets): "
              f"p50 {ms(q.get('p50'))} ms, p90 {ms(q.get('p90'))} ms, p99 {ms(q.get('p99'))} ms, "
              f"max <= {ms(p['duration_hist_max_le_s'])} ms, mean {ms(p['duration_hist_mean_s'])} ms")
        print(f"* time from a push until all {r['clients']} sessions had moved: p50 "
              f"{f(mv['p50'])} s, max {f(mv['max'])} s ({mv['timeouts']} timeouts)")
        print(f"* client-visible errors: {r['client_errors']} (reconnects {r['client_reconnects']})"
              + (f", first: {r['first_error']}" if r["first_error"] else "")
              + f"; answers naming neither TiDB: {r['unknown_instance_answers']}")
        print(f"* proxy CPU during the migration phase: {f(r['proxy_cpu_seconds_migration_phase'], '.1f')} s "
              f"over {r['migration_phase_seconds']} s; load before {r['loadavg_before']}")
        if p["blocked"]:
            print(f"* blocked: {p['blocked']}")
        print()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("--proxy", required=True, help="proxy SQL address host:port")
        p.add_argument("--api", required=True, help="proxy API address host:port")
        p.add_argument("--a", required=True)
        p.add_argument("--a-status", required=True)
        p.add_argument("--b", required=True)
        p.add_argument("--b-status", required=True)
        p.add_argument("--proxy-pid", type=int)
        p.add_argument("--out", required=True)
        p.add_argument("--poll", type=float, default=0.05)

    d = sub.add_parser("drain")
    common(d)
    d.add_argument("--sessions", type=int, required=True)
    d.add_argument("--procs", type=int, default=4)
    d.add_argument("--verify-sample", type=int, default=100)
    d.add_argument("--a-pid-file")
    d.add_argument("--b-pid-file")
    d.add_argument("--graceful-wait", type=float, default=30)
    d.add_argument("--timeout", type=float, default=300)
    d.add_argument("--no-sigterm", action="store_true")

    b = sub.add_parser("busy")
    common(b)
    b.add_argument("--clients", type=int, default=8)
    b.add_argument("--round-trips", type=int, default=20)
    b.add_argument("--baseline", type=float, default=10)
    b.add_argument("--dwell", type=float, default=0.5)
    b.add_argument("--work", required=True)

    w = sub.add_parser("wait")
    w.add_argument("--api", required=True)
    w.add_argument("--healthy", action="append", default=[])
    w.add_argument("--idle", action="store_true")
    w.add_argument("--tidb-idle", action="append", default=[], help="TiDB status addr")
    w.add_argument("--timeout", type=float, default=60)

    r = sub.add_parser("report")
    r.add_argument("results")
    r.add_argument("--poll", type=float, default=0.05)

    args = ap.parse_args()
    exit_on_sigterm()
    {"drain": cmd_drain, "busy": cmd_busy, "wait": cmd_wait, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
