#!/usr/bin/env python3
"""Open N idle, authenticated MySQL connections and hold them until told to stop.

Used by tests/bench/bench.sh to measure a proxy's memory per idle connection. The MySQL
handshake is done by hand over plain sockets (no driver, no TLS): read the server greeting,
answer with a HandshakeResponse41 for USER with an empty password, follow an auth switch if one
comes, and wait for the OK packet. A connection counts only once that OK has arrived.

The connections are spread over --procs forked workers (each needs one fd per connection, so
this also keeps every process well under its fd limit) which open theirs in parallel.

Protocol with the caller: prints one line `READY <n> <seconds>` on stdout once all N
connections are authenticated (or `FAILED <message>` and exits 1), then holds them until it gets
SIGTERM/SIGINT, stdin reaches EOF (with --stdin), or --hold seconds have passed.
Workers exit on their own when the parent dies (they watch a pipe only the parent holds).
"""

import argparse
import os
import resource
import select
import signal
import socket
import struct
import sys
import time

CLIENT_LONG_PASSWORD = 0x00000001
CLIENT_PROTOCOL_41 = 0x00000200
CLIENT_TRANSACTIONS = 0x00002000
CLIENT_SECURE_CONNECTION = 0x00008000
CLIENT_MULTI_RESULTS = 0x00020000
CLIENT_PLUGIN_AUTH = 0x00080000
CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA = 0x00200000
CLIENT_SSL = 0x00000800


class HandshakeError(Exception):
    pass


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise HandshakeError("connection closed by peer during handshake")
        buf += chunk
    return bytes(buf)


def read_packet(sock):
    header = recv_exact(sock, 4)
    length = header[0] | (header[1] << 8) | (header[2] << 16)
    return header[3], recv_exact(sock, length)


def write_packet(sock, seq, payload):
    n = len(payload)
    sock.sendall(bytes((n & 0xFF, (n >> 8) & 0xFF, (n >> 16) & 0xFF, seq & 0xFF)) + payload)


def err_text(payload):
    # 0xFF, code(2), ['#', sqlstate(5)], message
    code = struct.unpack_from("<H", payload, 1)[0]
    msg = payload[3:]
    if msg[:1] == b"#":
        msg = msg[6:]
    return f"server error {code}: {msg.decode('utf-8', 'replace')}"


def auth_data_for(plugin, password):
    if password:
        raise HandshakeError("only empty passwords are supported")
    # An empty password is an empty auth response for mysql_native_password and
    # caching_sha2_password; sha256_password/client_ed25519 style plugins get one NUL byte.
    if plugin in (b"mysql_native_password", b"caching_sha2_password", b""):
        return b""
    return b"\x00"


def handshake(host, port, user, timeout):
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        seq, greeting = read_packet(sock)
        if greeting[:1] == b"\xff":
            raise HandshakeError(err_text(greeting))
        if greeting[0] != 10:
            raise HandshakeError(f"unexpected protocol version {greeting[0]}")
        pos = greeting.index(b"\x00", 1) + 1  # server version
        pos += 4 + 8 + 1  # connection id, auth-plugin-data-part-1, filler
        caps = struct.unpack_from("<H", greeting, pos)[0]
        pos += 2
        plugin = b""
        if len(greeting) > pos:
            pos += 1 + 2  # charset, status flags
            caps |= struct.unpack_from("<H", greeting, pos)[0] << 16
            pos += 2
            auth_len = greeting[pos]
            pos += 1 + 10
            if caps & CLIENT_SECURE_CONNECTION:
                pos += max(13, auth_len - 8)
            if caps & CLIENT_PLUGIN_AUTH:
                end = greeting.find(b"\x00", pos)
                plugin = greeting[pos:end if end >= 0 else len(greeting)]
        if not caps & CLIENT_PROTOCOL_41:
            raise HandshakeError("server does not support protocol 4.1")
        want = (CLIENT_LONG_PASSWORD | CLIENT_PROTOCOL_41 | CLIENT_TRANSACTIONS
                | CLIENT_SECURE_CONNECTION | CLIENT_MULTI_RESULTS | CLIENT_PLUGIN_AUTH
                | CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA)
        mine = want & caps & ~CLIENT_SSL
        auth = auth_data_for(plugin, "")
        resp = struct.pack("<IIB23x", mine, 1 << 24, 45)  # utf8mb4_general_ci
        resp += user.encode() + b"\x00"
        if mine & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA or mine & CLIENT_SECURE_CONNECTION:
            resp += bytes((len(auth),)) + auth
        else:
            resp += auth + b"\x00"
        if mine & CLIENT_PLUGIN_AUTH:
            resp += plugin + b"\x00"
        seq = (seq + 1) & 0xFF
        write_packet(sock, seq, resp)
        for _ in range(8):
            seq, pkt = read_packet(sock)
            kind = pkt[:1]
            if kind == b"\x00":
                sock.settimeout(None)
                return sock
            if kind == b"\xff":
                raise HandshakeError(err_text(pkt))
            if kind == b"\xfe":  # auth switch request: plugin name NUL data
                end = pkt.find(b"\x00", 1)
                plugin = pkt[1:end if end >= 0 else len(pkt)]
                seq = (seq + 1) & 0xFF
                write_packet(sock, seq, auth_data_for(plugin, ""))
                continue
            if kind == b"\x01":  # more auth data (e.g. caching_sha2 fast-auth success)
                continue
            raise HandshakeError(f"unexpected packet 0x{pkt[0]:02x} during auth")
        raise HandshakeError("authentication did not finish")
    except BaseException:
        sock.close()
        raise


def raise_nofile(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def worker(idx, count, args, report_w, lifeline_r):
    """Open `count` connections, report `ok N` / `err MSG` on report_w, then hold them."""
    socks = []
    try:
        limit = raise_nofile(count + 64)
        if limit < count + 16:
            raise HandshakeError(f"worker {idx}: fd limit {limit} too low for {count} connections")
        for i in range(count):
            last_err = None
            for attempt in range(5):
                try:
                    socks.append(handshake(args.host, args.port, args.user, args.timeout))
                    break
                except (OSError, HandshakeError) as e:  # transient: listen backlog, EAGAIN
                    last_err = e
                    if isinstance(e, HandshakeError) and "server error" in str(e):
                        break
                    time.sleep(0.05 * (attempt + 1))
            if len(socks) != i + 1:
                raise HandshakeError(f"connection {i + 1} of {count} (worker {idx}): {last_err}")
        os.write(report_w, f"ok {len(socks)}\n".encode())
    except BaseException as e:  # report and quit
        msg = str(e).replace("\n", " ")
        try:
            os.write(report_w, f"err {msg}\n".encode())
        finally:
            os._exit(1)
    os.close(report_w)
    # Hold: block until the parent goes away (lifeline EOF) or we are signalled.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, lambda *_: os._exit(0))
    while True:
        try:
            if not os.read(lifeline_r, 1):
                break
        except InterruptedError:
            continue
    os._exit(0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--user", default="root")
    ap.add_argument("-n", "--conns", type=int, required=True, help="connections to open")
    ap.add_argument("--procs", type=int, default=4, help="worker processes (default 4)")
    ap.add_argument("--timeout", type=float, default=30.0, help="per-handshake timeout, s")
    ap.add_argument("--hold", type=float, default=3600.0, help="give up holding after S seconds")
    ap.add_argument("--stdin", action="store_true", help="also stop when stdin reaches EOF")
    args = ap.parse_args()
    if args.conns < 0 or args.procs < 1:
        ap.error("--conns must be >= 0 and --procs >= 1")

    procs = max(1, min(args.procs, args.conns)) if args.conns else 0
    lifeline_r, lifeline_w = os.pipe()
    report_r, report_w = os.pipe()
    pids = []
    start = time.monotonic()
    for idx in range(procs):
        count = args.conns // procs + (1 if idx < args.conns % procs else 0)
        pid = os.fork()
        if pid == 0:
            os.close(lifeline_w)
            os.close(report_r)
            worker(idx, count, args, report_w, lifeline_r)
        pids.append(pid)
    os.close(report_w)
    os.close(lifeline_r)

    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    total, errors, buf, finished = 0, [], b"", 0
    while finished < procs and not stopping:
        try:
            chunk = os.read(report_r, 4096)
        except InterruptedError:
            continue
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            word, _, rest = line.decode().partition(" ")
            finished += 1
            if word == "ok":
                total += int(rest)
            else:
                errors.append(rest)
    elapsed = time.monotonic() - start
    rc = 0
    if stopping:
        rc = 1
    elif errors or total != args.conns:
        print(f"FAILED opened {total}/{args.conns}: {'; '.join(errors[:3]) or 'worker died'}",
              flush=True)
        rc = 1
    else:
        print(f"READY {total} {elapsed:.2f}", flush=True)
        deadline = time.monotonic() + args.hold
        watch = [sys.stdin] if args.stdin else []
        while not stopping and time.monotonic() < deadline:
            try:
                ready, _, _ = select.select(watch, [], [], 0.5)
            except InterruptedError:
                continue
            if ready and not sys.stdin.buffer.read1(4096):
                break
    os.close(lifeline_w)  # workers see EOF and exit, closing their sockets
    for pid in pids:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    sys.exit(rc)


if __name__ == "__main__":
    main()
