#!/usr/bin/env python3
"""The soak (issue 9): a real three-node replicated mesh under steady mixed load for N
minutes, every node's resident memory and file descriptors sampled every 10 s.

Run through `scripts/soak` (which builds first). The verdict is "flat" when, on every node:

- resident memory grew by less than THRESHOLD (default 10 %) between the end of the warm-up
  (the first minute: allocator arenas, connection buffers, caches fill) and the end of the
  load, not counting what the store holds by design within its own bounds (RocksDB memtables
  and block cache, `griddle_store_cache_bytes`, whose memory a flush gives back). Each end
  is the median of three samples (30 s), so one sample taken mid-flush does not decide. The nodes run with 8 MiB memtables
  (`rocksdb_write_buffer_bytes`, --write-buffer-mib) so that flushes and compactions happen
  during the soak rather than after it, and the store's share settles early. At the default
  rate (150 requests a second) a leak of 100 bytes per request adds about 8 MiB in nine
  minutes, over 10 % of a node of about 70 MiB; allocator noise stays within a few MiB;
- once the load has stopped, the descriptors other than the store's files (sockets, pipes,
  eventfds) are back at their count before the load (within 2); the store's own files
  (RocksDB SST and log files, capped by `rocksdb_max_open_files`) are reported apart.

Writes a JSON report (--out) and exits 1 when not flat, or when the load saw a 5xx other
than 503 or more than 1 % errors.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

NODES = 3


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=150.0, help="requests per second, all nodes together")
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--syncs", type=int, default=300, help="sync long-polls held throughout")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds before the growth is measured")
    p.add_argument("--threshold", type=float, default=0.10, help="RSS growth after the warm-up, as a fraction")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--write-buffer-mib", type=int, default=8, help="the nodes' rocksdb_write_buffer_bytes")
    p.add_argument("--port", type=int, default=7750, help="the first node's HTTP port")
    p.add_argument("--bin", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release"))
    p.add_argument("--out", default=None)
    return p.parse_args()


def get(url, timeout=5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


class Node:
    def __init__(self, binary, i, port, data, logs, config):
        self.name = f"soak-{i}"
        self.http = f"127.0.0.1:{port + i}"
        self.mesh = f"127.0.0.1:{port + 100 + i}"
        self.data = os.path.join(data, self.name)
        seed = f"127.0.0.1:{port + 100 + (1 if i == 0 else 0)}"
        self.log = open(os.path.join(logs, self.name + ".log"), "w")
        self.proc = subprocess.Popen(
            [binary, "serve", "--dev", "--replicas", str(NODES), "--node-id", self.name, "--http", self.http,
             "--mesh", self.mesh, "--join", seed, "--data-dir", self.data, "--config", config],
            stdout=subprocess.DEVNULL, stderr=self.log, env=dict(os.environ, GRIDDLE_LOG="warn"))

    def ready(self):
        try:
            get(f"http://{self.http}/readyz", 1.0)
            cluster = json.loads(get(f"http://{self.http}/v1/cluster", 1.0))
            return sum(m["state"] == "alive" for m in cluster["members"]) == NODES
        except Exception:
            return False

    def sample(self):
        pid = self.proc.pid
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
        fds = store_files = sockets = 0
        data = os.path.realpath(self.data)
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue  # closed meanwhile
            fds += 1
            if target.startswith(data + "/"):
                store_files += 1
            elif target.startswith("socket:"):
                sockets += 1
        text = get(f"http://{self.http}/metrics")
        return {
            "rss_kib": rss,
            "fds": fds,
            "store_files": store_files,
            "sockets": sockets,
            "other_fds": fds - store_files,
            "cache_kib": int((metric(text, "griddle_store_cache_bytes") or 0) // 1024),
            "long_polls_held": int(metric(text, "griddle_long_polls_held") or 0),
            "connections": int(metric(text, "griddle_http_connections") or 0),
        }

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def mib(kib):
    return f"{kib / 1024:.1f}"


def main():
    args = parse()
    seconds = args.minutes * 60
    if seconds <= args.warmup + 5 * args.interval:
        sys.exit("--minutes must leave at least five samples after the warm-up")
    out = args.out or os.path.join(os.environ.get("CARGO_TARGET_DIR", "."), "soak-report.json")
    work = tempfile.mkdtemp(prefix="griddle-soak-")
    config = os.path.join(work, "soak.toml")
    with open(config, "w") as f:
        f.write(f"rocksdb_write_buffer_bytes = {args.write_buffer_mib << 20}\n")
    nodes = [Node(os.path.join(args.bin, "griddle"), i, args.port, work, work, config) for i in range(NODES)]
    load = None
    try:
        deadline = time.time() + 60
        while not all(n.ready() for n in nodes):
            if time.time() > deadline or any(n.proc.poll() is not None for n in nodes):
                sys.exit(f"the mesh did not become ready; logs in {work}")
            time.sleep(0.2)
        time.sleep(2)
        before = {n.name: n.sample() for n in nodes}
        print(f"soak: {NODES} nodes ready; {args.rate:.0f} req/s mixed, {args.syncs} held syncs, "
              f"{args.users} users, {args.minutes:g} min; sampling every {args.interval:g} s", flush=True)
        load_out = open(os.path.join(work, "load.json"), "w")
        load = subprocess.Popen(
            [os.path.join(args.bin, "griddle-load"), "--scenario", "mixed", "--target", "griddle",
             "--addr", ",".join(n.http for n in nodes), "--rate", str(args.rate), "--connections", "30",
             "--users", str(args.users), "--syncs", str(args.syncs), "--seconds", str(seconds), "--warmup", "0"],
            stdout=load_out, stderr=subprocess.DEVNULL)
        started = time.time()
        samples = []  # (seconds since start, {node: sample})
        while load.poll() is None:
            time.sleep(max(0.0, args.interval - (time.time() - started) % args.interval))
            if load.poll() is not None:
                break
            t = round(time.time() - started)
            row = {n.name: n.sample() for n in nodes}
            samples.append((t, row))
            print("  t=%4ds  " % t + "  ".join(
                f"{name}: {mib(s['rss_kib'])} MiB (store {mib(s['cache_kib'])}), {s['fds']} fds, "
                f"{s['long_polls_held']} held" for name, s in row.items()), flush=True)
        load_out.close()
        figures = json.load(open(os.path.join(work, "load.json")))
        # The load generator closed its connections: give the nodes a moment to see it.
        time.sleep(5)
        after = {n.name: n.sample() for n in nodes}
    finally:
        if load is not None and load.poll() is None:
            load.kill()
        for n in nodes:
            n.stop()
    report = judge(args, before, samples, after, figures)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print_table(args, report)
    print(f"report: {out}")
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if report["verdict"] == "flat" else 1)


def judge(args, before, samples, after, figures):
    nodes = {}
    flat = True
    for name in before:
        series = [(t, row[name]) for t, row in samples]
        at = next(i for i, (t, _) in enumerate(series) if t >= args.warmup)
        warm, end = series[at][1], series[-1][1]
        own = [s["rss_kib"] - s["cache_kib"] for _, s in series]
        growth_kib = median(own[-3:]) - median(own[at:at + 3])
        growth = growth_kib / median(own[at:at + 3])
        fds_back = after[name]["other_fds"] <= before[name]["other_fds"] + 2
        ok = growth < args.threshold and fds_back
        flat = flat and ok
        nodes[name] = {
            "rss_kib": {"start": before[name]["rss_kib"], "warm": warm["rss_kib"], "end": end["rss_kib"],
                        "max": max(s["rss_kib"] for _, s in series), "after": after[name]["rss_kib"]},
            "store_cache_kib": {"start": before[name]["cache_kib"], "warm": warm["cache_kib"], "end": end["cache_kib"]},
            "growth_after_warmup_kib": growth_kib,
            "growth_after_warmup": round(growth, 4),
            "fds": {"start": before[name]["fds"], "warm": warm["fds"], "end": end["fds"],
                    "max": max(s["fds"] for _, s in series), "after": after[name]["fds"]},
            "fds_other_than_store": {"start": before[name]["other_fds"], "after": after[name]["other_fds"],
                                     "max": max(s["other_fds"] for _, s in series)},
            "store_files": {"start": before[name]["store_files"], "after": after[name]["store_files"]},
            "flat": ok,
            "samples": [{"t": t, **s} for t, s in series],
        }
    statuses = figures.get("refused_statuses", {})
    bad = sum(c for s, c in statuses.items() if int(s) >= 500 and int(s) != 503)
    errors = figures.get("errors", 0)
    load_ok = bad == 0 and errors <= 0.01 * max(1, figures.get("sent", 0))
    return {
        "command": " ".join(["scripts/soak"] + sys.argv[1:]),
        "minutes": args.minutes,
        "rate": args.rate,
        "users": args.users,
        "syncs": args.syncs,
        "warmup_s": args.warmup,
        "write_buffer_mib": args.write_buffer_mib,
        "threshold": args.threshold,
        "load": figures,
        "load_ok": load_ok,
        "nodes": nodes,
        "verdict": "flat" if flat and load_ok else "not flat",
    }


def print_table(args, report):
    load = report["load"]
    lat = load.get("latency") or {}
    print()
    print(f"load: {load.get('sent')} requests, {load.get('ok')} ok, {load.get('refused')} refused "
          f"{load.get('refused_statuses')}, {load.get('errors')} errors; p50 {lat.get('p50_ms')} ms, "
          f"p99 {lat.get('p99_ms')} ms, max {lat.get('max_ms')} ms; syncs {load.get('syncs')}")
    print()
    print("node     RSS MiB: start  warm   end    max   after | store cache MiB warm->end | own growth | "
          "fds: start warm end max after (store files) | flat")
    for name, n in report["nodes"].items():
        r, c, f = n["rss_kib"], n["store_cache_kib"], n["fds"]
        print(f"{name:8} {mib(r['start']):>13} {mib(r['warm']):>5} {mib(r['end']):>5} {mib(r['max']):>6} "
              f"{mib(r['after']):>6} | {mib(c['warm']):>9} -> {mib(c['end']):<9} | {100 * n['growth_after_warmup']:+9.1f}% | "
              f"{f['start']:>10} {f['warm']:>4} {f['end']:>3} {f['max']:>3} {f['after']:>5} "
              f"({n['store_files']['start']}->{n['store_files']['after']}) | {'yes' if n['flat'] else 'NO'}")
    print()
    print(f"verdict: {report['verdict']} (RSS growth after the {args.warmup:g} s warm-up, store caches aside, "
          f"under {100 * args.threshold:g} %; descriptors other than the store's files back to their start)")


if __name__ == "__main__":
    main()
