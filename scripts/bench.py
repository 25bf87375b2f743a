#!/usr/bin/env python3
"""Griddle's benchmark suite, side by side with the tools a site would otherwise pick.

Run through `scripts/bench` (which installs the peers and builds first). Every scenario runs
ours and the peer interleaved (A B A B A B) and reports medians, so a noisy machine moves
both. The load comes from `griddle-load` (open loop, HdrHistogram; see its module doc).

    scripts/bench                 # the full run: writes docs/BENCHMARKS.md and docs/bench/
    scripts/bench --quick         # every scenario for a few seconds (scripts/test runs this)
    scripts/bench --only read,append

Output: one JSON file per run (every figure, machine facts, the git commit) and one SVG chart
per scenario. A full run also rewrites docs/BENCHMARKS.md from them.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/griddle/target"))
GRIDDLE = os.path.join(TARGET, "release", "griddle")
LOAD = os.path.join(TARGET, "release", "griddle-load")
SCENARIOS = ["read", "append", "replicated", "fanout", "capacity", "failover", "overload"]


def log(*parts):
    print("[bench]", *parts, file=sys.stderr, flush=True)


def free_port(kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout} s")


def wait_tcp(port, timeout=15.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


class Processes:
    """Every server a scenario starts; all stopped when the scenario ends."""

    def __init__(self, work):
        self.work = work
        self.running = []

    def start(self, name, argv, **kwargs):
        out = open(os.path.join(self.work, f"{name}.log"), "ab")
        # Its own process group, so stopping it stops its children too (nginx's workers).
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
        self.running.append(proc)
        return proc

    def stop_all(self):
        for proc in self.running:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.running:
            proc.wait()
        self.running = []


def griddle_node(procs, name, extra=(), config=None, http=None, mesh=None, join=None):
    http = http or free_port()
    mesh = mesh or free_port(socket.SOCK_DGRAM)
    argv = [GRIDDLE, "serve", "--dev", "--node-id", name, "--http", f"127.0.0.1:{http}",
            "--mesh", f"127.0.0.1:{mesh}", "--data-dir", os.path.join(procs.work, name)]
    if join:
        argv += ["--join", join]
    if config:
        path = os.path.join(procs.work, f"{name}.toml")
        with open(path, "w") as f:
            f.write(config)
        argv += ["--config", path]
    proc = procs.start(name, argv + list(extra))
    return {"proc": proc, "addr": f"127.0.0.1:{http}", "mesh": f"127.0.0.1:{mesh}", "name": name}


def griddle_single(procs, config=None):
    node = griddle_node(procs, f"single-{len(procs.running)}", config=config)
    wait_http(f"http://{node['addr']}/readyz")
    return node


def griddle_cluster(procs, count=3):
    meshes = [free_port(socket.SOCK_DGRAM) for _ in range(count)]
    nodes = []
    for i in range(count):
        join = f"127.0.0.1:{meshes[1 if i == 0 else 0]}"
        nodes.append(griddle_node(procs, f"n{i}-{len(procs.running)}", extra=["--replicas", "3"],
                                  mesh=meshes[i], join=join))
    for node in nodes:
        wait_http(f"http://{node['addr']}/readyz")
    return nodes


def load(args, timeout=600):
    """Runs griddle-load; returns its JSON figures."""
    argv = [LOAD] + [str(a) for a in args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"griddle-load {' '.join(map(str, args))} failed: {done.stderr.strip()[-2000:]}")
    sys.stderr.write(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def dig(value, *path):
    """value[path[0]][path[1]]..., or None where a level is missing."""
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def p99(figures):
    return (figures.get("latency") or {}).get("p99_ms")


# ---------------------------------------------------------------- scenarios


class Bench:
    def __init__(self, opts):
        self.quick = opts.quick
        self.rounds = 1 if opts.quick else opts.rounds
        self.seconds = 2 if opts.quick else opts.seconds
        self.warmup = 0.5 if opts.quick else 2
        self.work = tempfile.mkdtemp(prefix="griddle-bench-")
        self.results = {}

    def procs(self):
        return Processes(self.work)

    def common(self):
        return ["--seconds", self.seconds, "--warmup", self.warmup]

    def interleave(self, runs):
        """runs: {label: fn() -> figures}; A B A B ...; returns {label: [figures per round]}."""
        out = {label: [] for label in runs}
        for r in range(self.rounds):
            for label, fn in runs.items():
                log(f"round {r + 1}/{self.rounds}: {label}")
                out[label].append(fn())
        return out

    # 1. Feed page read from RocksDB vs nginx serving the same bytes.
    def read(self):
        procs = self.procs()
        try:
            node = griddle_single(procs)
            # Prepare the feed (griddle-load does it) and take the exact bytes of the page.
            load(["--scenario", "read", "--addr", node["addr"], "--connections", 1, "--seconds", 0.2, "--warmup", 0])
            token = subprocess.run([GRIDDLE, "token", "--dev", "--user", "bench-reader"], capture_output=True,
                                   text=True, check=True).stdout.strip()
            request = urllib.request.Request(f"http://{node['addr']}/v1/feed?limit=20",
                                             headers={"Authorization": f"Bearer {token}"})
            page = urllib.request.urlopen(request).read()
            root = os.path.join(self.work, "www")
            os.makedirs(root, exist_ok=True)
            with open(os.path.join(root, "feed.json"), "wb") as f:
                f.write(page)
            for path in (self.work, root):  # nginx's workers run as another user
                os.chmod(path, 0o755)
            os.chmod(os.path.join(root, "feed.json"), 0o644)
            nginx_port = free_port()
            conf = os.path.join(self.work, "nginx.conf")
            with open(conf, "w") as f:
                f.write(f"""worker_processes auto;
pid {self.work}/nginx.pid;
error_log {self.work}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  keepalive_requests 1000000;
  types {{ application/json json; }}
  server {{ listen 127.0.0.1:{nginx_port}; root {root}; }}
}}
""")
            procs.start("nginx", ["nginx", "-c", conf, "-g", "daemon off;"])
            wait_tcp(nginx_port)
            targets = {
                "griddle": ["--target", "griddle", "--addr", node["addr"]],
                "nginx": ["--target", "nginx", "--addr", f"127.0.0.1:{nginx_port}", "--path", "/feed.json"],
            }

            def run(target):
                base = ["--scenario", "read", "--connections", 64] + targets[target] + self.common()
                saturated = load(base + ["--rate", 0, "--label", "saturation"])
                rate = max(1, round(saturated["ok_rps"] * 0.8))
                at80 = load(base + ["--rate", rate, "--label", "80%"])
                return {"saturation": saturated, "at80": at80}

            rounds = self.interleave({t: (lambda t=t: run(t)) for t in targets})
            summary = {t: {"rps": median(r["saturation"]["ok_rps"] for r in rs),
                           "p99_at_80_ms": median(p99(r["at80"]) for r in rs)} for t, rs in rounds.items()}
            self.results["read"] = {"page_bytes": len(page), "rounds": rounds, "median": summary}
        finally:
            procs.stop_all()

    # 2. Durable appends of 200-byte events, single node, vs Redis XADD with appendfsync always.
    def append(self):
        procs = self.procs()
        try:
            node = griddle_single(procs)
            redis_port = free_port()
            redis_dir = os.path.join(self.work, "redis")
            os.makedirs(redis_dir, exist_ok=True)
            procs.start("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", redis_dir,
                                  "--appendonly", "yes", "--appendfsync", "always", "--save", ""])
            wait_tcp(redis_port)
            targets = {"griddle": ["--target", "griddle", "--addr", node["addr"]],
                       "redis": ["--target", "redis", "--addr", f"127.0.0.1:{redis_port}"]}
            result = {}
            for clients in (10, 250):
                rounds = self.interleave({
                    t: (lambda t=t: load(["--scenario", "append", "--connections", clients, "--rate", 0]
                                         + targets[t] + self.common())) for t in targets})
                result[str(clients)] = {"rounds": rounds, "median": {
                    t: {"rps": median(r["ok_rps"] for r in rs), "p99_ms": median(p99(r) for r in rs)}
                    for t, rs in rounds.items()}}
            self.results["append"] = result
        finally:
            procs.stop_all()

    # 3. Replicated appends (3 nodes, W = 2 of R = 3), 250 clients spread over the nodes.
    def replicated(self):
        procs = self.procs()
        try:
            nodes = griddle_cluster(procs)
            addrs = ",".join(n["addr"] for n in nodes)
            # Start the partitions the load will use before measuring.
            load(["--scenario", "append", "--addr", addrs, "--connections", 250, "--seconds", 1, "--warmup", 0])
            rounds = self.interleave({"griddle-3": lambda: load(
                ["--scenario", "append", "--target", "griddle", "--addr", addrs, "--connections", 250, "--rate", 0]
                + self.common())})
            single = (self.results.get("append") or {}).get("250", {}).get("median", {}).get("griddle", {})
            rs = rounds["griddle-3"]
            summary = {"rps": median(r["ok_rps"] for r in rs), "p99_ms": median(p99(r) for r in rs),
                       "single_node_rps": single.get("rps")}
            if summary["rps"] and single.get("rps"):
                summary["ratio_to_single"] = round(summary["rps"] / single["rps"], 2)
            self.results["replicated"] = {"rounds": rounds, "median": summary}
        finally:
            procs.stop_all()

    # 4. Fan-out: append on node A, long-poll on node B, 1,000 events/s, idle long-polls held.
    def fanout(self):
        idle = 1000 if self.quick else 10000
        rate = 1000
        procs = self.procs()
        try:
            nodes = griddle_cluster(procs)
            nats_port = free_port()
            procs.start("nats", ["nats-server", "-a", "127.0.0.1", "-p", str(nats_port)])
            wait_tcp(nats_port)
            # Idle long-polls on every node, held for the whole scenario by processes of their own
            # (opened once: a node frees a long-poll whose client left only when its wait ends).
            for node in nodes:
                procs.start(f"idle-{node['name']}", [LOAD, "--scenario", "hold", "--addr", node["addr"],
                                                     "--count", str(idle), "--keep-seconds", "3600"])
            seconds = max(self.seconds, 3)

            def griddle():
                return load(["--scenario", "fanout", "--target", "griddle", "--addr", nodes[0]["addr"],
                             "--sub-addr", nodes[1]["addr"], "--rate", rate, "--subscribers", 100,
                             "--connections", 4, "--seconds", seconds])

            def nats():
                return load(["--scenario", "fanout", "--target", "nats", "--addr", f"127.0.0.1:{nats_port}",
                             "--rate", rate, "--idle", idle, "--subscribers", 100, "--seconds", seconds])

            rounds = self.interleave({"griddle": griddle, "nats": nats})
            summary = {t: {"p50_ms": median((r["latency"] or {}).get("p50_ms") for r in rs),
                           "p99_ms": median(p99(r) for r in rs),
                           "delivered": median(r["delivered"] for r in rs),
                           "published": median(r["published"] for r in rs)} for t, rs in rounds.items()}
            self.results["fanout"] = {"rate": rate, "idle_per_node": idle, "rounds": rounds, "median": summary}
        finally:
            procs.stop_all()

    # 5. Capacity: long-polls one node holds, and its resident memory per held long-poll.
    def capacity(self):
        count = 2000 if self.quick else 18500
        procs = self.procs()
        try:
            node = griddle_single(procs)
            figures = load(["--scenario", "hold", "--addr", node["addr"], "--count", count,
                            "--pid", node["proc"].pid], timeout=900)
            self.results["capacity"] = {"median": {"griddle": {"held": figures["held"],
                                                               "bytes_per_poll": figures["rss_bytes_per_poll"]}},
                                        "rounds": {"griddle": [figures]}}
        finally:
            procs.stop_all()

    # 6. Failover: kill -9 a primary under load (the real-process replication test does it).
    def failover(self):
        kills = 1 if self.quick else 10
        env = dict(os.environ, GRIDDLE_FAILOVER_KILLS=str(kills))
        done = subprocess.run(["cargo", "test", "--release", "--locked", "-p", "node", "--test", "it",
                               "three_nodes_fail_over", "--", "--nocapture", "--test-threads", "1"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
        text = done.stdout + done.stderr
        if done.returncode != 0:
            raise RuntimeError("the failover test failed:\n" + text[-3000:])
        # Rust's Debug of a Duration: 1.79s, 850.2ms, 163.9µs, 12ns.
        unit = r"([\d.]+)(s|ms|µs|us|ns)"
        found = re.search(rf"failover over (\d+) stop\(s\) \(Kill\): p50 {unit}, p99 {unit}, max {unit}", text)
        acked = re.search(r"(\d+) appends acknowledged", text)
        if not found:
            raise RuntimeError("no failover figures in the test's output:\n" + text[-3000:])

        def secs(value, unit):
            return round(float(value) / {"s": 1, "ms": 1e3, "µs": 1e6, "us": 1e6, "ns": 1e9}[unit], 3)

        figures = {"kills": int(found.group(1)), "p50_s": secs(found.group(2), found.group(3)),
                   "p99_s": secs(found.group(4), found.group(5)), "max_s": secs(found.group(6), found.group(7)),
                   "acknowledged": int(acked.group(1)) if acked else None,
                   "lost": 0}  # the test fails on any acknowledged write missing from any disk
        self.results["failover"] = {"median": {"griddle": figures}, "rounds": {"griddle": [figures]}}

    # 7. Overload: offered load at twice saturation; admitted p99 and how fast refusals come.
    def overload(self):
        procs = self.procs()
        try:
            node = griddle_single(procs)
            base = ["--scenario", "append", "--target", "griddle", "--addr", node["addr"]] + self.common()
            saturated = load(base + ["--connections", 250, "--rate", 0, "--label", "saturation"])
            rate = 2 * saturated["ok_rps"]
            over = load(base + ["--connections", 1000, "--rate", rate, "--label", "2x"])
            figures = {"saturation_rps": saturated["ok_rps"], "offered_rps": rate, "admitted_rps": over["ok_rps"],
                       "admitted_p99_ms": p99(over), "refused": over["refused"],
                       "refused_p99_ms": (over.get("refused_latency") or {}).get("p99_ms"),
                       "errors": over["errors"]}
            self.results["overload"] = {"median": {"griddle": figures}, "rounds": {"griddle": [saturated, over]}}
        finally:
            procs.stop_all()


# ---------------------------------------------------------------- machine, goals, charts, docs


def machine():
    def cmd(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return None

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), None)
    mem_kib = next((int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    return {
        "cpus": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(), "fd_limit": cmd(["sh", "-c", "ulimit -n"]),
        "commit": cmd(["git", "-C", REPO, "rev-parse", "--short", "HEAD"]),
        "dirty": bool(cmd(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"])),
        "nginx": cmd(["sh", "-c", "nginx -v 2>&1"]), "redis": cmd(["redis-server", "--version"]),
        "nats": cmd(["nats-server", "--version"]),
    }


def goals(r):
    """(scenario, goal, ours, peer, met) rows, from the medians."""
    rows = []

    def get(*path):
        return dig(r, *path)

    def ratio(a, b):
        return round(a / b, 2) if a and b else None

    g, n = get("read", "median", "griddle"), get("read", "median", "nginx")
    if g and n:
        x = ratio(g["rps"], n["rps"])
        rows.append(("feed read", "≥ 1.0 × nginx req/s; p99 ≤ 10 ms at 80 %",
                     f"{g['rps']:.0f}/s ({x} ×), p99 {g['p99_at_80_ms']} ms", f"{n['rps']:.0f}/s, p99 {n['p99_at_80_ms']} ms",
                     bool(x and x >= 1.0 and g["p99_at_80_ms"] is not None and g["p99_at_80_ms"] <= 10)))
    for clients, want, rule in (("10", 2.0, "≥ 2 × Redis always-fsync, p99 ≤ Redis's"),
                                ("250", 1.0, "≥ 1.0 × Redis always-fsync, p99 ≤ 35 ms")):
        g, d = get("append", clients, "median", "griddle"), get("append", clients, "median", "redis")
        if g and d:
            x = ratio(g["rps"], d["rps"])
            p99_ok = (g["p99_ms"] or 1e9) <= (d["p99_ms"] if clients == "10" else 35)
            rows.append((f"append, {clients} clients", rule, f"{g['rps']:.0f}/s ({x} ×), p99 {g['p99_ms']} ms",
                         f"{d['rps']:.0f}/s, p99 {d['p99_ms']} ms", bool(x and x >= want and p99_ok)))
    g = get("replicated", "median")
    if g:
        rows.append(("replicated append, 250 clients", "≥ 0.5 × single node, p99 ≤ 35 ms",
                     f"{g['rps']:.0f}/s ({g.get('ratio_to_single')} ×), p99 {g['p99_ms']} ms",
                     f"single node {g.get('single_node_rps')}/s",
                     bool((g.get("ratio_to_single") or 0) >= 0.5 and (g["p99_ms"] or 1e9) <= 35)))
    g, n = get("fanout", "median", "griddle"), get("fanout", "median", "nats")
    if g and n:
        rows.append(("fan-out across nodes", "p99 ≤ 10 ms", f"p50 {g['p50_ms']} ms, p99 {g['p99_ms']} ms",
                     f"NATS p50 {n['p50_ms']} ms, p99 {n['p99_ms']} ms", bool((g["p99_ms"] or 1e9) <= 10)))
    g = get("capacity", "median", "griddle")
    if g:
        rows.append(("capacity", "≥ 18,500 long-polls, ≤ 8 KiB each", f"{g['held']} held, {g['bytes_per_poll']} B each",
                     "", bool(g["held"] >= 18500 and (g["bytes_per_poll"] or 1e9) <= 8192)))
    g = get("failover", "median", "griddle")
    if g:
        rows.append(("failover", "≤ 3 s to writable, 0 lost",
                     f"p50 {g['p50_s']} s, p99 {g['p99_s']} s over {g['kills']} kills, {g['lost']} lost", "",
                     bool(g["p99_s"] <= 3 and g["lost"] == 0)))
    g = get("overload", "median", "griddle")
    if g:
        refused_p99 = g["refused_p99_ms"]
        rows.append(("overload at 2× saturation", "admitted p99 ≤ 25 ms; refusals in ≤ 5 ms",
                     f"admitted {g['admitted_rps']:.0f}/s p99 {g['admitted_p99_ms']} ms; {g['refused']} refused"
                     + (f" p99 {refused_p99} ms" if refused_p99 is not None else ""), "",
                     bool((g["admitted_p99_ms"] or 1e9) <= 25 and (refused_p99 is None or refused_p99 <= 5))))
    return rows


def bar_chart(title, groups, unit):
    """groups: [(group label, [(series label, value)])] -> SVG text (horizontal bars)."""
    colors = {"griddle": "#b0174f", "griddle-3": "#b0174f"}
    rows = sum(len(series) for _, series in groups)
    width, bar_h, gap, left = 640, 22, 14, 190
    height = 40 + rows * (bar_h + 6) + len(groups) * gap + 10
    top = max([v for _, series in groups for _, v in series if v] + [1])
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="#fff"/>',
           f'<text x="10" y="22" font-size="14" font-weight="bold">{title}</text>']
    y = 40
    for group, series in groups:
        out.append(f'<text x="10" y="{y + 14}" font-weight="bold">{group}</text>')
        for label, value in series:
            w = 0 if not value else max(1, (width - left - 110) * value / top)
            color = colors.get(label, "#5b6b7a")
            out.append(f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">{label}</text>')
            out.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{color}"/>')
            shown = "n/a" if value is None else (f"{value:,.0f}" if value >= 100 else f"{value:g}")
            out.append(f'<text x="{left + w + 6:.1f}" y="{y + 15}">{shown} {unit}</text>')
            y += bar_h + 6
        y += gap
    out.append("</svg>")
    return "\n".join(out)


def charts(r):
    out = {}

    def m(*path):
        return dig(r, *path)

    if m("read", "median"):
        out["read"] = bar_chart("Feed page read (20 events)", [
            ("req/s at saturation", [(t, m("read", "median", t, "rps")) for t in ("griddle", "nginx")]),
            ("p99 at 80 % (ms)", [(t, m("read", "median", t, "p99_at_80_ms")) for t in ("griddle", "nginx")])], "")
    if m("append"):
        groups = []
        for c in ("10", "250"):
            groups.append((f"appends/s, {c} clients", [(t, m("append", c, "median", t, "rps")) for t in ("griddle", "redis")]))
            groups.append((f"p99 ms, {c} clients", [(t, m("append", c, "median", t, "p99_ms")) for t in ("griddle", "redis")]))
        out["append"] = bar_chart("Durable append, 200 bytes (Redis: XADD, appendfsync always)", groups, "")
    if m("replicated", "median"):
        out["replicated"] = bar_chart("Replicated append, 250 clients (3 nodes, W = 2)", [
            ("appends/s", [("griddle-3", m("replicated", "median", "rps")),
                           ("griddle single", m("replicated", "median", "single_node_rps"))]),
            ("p99 ms", [("griddle-3", m("replicated", "median", "p99_ms"))])], "")
    if m("fanout", "median"):
        out["fanout"] = bar_chart("Fan-out delivery latency, 1,000 events/s", [
            ("p50 ms", [(t, m("fanout", "median", t, "p50_ms")) for t in ("griddle", "nats")]),
            ("p99 ms", [(t, m("fanout", "median", t, "p99_ms")) for t in ("griddle", "nats")])], "")
    if m("capacity", "median"):
        out["capacity"] = bar_chart("Long-polls held by one node", [
            ("held", [("griddle", m("capacity", "median", "griddle", "held"))]),
            ("bytes of RSS each", [("griddle", m("capacity", "median", "griddle", "bytes_per_poll"))])], "")
    if m("failover", "median"):
        out["failover"] = bar_chart("Failover: kill -9 to first successful write", [
            ("seconds", [("p50", m("failover", "median", "griddle", "p50_s")),
                         ("p99", m("failover", "median", "griddle", "p99_s"))])], "s")
    if m("overload", "median"):
        out["overload"] = bar_chart("Overload: offered at 2 × saturation", [
            ("appends/s", [("saturation", m("overload", "median", "griddle", "saturation_rps")),
                           ("admitted", m("overload", "median", "griddle", "admitted_rps"))]),
            ("p99 ms", [("admitted", m("overload", "median", "griddle", "admitted_p99_ms")),
                        ("refused", m("overload", "median", "griddle", "refused_p99_ms"))])], "")
    return out


def write_docs(run, rows, svgs, path_json):
    lines = ["# Benchmarks", "",
             "Griddle against the tools a site would otherwise pick, on one machine, in one run: each scenario",
             "runs ours and the peer interleaved (A B A B A B) and reports medians. Load: `griddle-load`, open",
             "loop (latency from the intended send time, in HdrHistogram), on the same cores as the servers.",
             "Generated by `scripts/bench`; every figure of the run is in",
             f"[`{os.path.relpath(path_json, os.path.join(REPO, 'docs'))}`]({os.path.relpath(path_json, os.path.join(REPO, 'docs'))}).", "",
             f"Run of {run['date']} at commit `{run['machine']['commit']}`"
             f"{' (with local changes)' if run['machine']['dirty'] else ''}: {run['machine']['cpus']} cores "
             f"({run['machine']['cpu']}), {run['machine']['memory_gib']} GiB, Linux {run['machine']['kernel']}, "
             f"{run['rounds']} rounds of {run['seconds']} s.", "",
             "| scenario | goal | Griddle | peer | met |", "|---|---|---|---|---|"]
    for name, goal, ours, peer, met in rows:
        lines.append(f"| {name} | {goal} | {ours} | {peer} | {'yes' if met else '**no**'} |")
    lines += ["", "## Charts", ""]
    for name in SCENARIOS:
        if name in svgs:
            lines.append(f"![{name}](bench/{name}.svg)")
            lines.append("")
    lines += ["## How each figure is made", "",
              "1. **Feed read**: a feed page of 20 events read from RocksDB on every request (`GET /v1/feed?limit=20`)",
              "   vs nginx serving the same bytes as a static file. Saturation: closed loop, 64 connections;",
              "   then open loop at 80 % of each one's own saturation for the p99.",
              "2. **Append**: 200-byte events, closed loop at 10 and 250 connections, single node, acknowledged after",
              "   the WAL sync; Redis 7 `XADD` with `appendonly yes`, `appendfsync always`.",
              "3. **Replicated append**: three nodes (`--replicas 3`, W = 2), 250 connections spread over the nodes.",
              "4. **Fan-out**: appends through node A at 1,000/s to 100 streams, each followed by a long-poll held on",
              "   node B, with idle long-polls held on every node; latency from the append call to delivery.",
              "   NATS: publish to 100 subjects with one subscriber each, and as many idle subscribers.",
              "5. **Capacity**: long-polls opened against one node from 127.0.0.x source addresses; resident memory",
              "   (VmRSS) before and after, divided by the long-polls held.",
              "6. **Failover**: `node/tests/it/replication.rs`, 32 writers on 3 nodes, the primary of their partitions",
              "   killed with SIGKILL and restarted, 10 times; time from the kill to the first acknowledged write on",
              "   the killed node's partitions; every RocksDB disk checked afterwards for every acknowledged event.",
              "7. **Overload**: open loop at twice the closed-loop saturation, through 1,000 connections.", "",
              "## Reproduce", "", "```sh", "scripts/bench            # about 15 minutes; rewrites this file",
              "scripts/bench --quick    # a few seconds per scenario, to check it all runs (scripts/test does)",
              "scripts/bench --only read,append --rounds 5", "```", ""]
    analysis = os.path.join(REPO, "docs", "bench", "analysis.md")  # hand-written, kept across runs
    if os.path.exists(analysis):
        lines += ["", open(analysis).read()]
    with open(os.path.join(REPO, "docs", "BENCHMARKS.md"), "w") as f:
        f.write("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few seconds per scenario; results go to --out only")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--out", help="directory for the run's JSON and charts (default: docs/bench, or a temp dir with --quick)")
    opts = parser.parse_args()
    wanted = [s for s in opts.only.split(",") if s]
    unknown = set(wanted) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    bench = Bench(opts)
    out = opts.out or (tempfile.mkdtemp(prefix="griddle-bench-out-") if opts.quick else os.path.join(REPO, "docs", "bench"))
    os.makedirs(out, exist_ok=True)
    failures = []
    for name in SCENARIOS:
        if name not in wanted:
            continue
        log(f"== {name}")
        started = time.time()
        try:
            getattr(bench, name)()
        except Exception as err:  # one broken scenario must not hide the others' figures
            failures.append(name)
            log(f"{name} FAILED: {err}")
        log(f"{name} took {time.time() - started:.0f} s")
    run = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "quick": opts.quick, "rounds": bench.rounds, "seconds": bench.seconds, "machine": machine(),
           "results": bench.results, "failed": failures}
    rows = goals(bench.results)
    run["goals"] = [{"scenario": s, "goal": g, "griddle": o, "peer": p, "met": m} for s, g, o, p, m in rows]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path_json = os.path.join(out, f"run-{stamp}.json")
    with open(path_json, "w") as f:
        json.dump(run, f, indent=1)
    svgs = charts(bench.results)
    for name, svg in svgs.items():
        with open(os.path.join(out, f"{name}.svg"), "w") as f:
            f.write(svg)
    print()
    for s, g, o, p, m in rows:
        print(f"{'met ' if m else 'MISS'}  {s:32} {o}   [{p}]")
    print(f"\nfigures: {path_json}")
    if not opts.quick and not opts.out and set(wanted) == set(SCENARIOS):
        write_docs(run, rows, svgs, path_json)
        print("docs/BENCHMARKS.md rewritten")
    missing = [s for s in wanted if s not in bench.results]
    shutil.rmtree(bench.work, ignore_errors=True)
    if failures or missing:
        print(f"scenarios without figures: {', '.join(sorted(set(failures + missing)))}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
