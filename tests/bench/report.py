#!/usr/bin/env python3
"""Summarise the raw measurements of tests/bench/bench.sh into the final tables.

Input (tab-separated, with a header line):
  results.tsv  workload target round qps queries seconds proxy_ticks bytes_sent server_ticks proxy_wchar
  memory.tsv   target conns rss_before_kib rss_after_kib connect_seconds threads_connected
Ticks are /proc/PID/stat utime+stime deltas in clock ticks (--clk-tck per second); proxy_ticks
is empty for the direct target. bytes_sent is the MariaDB `Bytes_sent` delta of the run.
"""

import argparse
import csv
import statistics
import sys

TARGETS = ("direct", "haproxy", "tiproxy")


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, spec, none="-"):
    return none if x is None else format(x, spec)


def table(header, rows, align):
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" if a == "r" else "---" for a in align) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def load(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def throughput(path, tck, workloads_order):
    rows = load(path)
    if not rows:
        print("(no throughput results)")
        return
    by = {}  # (workload, round) -> target -> row
    workloads = []
    for r in rows:
        wl = r["workload"]
        if wl not in workloads:
            workloads.append(wl)
        by.setdefault((wl, int(r["round"])), {})[r["target"]] = r
    if workloads_order:
        workloads = [w for w in workloads_order if w in workloads] + [
            w for w in workloads if w not in workloads_order]

    def num(row, key):
        v = row.get(key, "")
        return float(v) if v not in ("", None) else None

    def cpu_us_per_q(row):
        t, q = num(row, "proxy_ticks"), num(row, "queries")
        return None if t is None or not q else t / tck * 1e6 / q

    def mb_per_cpu_s(row):
        t, b = num(row, "proxy_ticks"), num(row, "bytes_sent")
        return None if t is None or b is None or t <= 0 else b / 1e6 / (t / tck)

    summary = {}
    for wl in workloads:
        rounds = sorted(k[1] for k in by if k[0] == wl)
        for tgt in TARGETS:
            per = [by[(wl, rd)].get(tgt) for rd in rounds]
            per = [p for p in per if p]
            if not per:
                continue
            qps = [num(p, "qps") for p in per]
            ratios = []
            for rd in rounds:
                d, t = by[(wl, rd)].get("direct"), by[(wl, rd)].get(tgt)
                if d and t and num(d, "qps"):
                    ratios.append(num(t, "qps") / num(d, "qps"))
            bpq = [num(p, "bytes_sent") / num(p, "queries") for p in per
                   if num(p, "bytes_sent") is not None and num(p, "queries")]
            srv = [num(p, "server_ticks") / tck * 1e6 / num(p, "queries") for p in per
                   if num(p, "server_ticks") is not None and num(p, "queries")]
            summary[(wl, tgt)] = dict(
                n=len(per), qps=median(qps), qmin=min(qps), qmax=max(qps),
                ratio=median(ratios), cpu=median([cpu_us_per_q(p) for p in per]),
                mbps=median([mb_per_cpu_s(p) for p in per]), bpq=median(bpq),
                srv=median(srv))

    nrounds = max(v["n"] for v in summary.values())
    print(f"Throughput: median of {nrounds} interleaved round(s); ratio-to-direct is the median "
          f"of the per-round ratios.")
    print()
    out = []
    for wl in workloads:
        for tgt in TARGETS:
            s = summary.get((wl, tgt))
            if not s:
                continue
            large = wl.startswith("read_only_range")
            out.append([
                wl, tgt, fmt(s["qps"], ".0f"),
                f"{s['qmin']:.0f}–{s['qmax']:.0f}" if s["n"] > 1 else "-",
                fmt(s["ratio"], ".3f"),
                fmt(s["cpu"], ".1f") if tgt != "direct" else "-",
                fmt(s["mbps"], ".0f") if large and tgt != "direct" else "-",
            ])
    table(["workload", "target", "QPS", "QPS min–max", "ratio-to-direct",
           "proxy CPU-µs/query", "MB/s per proxy-CPU-s"], out, "llrrrrr")
    print()

    print("tiproxy vs haproxy: median of the per-round ratios tiproxy/haproxy "
          "(CPU < 1 means tiproxy uses less CPU per query; QPS > 1 means tiproxy is faster).")
    print()
    out = []
    for wl in workloads:
        cpu_r, qps_r = [], []
        for rd in sorted(k[1] for k in by if k[0] == wl):
            h, t = by[(wl, rd)].get("haproxy"), by[(wl, rd)].get("tiproxy")
            if not (h and t):
                continue
            ch, ct = cpu_us_per_q(h), cpu_us_per_q(t)
            if ch and ct is not None:
                cpu_r.append(ct / ch)
            if num(h, "qps"):
                qps_r.append(num(t, "qps") / num(h, "qps"))
        out.append([wl, fmt(median(cpu_r), ".2f"), fmt(median(qps_r), ".3f")])
    table(["workload", "CPU-µs/query tiproxy/haproxy", "QPS tiproxy/haproxy"], out, "lrr")
    print()

    print("Context (medians): bytes the server sent per query (MariaDB Bytes_sent, what a proxy "
          "forwards to the client) and MariaDB's own CPU-µs/query.")
    print()
    out = []
    for wl in workloads:
        for tgt in TARGETS:
            s = summary.get((wl, tgt))
            if s:
                out.append([wl, tgt, fmt(s["bpq"], ".0f"), fmt(s["srv"], ".1f")])
    table(["workload", "target", "bytes/query", "server CPU-µs/query"], out, "llrr")
    print()


def memory(path):
    rows = load(path)
    if not rows:
        print("(no memory results)")
        return
    print("Memory: VmRSS of a freshly started proxy before and 3 s after opening N idle, "
          "authenticated connections through it.")
    print()
    out, per = [], {}
    for r in rows:
        n = int(r["conns"])
        before, after = int(r["rss_before_kib"]), int(r["rss_after_kib"])
        kib = (after - before) / n if n else None
        per[r["target"]] = kib
        out.append([r["target"], str(n), f"{before / 1024:.1f}", f"{after / 1024:.1f}",
                    fmt(kib, ".2f"), r["connect_seconds"], r.get("threads_connected", "")])
    table(["target", "idle conns", "RSS before (MiB)", "RSS after (MiB)",
           "KiB per idle conn", "connect time (s)", "backend Threads_connected"], out, "lrrrrrr")
    if per.get("haproxy") and per.get("tiproxy") is not None:
        print()
        print(f"RSS per idle connection tiproxy/haproxy: {per['tiproxy'] / per['haproxy']:.2f}")
    print()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clk-tck", type=float, required=True)
    ap.add_argument("--results")
    ap.add_argument("--memory")
    ap.add_argument("--order", default="", help="comma-separated workload order")
    a = ap.parse_args()
    if a.results:
        throughput(a.results, a.clk_tck, [w for w in a.order.split(",") if w])
    if a.memory:
        memory(a.memory)


if __name__ == "__main__":
    sys.exit(main())
