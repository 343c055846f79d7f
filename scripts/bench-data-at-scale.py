#!/usr/bin/env python3
"""Issue 13's benchmarks ("hold more data than memory") with real processes on loopback.

Each scenario starts `flotilla server` processes (one node per process, mutual TLS, fresh data
directories under --work-dir), drives them with `flotilla bench` and `flotilla admin`, samples
every node's /metrics into a CSV (one row per node per sample) and prints a summary; with
--json the summary is also written as JSON. Data directories are deleted at the end unless
--keep (or a failure: then they are kept, with the servers' logs, for a look).

Scenarios:
  larger-than-memory  3 nodes, auto-balance on (default split threshold), 1 KiB values until
                      each node holds --gib GiB of user data; per node: peak and final RSS,
                      write amplification, put throughput in the first and last minute.
  move-under-load     4 nodes, one shard (auto-balance off) filled to --fill-gib GiB; with
                      --clients writing, one replica moves to node 4: move duration, transfer
                      rate, client throughput and p99 before/during/after, RSS growth of
                      sender and receiver.
  catch-up            3 nodes, --shards shards (auto-balance off), clients writing; one
                      follower is stopped (SIGSTOP) until every shard's leader is more than
                      --lag-entries ahead (past what a leader keeps for a lagging follower, so
                      it needs a snapshot), then continued: time to catch up, snapshots built
                      and installed (seen in the nodes' scratch and install directories).

Sizes (README.md, "Benchmarks"):
  smoke: --gib 0.05 | --fill-gib 0.05 --load-s 60 | --fill-gib 0.02 --lag-entries 60000
  full:  --gib 4    | --fill-gib 1 --load-s 240   | --fill-gib 0.5 --lag-entries 60000

The run stops with a message when the file system of --work-dir has less than --min-free-gib
free (default 10). Values are pseudo-random (incompressible) unless --pattern-values.

Usage: scripts/bench-data-at-scale.py SCENARIO [--bin target/release/flotilla] [options]
"""

import argparse
import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

# The metrics sampled per node (names without the `flotilla_` prefix become CSV columns).
METRICS = [
    "flotilla_process_resident_memory_bytes",
    "flotilla_allocator_allocated_bytes",
    "flotilla_allocator_resident_bytes",
    "flotilla_rocksdb_written_bytes_total",
    "flotilla_rocksdb_wal_written_bytes_total",
    "flotilla_rocksdb_flush_written_bytes_total",
    "flotilla_rocksdb_compaction_written_bytes_total",
    "flotilla_process_disk_written_bytes_total",
    "flotilla_rocksdb_block_cache_usage_bytes",
    "flotilla_rocksdb_block_cache_pinned_bytes",
    "flotilla_rocksdb_memtable_bytes",
    "flotilla_rocksdb_table_readers_bytes",
    "flotilla_store_memory_budget_bytes",
    "flotilla_requests_total",
    "flotilla_net_snapshot_bytes_sent_total",
    "flotilla_net_snapshot_chunks_dropped_total",
    "flotilla_net_snapshot_bytes_received_total",
]
COLUMNS = ["t_s", "unix_s", "node", "up"] + [m.removeprefix("flotilla_") for m in METRICS] + [
    "data_dir_bytes",
    "free_disk_bytes",
]
KEY_BYTES = 16  # `flotilla bench` keys are 16 hex digits
MIB = 1 << 20
GIB = 1 << 30


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Abort(Exception):
    """The run cannot go on (disk nearly full, a server died, a step timed out)."""


def dir_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass  # removed while walking (compaction, scratch)
    return total


class Cluster:
    """Server processes on 127.0.0.1: nodes 1..boot bootstrap, later ones join."""

    def __init__(self, args, boot, total, shards, auto_balance):
        self.args = args
        self.bin = args.bin
        self.work = tempfile.mkdtemp(prefix=f"flotilla-{args.scenario}.", dir=args.work_dir)
        self.total = total
        self.procs = {}
        self.paused = set()
        certs = os.path.join(self.work, "certs")
        self.run(["cert", "ca", "--dir", certs])
        for i in range(1, total + 1):
            self.run(["cert", "node", "--dir", certs, "--id", str(i)])
        self.run(["cert", "client", "--dir", certs, "--name", "bench", "--role", "admin"])
        port = lambda i: args.base_port + i  # noqa: E731 (QUIC, UDP)
        self.metrics_port = {i: args.base_port + 10 + i for i in range(1, total + 1)}
        for i in range(1, total + 1):
            lines = [
                f"id = {i}",
                f'data_dir = "{self.work}/n{i}"',
                f'listen = "127.0.0.1:{port(i)}"',
                f'metrics_listen = "127.0.0.1:{self.metrics_port[i]}"',
                f"auto_balance = {'true' if auto_balance else 'false'}",
            ]
            if args.memory_budget:
                lines.append(f'memory_budget = "{args.memory_budget}"')
            lines += ["", "[tls]", f'ca = "{certs}/ca.pem"', f'cert = "{certs}/node-{i}.pem"',
                      f'key = "{certs}/node-{i}-key.pem"', ""]
            for p in range(1, boot + 1):
                if p != i:
                    lines += ["[[peers]]", f"id = {p}", f'addr = "127.0.0.1:{port(p)}"', ""]
            if i <= boot:
                ids = ", ".join(str(n) for n in range(1, boot + 1))
                lines += ["[bootstrap]", f"meta_voters = [{ids}]", f"shard_replicas = [{ids}]", f"shards = {shards}"]
            with open(os.path.join(self.work, f"n{i}.toml"), "w") as f:
                f.write("\n".join(lines) + "\n")
        nodes = [{"id": i, "addr": f"127.0.0.1:{port(i)}", "metrics": f"127.0.0.1:{self.metrics_port[i]}"}
                 for i in range(1, boot + 1)]
        self.cluster_file = os.path.join(self.work, "cluster.json")
        with open(self.cluster_file, "w") as f:
            json.dump({"version": 1, "nodes": nodes, "ca": f"{certs}/ca.pem",
                       "cert": f"{certs}/client-bench.pem", "key": f"{certs}/client-bench-key.pem"}, f)

    def run(self, argv, timeout=60):
        r = subprocess.run([self.bin] + argv, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise Abort(f"flotilla {' '.join(argv)} failed: {r.stderr.strip()}")
        return r.stdout

    def start(self, i):
        logf = open(os.path.join(self.work, f"n{i}.log"), "a")
        self.procs[i] = subprocess.Popen(
            [self.bin, "--log", self.args.log_level, "server", "--config", os.path.join(self.work, f"n{i}.toml")],
            stdout=logf, stderr=subprocess.STDOUT)

    def check_alive(self):
        for i, p in self.procs.items():
            if p.poll() is not None:
                raise Abort(f"server {i} exited with {p.returncode}; log: {self.work}/n{i}.log")

    def admin(self, *argv, timeout=30):
        out = self.run(["admin", *argv, "--cluster", self.cluster_file, "--json"], timeout=timeout)
        return json.loads(out)

    def shards(self):
        """`admin shards` rows: {id, replicas, leader, applied{node: index}, bytes, moving}."""
        resp = self.admin("shards")
        rows = resp.get("Shards", resp) if isinstance(resp, dict) else resp
        out = []
        for r in rows:
            d = r["descriptor"]
            out.append({
                "id": d["id"],
                "replicas": [rep["node"] for rep in d["replicas"]],
                "leader": r.get("leader"),
                "applied": {int(k): v for k, v in r.get("applied", {}).items()},
                "bytes": r.get("bytes", 0),
                "moving": r.get("moving"),
            })
        return out

    def wait_ready(self, shards, timeout=120):
        deadline = time.time() + timeout
        status = None
        while time.time() < deadline:
            self.check_alive()
            try:
                rows = self.shards()
                if len(rows) >= shards and all(r["leader"] for r in rows):
                    return rows
                status = rows
            except (Abort, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
                status = str(e)
            time.sleep(0.5)
        raise Abort(f"no {shards} shards with a leader within {timeout}s (last: {status})")

    def pause(self, i):
        self.procs[i].send_signal(signal.SIGSTOP)
        self.paused.add(i)

    def resume(self, i):
        self.procs[i].send_signal(signal.SIGCONT)
        self.paused.discard(i)

    def stop_all(self):
        for i in list(self.paused):
            self.resume(i)
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for i, p in self.procs.items():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log(f"server {i} did not stop on SIGTERM within 30 s: killing it")
                p.kill()
                p.wait()

    def scratch_files(self, i):
        """Snapshot files of node i now: sender builds, receptions, installations."""
        found = set()
        for root, dirs, files in os.walk(os.path.join(self.work, f"n{i}")):
            base = os.path.basename(root)
            if base == "flotilla-scratch":
                for f in files:
                    m = re.match(r"(snap|recv)-(\d+)-(\d+)-(\d+)-\d+\.sst$", f)
                    if m:
                        found.add((m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))))
            elif base == "flotilla-install":
                for d in dirs:
                    m = re.match(r"g(\d+)-s(\d+)$", d)
                    if m:
                        found.add(("install", int(m.group(1)), int(m.group(2)), 0))
        return found


class Sampler(threading.Thread):
    """Every `every_s`: each node's metrics into the CSV; stops the run when disk runs low."""

    def __init__(self, cluster, path, every_s, min_free_bytes, on_low_disk):
        super().__init__(daemon=True)
        self.cluster, self.every_s, self.min_free = cluster, every_s, min_free_bytes
        self.on_low_disk = on_low_disk
        self.rows = []  # dicts, also written to the CSV as they come
        self.low_disk = None
        self.stop_event = threading.Event()
        self.start_s = time.time()
        self.file = open(path, "w", newline="")
        self.csv = csv.DictWriter(self.file, fieldnames=COLUMNS)
        self.csv.writeheader()
        self.lock = threading.Lock()
        self.snapshots = {i: set() for i in range(1, cluster.total + 1)}  # every file name seen

    def sample_node(self, i, now, free):
        row = {"t_s": f"{now - self.start_s:.1f}", "unix_s": f"{now:.1f}", "node": i, "up": 0,
               "free_disk_bytes": free}
        if i in self.cluster.procs and i not in self.cluster.paused:
            try:
                url = f"http://127.0.0.1:{self.cluster.metrics_port[i]}/metrics"
                text = urllib.request.urlopen(url, timeout=2).read().decode()
                for line in text.splitlines():
                    name, _, value = line.partition(" ")
                    name = name.partition("{")[0]  # lines carry a node="N" label
                    if name in METRICS:
                        row[name.removeprefix("flotilla_")] = int(float(value))
                row["up"] = 1
            except OSError:
                pass
        if i in self.cluster.procs:
            row["data_dir_bytes"] = dir_bytes(os.path.join(self.cluster.work, f"n{i}"))
        return row

    def run(self):
        next_s = time.time()
        while not self.stop_event.is_set():
            now = time.time()
            if now >= next_s:
                next_s += self.every_s
                free = shutil.disk_usage(self.cluster.work).free
                for i in range(1, self.cluster.total + 1):
                    row = self.sample_node(i, now, free)
                    with self.lock:
                        self.rows.append(row)
                        self.csv.writerow(row)
                self.file.flush()
                if free < self.min_free and self.low_disk is None:
                    self.low_disk = f"only {free / GIB:.1f} GiB free on {self.cluster.work}: stopping the run"
                    log(self.low_disk)
                    self.on_low_disk()
            for i in self.cluster.procs:
                if i not in self.cluster.paused:
                    self.snapshots[i] |= self.cluster.scratch_files(i)
            self.stop_event.wait(0.5)

    def stop(self):
        self.stop_event.set()
        self.join(timeout=30)
        self.file.close()

    def series(self, node, column, since=None, until=None):
        with self.lock:
            return [(float(r["unix_s"]), r[column]) for r in self.rows
                    if r["node"] == node and column in r and r[column] != ""
                    and (since is None or float(r["unix_s"]) >= since)
                    and (until is None or float(r["unix_s"]) <= until)]

    def last(self, node, column, before=None):
        s = self.series(node, column, until=before)
        return s[-1][1] if s else None


class Bench:
    """One `flotilla bench` process; its JSON report when it ends."""

    def __init__(self, cluster, workload, args, keys, ops=None, duration_s=86_400, timeline_s=None, clients=None):
        argv = [cluster.bin, "bench", workload, "--cluster", cluster.cluster_file, "--json",
                "--clients", str(clients or args.clients), "--value-size", str(args.value_size),
                "--keys", str(keys), "--duration", str(duration_s)]
        if ops:
            argv += ["--ops", str(ops)]
        if not args.pattern_values:
            argv.append("--random-values")
        if timeline_s:
            argv += ["--timeline", str(timeline_s)]
        self.err = open(os.path.join(cluster.work, "bench.err"), "a")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.err, text=True)

    def wait(self, cluster):
        while self.proc.poll() is None:
            cluster.check_alive()
            time.sleep(1)
        out = self.proc.stdout.read()
        if self.proc.returncode != 0 or not out.strip():
            raise Abort(f"flotilla bench exited with {self.proc.returncode}; see {cluster.work}/bench.err")
        return json.loads(out.strip().splitlines()[-1])

    def kill(self):
        if self.proc.poll() is None:
            self.proc.terminate()


def user_ops(gib, value_size):
    return math.ceil(gib * GIB / (KEY_BYTES + value_size))


def phase(timeline, t0, t1, interval):
    """Throughput, worst interval p99 and errors of the timeline rows inside [t0, t1)."""
    rows = [r for r in timeline if r["t_s"] >= t0 and r["t_s"] + interval <= t1 + 1e-9]
    if not rows:
        return None
    ops = sum(r["ops"] for r in rows)
    return {
        "seconds": len(rows) * interval,
        "ops_per_s": round(ops / (len(rows) * interval)),
        # The latency percentile of a phase: the ops-weighted mean of per-interval p99s is close
        # to the phase's p99 when intervals have similar counts; the worst interval is given too.
        "p99_ms_mean": round(sum(r["p99_ms"] * r["ops"] for r in rows) / max(1, ops), 2),
        "p99_ms_worst_interval": max(r["p99_ms"] for r in rows),
        "max_ms": max(r["max_ms"] for r in rows),
        "errors": sum(r["errors"] for r in rows),
    }


def mib(b):
    return None if b is None else round(b / MIB, 1)


def wait_free(args):
    free = shutil.disk_usage(args.work_dir).free
    if free < args.min_free_gib * GIB:
        raise Abort(f"only {free / GIB:.1f} GiB free on {args.work_dir} (need {args.min_free_gib} GiB): not starting")
    return free


# ---------------------------------------------------------------------------------------------


def larger_than_memory(args, cluster, sampler, summary):
    cluster.wait_ready(args.shards)
    ops = user_ops(args.gib, args.value_size)
    user_bytes = ops * (KEY_BYTES + args.value_size)
    log(f"writing {ops} puts of {args.value_size} B ({user_bytes / GIB:.2f} GiB of user data, replicated to each node)")
    t0 = time.time()
    base = {i: {c: sampler.last(i, c) for c in ("rocksdb_written_bytes_total", "process_disk_written_bytes_total",
                                                 "rocksdb_wal_written_bytes_total", "rocksdb_flush_written_bytes_total",
                                                 "rocksdb_compaction_written_bytes_total")} for i in (1, 2, 3)}
    bench = Bench(cluster, "put", args, keys=ops, ops=ops, timeline_s=5)
    summary["bench_pid"] = bench.proc.pid
    cluster.bench = bench
    report = bench.wait(cluster)
    t1 = time.time()
    time.sleep(2 * args.sample_s)  # a last sample after the writes settle
    tl = report.pop("timeline")
    elapsed = report["elapsed_s"]
    done_bytes = report["ops"] * (KEY_BYTES + args.value_size)
    summary["bench"] = report
    summary["user_bytes_per_node"] = done_bytes
    summary["timeline"] = tl
    first = [r for r in tl if r["t_s"] < 60]
    last = [r for r in tl if r["t_s"] >= elapsed - 60]
    summary["put_ops_per_s_first_minute"] = round(sum(r["ops"] for r in first) / min(60, elapsed))
    # Whole 5 s rows: from the first row starting in the last minute to the end of the run.
    summary["put_ops_per_s_last_minute"] = round(sum(r["ops"] for r in last) / max(1e-9, elapsed - last[0]["t_s"])) if last else None
    summary["shards_at_end"] = len(cluster.shards())
    nodes = {}
    for i in (1, 2, 3):
        rss = [v for _, v in sampler.series(i, "process_resident_memory_bytes", since=t0)]
        n = {"rss_peak_mib": mib(max(rss)) if rss else None, "rss_final_mib": mib(rss[-1]) if rss else None,
             "data_dir_gib": round((sampler.last(i, "data_dir_bytes") or 0) / GIB, 2)}
        heap = [v for _, v in sampler.series(i, "allocator_allocated_bytes", since=t0)]
        if heap:  # live heap (jemalloc), RocksDB's included: RSS minus this is code, stacks, free pages
            n["heap_peak_mib"], n["heap_final_mib"] = mib(max(heap)), mib(heap[-1])
        for c, name in (("rocksdb_written_bytes_total", "wa_rocksdb_logical"),
                        ("process_disk_written_bytes_total", "wa_process_disk")):
            end, start = sampler.last(i, c), base[i][c] or 0
            n[name] = round((end - start) / done_bytes, 2) if end is not None else None
        phys = [sampler.last(i, c) for c in ("rocksdb_wal_written_bytes_total", "rocksdb_flush_written_bytes_total",
                                               "rocksdb_compaction_written_bytes_total")]
        if all(v is not None for v in phys):
            n["wa_rocksdb_files"] = round((sum(phys) - sum(base[i][c] or 0 for c in (
                "rocksdb_wal_written_bytes_total", "rocksdb_flush_written_bytes_total",
                "rocksdb_compaction_written_bytes_total"))) / done_bytes, 2)
        nodes[i] = n
    summary["nodes"] = nodes
    summary["goal_rss_under_1gib"] = all((n["rss_peak_mib"] or 0) < 1024 for n in nodes.values())
    summary["write_s"] = round(t1 - t0, 1)


def move_under_load(args, cluster, sampler, summary):
    cluster.wait_ready(1)
    cluster.start(4)
    deadline = time.time() + 60
    while time.time() < deadline:
        nodes = cluster.admin("nodes")
        rows = nodes.get("Nodes", nodes) if isinstance(nodes, dict) else nodes
        if any(r["node"] == 4 for r in rows):
            break
        time.sleep(1)
    else:
        raise Abort("node 4 did not join within 60 s")
    ops = user_ops(args.fill_gib, args.value_size)
    log(f"filling the shard: {ops} puts ({ops * (KEY_BYTES + args.value_size) / GIB:.2f} GiB)")
    fill = Bench(cluster, "put", args, keys=ops, ops=ops)
    cluster.bench = fill
    summary["fill"] = fill.wait(cluster)
    shard = cluster.shards()[0]
    leader = shard["leader"]
    src = args.move_from or next(n for n in shard["replicas"] if n != leader)
    # The logical size (keys and values) of what the fill wrote: `admin shards` sizes a shard only
    # up to 256 MiB (SIZE_SCAN_BYTES_MAX), and the load overwrites the same keys.
    shard_bytes = summary["fill"]["ops"] * (KEY_BYTES + args.value_size)
    summary["shard"] = {"id": shard["id"], "logical_bytes": shard_bytes, "leader": leader, "from": src, "to": 4}
    log(f"shard {shard['id']}: {shard_bytes / MIB:.0f} MiB, leader {leader}; load for {args.load_s} s, "
        f"move {src} -> 4 after {args.before_s} s")
    load = Bench(cluster, "put", args, keys=ops, duration_s=args.load_s, timeline_s=1)
    cluster.bench = load
    time.sleep(args.before_s + 2)  # the bench connects first
    disk4 = sampler.last(4, "process_disk_written_bytes_total") or 0
    rss_before = {n: sampler.last(n, "process_resident_memory_bytes") for n in (leader, src, 4)}
    m0 = time.time()
    cluster.admin("move", str(shard["id"]), str(src), "4", "--no-wait")
    m1 = None
    while time.time() < m0 + args.load_s:
        cluster.check_alive()
        row = next(r for r in cluster.shards() if r["id"] == shard["id"])
        if not row["moving"] and 4 in row["replicas"] and src not in row["replicas"]:
            m1 = time.time()
            break
        time.sleep(0.5)
    report = load.wait(cluster)
    time.sleep(2 * args.sample_s)
    tl = report.pop("timeline")
    summary["timeline"] = tl
    start = report["start_unix_s"]
    summary["load"] = report
    if m1 is None:
        summary["move_s"] = None
        log("the move did not finish while the load ran")
    else:
        summary["move_s"] = round(m1 - m0, 1)
        summary["transfer_mib_per_s"] = round(shard_bytes / MIB / (m1 - m0), 1)
        end4 = sampler.last(4, "process_disk_written_bytes_total", before=m1 + args.sample_s)
        summary["node4_disk_written_mib_during_move"] = mib(end4 - disk4) if end4 is not None else None
    m1e = m1 or time.time()
    summary["before"] = phase(tl, 0, m0 - start, 1)
    summary["during"] = phase(tl, m0 - start, m1e - start, 1)
    summary["after"] = phase(tl, m1e - start, report["elapsed_s"], 1)
    growth = {}
    for role, n in (("sender_leader", leader), ("removed_replica", src), ("receiver", 4)):
        s = [v for _, v in sampler.series(n, "process_resident_memory_bytes", since=m0, until=m1e + args.sample_s)]
        if s and rss_before[n] is not None:
            growth[role] = {"node": n, "rss_before_mib": mib(rss_before[n]), "rss_peak_mib": mib(max(s)),
                            "growth_mib": mib(max(s) - rss_before[n])}
    summary["rss_during_move"] = growth
    b, d = summary["before"], summary["during"]
    summary["goal_no_errors"] = report["errors_unknown"] + report["errors_other"] == 0
    if b and d:
        summary["goal_p99_during_under_2x_before"] = d["p99_ms_mean"] < 2 * b["p99_ms_mean"]
    summary["goal_rss_growth_under_64mib"] = all(g["growth_mib"] < 64 for k, g in growth.items()
                                                 if k in ("sender_leader", "receiver"))


def catch_up(args, cluster, sampler, summary):
    rows = cluster.wait_ready(args.shards)
    victim = 3
    for r in rows:
        if r["leader"] == victim:
            cluster.admin("transfer-leader", str(r["id"]), "1")
    if args.fill_gib > 0:
        ops = user_ops(args.fill_gib, args.value_size)
        log(f"filling: {ops} puts ({ops * (KEY_BYTES + args.value_size) / GIB:.2f} GiB)")
        fill = Bench(cluster, "put", args, keys=ops, ops=ops)
        cluster.bench = fill
        summary["fill"] = fill.wait(cluster)
    keys = max(user_ops(args.fill_gib, args.value_size), 10_000)
    load = Bench(cluster, "put", args, keys=keys, duration_s=args.load_s, timeline_s=1)
    cluster.bench = load
    time.sleep(5)
    rows = cluster.shards()
    for r in rows:
        if r["leader"] == victim:
            raise Abort(f"node {victim} leads shard {r['id']} again; cannot pause a follower")
    time.sleep(3)  # a report interval, so the victim's applied indexes below are recent
    at_pause = {r["id"]: r["applied"].get(victim, 0) for r in cluster.shards()}
    snaps_before = {i: set(s) for i, s in sampler.snapshots.items()}
    cluster.pause(victim)
    p0 = time.time()
    log(f"node {victim} stopped (SIGSTOP); waiting until every shard's leader is {args.lag_entries} entries ahead")
    while True:
        cluster.check_alive()
        rows = cluster.shards()
        lag = {r["id"]: max(r["applied"].values()) - at_pause[r["id"]] for r in rows}
        if min(lag.values()) > args.lag_entries:
            break
        if time.time() - p0 > args.load_s / 2:
            raise Abort(f"lag did not pass {args.lag_entries} within {args.load_s / 2:.0f} s: {lag}")
        time.sleep(1)
    targets = {r["id"]: max(r["applied"].values()) for r in rows}
    summary["paused_s"] = round(time.time() - p0, 1)
    summary["lag_at_resume"] = lag
    cluster.resume(victim)
    r0 = time.time()
    log(f"node {victim} continued; lag {lag}")
    caught, close = None, None
    while time.time() - r0 < args.catch_up_timeout_s:
        cluster.check_alive()
        rows = cluster.shards()
        mine = {r["id"]: r["applied"].get(victim, 0) for r in rows}
        if caught is None and all(mine[s] >= t for s, t in targets.items()):
            caught = time.time()
        if caught is not None and all(max(r["applied"].values()) - mine[r["id"]] < args.caught_up_entries
                                      for r in rows):
            close = time.time()
            break
        if load.proc.poll() is not None:
            break
        time.sleep(0.5)
    summary["reached_leader_index_at_resume_s"] = round(caught - r0, 1) if caught else None
    summary["within_caught_up_entries_s"] = round(close - r0, 1) if close else None
    time.sleep(max(0.0, 10 - (time.time() - (close or r0))))  # a loop would show up here
    seen = {i: sampler.snapshots[i] - snaps_before[i] for i in sampler.snapshots}
    count = lambda kind: {i: len({(g, sid, seq) for k, g, sid, seq in s if k == kind}) for i, s in seen.items()}  # noqa: E731
    summary["snapshot_files_seen"] = {i: sorted(f"{k}-{g}-{sid}-{seq}" for k, g, sid, seq in v) for i, v in seen.items()}
    summary["snapshots_built_by_node"] = count("snap")
    summary["snapshots_received_by_node"] = count("recv")
    summary["snapshots_installed_by_node"] = count("install")
    # The load runs to its end (--load-s), so its report, with a timeline, is kept.
    report = load.wait(cluster)
    tl = report.pop("timeline")
    summary["load"] = report
    summary["timeline"] = tl
    start = report["start_unix_s"]
    summary["before_pause"] = phase(tl, 0, p0 - start, 1)
    summary["paused"] = phase(tl, p0 - start, r0 - start, 1)
    summary["catching_up"] = phase(tl, r0 - start, (close or time.time()) - start, 1)
    summary["after"] = phase(tl, (close or time.time()) - start, report["elapsed_s"], 1)
    summary["goal_caught_up"] = close is not None
    # One build per shard at most: a transfer started over is counted in the receptions.
    summary["goal_no_snapshot_loop"] = sum(summary["snapshots_built_by_node"].values()) <= args.shards


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", choices=["larger-than-memory", "move-under-load", "catch-up"])
    ap.add_argument("--bin", default=os.environ.get("FLOTILLA_BIN", "target/release/flotilla"))
    ap.add_argument("--work-dir", default="/var/tmp", help="parent of the run's directory")
    ap.add_argument("--base-port", type=int, default=26000, help="QUIC BASE+i, metrics BASE+10+i")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--value-size", type=int, default=1024)
    ap.add_argument("--pattern-values", action="store_true", help="compressible values (bench's fixed pattern)")
    ap.add_argument("--memory-budget", help="per node, e.g. 512MiB (default: the server's)")
    ap.add_argument("--sample-s", type=float, default=None, help="metrics interval (default 5; 1 for moves)")
    ap.add_argument("--min-free-gib", type=float, default=10)
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--keep", action="store_true", help="keep the data directories and logs")
    ap.add_argument("--out", help="CSV of samples (default: <scenario>-<time>.csv in the current dir)")
    ap.add_argument("--json", help="also write the summary here")
    ap.add_argument("--gib", type=float, default=4, help="larger-than-memory: user GiB per node")
    ap.add_argument("--shards", type=int, default=None, help="initial shards (default 4; move-under-load: 1)")
    ap.add_argument("--fill-gib", type=float, default=None, help="move-under-load (1) / catch-up (0.5)")
    ap.add_argument("--load-s", type=float, default=240, help="move-under-load/catch-up: load duration")
    ap.add_argument("--before-s", type=float, default=30, help="move-under-load: load before the move")
    ap.add_argument("--move-from", type=int, help="move-under-load: node losing the replica (default a follower)")
    ap.add_argument("--lag-entries", type=int, default=60_000, help="catch-up: leader lead before continuing")
    ap.add_argument("--caught-up-entries", type=int, default=2_000, help="catch-up: lag counted as caught up")
    ap.add_argument("--catch-up-timeout-s", type=float, default=300)
    args = ap.parse_args()
    if args.sample_s is None:
        args.sample_s = 1 if args.scenario == "move-under-load" else 5
    if args.shards is None:
        args.shards = 1 if args.scenario == "move-under-load" else 4
    if args.fill_gib is None:
        args.fill_gib = 1 if args.scenario == "move-under-load" else 0.5
    args.bin = os.path.abspath(args.bin)
    if not os.access(args.bin, os.X_OK):
        sys.exit(f"not an executable: {args.bin} (cargo build --release --bin flotilla, or --bin)")
    out = args.out or f"{args.scenario}-{time.strftime('%Y%m%d-%H%M%S')}.csv"
    wait_free(args)
    summary = {"scenario": args.scenario, "args": {k: v for k, v in vars(args).items() if k != "scenario"},
               "load_before": open("/proc/loadavg").read().split()[:3], "cores": os.cpu_count(),
               "version": subprocess.run([args.bin, "--version"], capture_output=True, text=True).stdout.strip()}
    shape = {"larger-than-memory": (3, 3, True), "move-under-load": (3, 4, False), "catch-up": (3, 3, False)}
    boot, total, auto = shape[args.scenario]
    cluster = Cluster(args, boot, total, args.shards, auto)
    cluster.bench = None

    def on_low_disk():
        if cluster.bench:
            cluster.bench.kill()

    sampler = Sampler(cluster, out, args.sample_s, args.min_free_gib * GIB, on_low_disk)
    failed = True
    try:
        for i in range(1, boot + 1):
            cluster.start(i)
        sampler.start()
        log(f"{args.scenario}: {boot} servers up, work dir {cluster.work}, samples in {out}")
        {"larger-than-memory": larger_than_memory, "move-under-load": move_under_load,
         "catch-up": catch_up}[args.scenario](args, cluster, sampler, summary)
        failed = False
    except (Abort, subprocess.TimeoutExpired) as e:
        summary["error"] = sampler.low_disk or str(e)
        log(f"stopped: {summary['error']}")
    except KeyboardInterrupt:
        summary["error"] = "interrupted"
    finally:
        if cluster.bench:
            cluster.bench.kill()
        sampler.stop()
        cluster.stop_all()
        # Snapshot files seen in each node's scratch and install dirs over the whole run.
        for kind, name in (("snap", "built"), ("recv", "received"), ("install", "installed")):
            summary.setdefault(f"snapshots_{name}_by_node", {
                i: len({(g, sid, seq) for k, g, sid, seq in seen if k == kind})
                for i, seen in sampler.snapshots.items()})
        summary["load_after"] = open("/proc/loadavg").read().split()[:3]
        summary["samples_csv"] = os.path.abspath(out)
        if args.keep or failed:
            summary["kept"] = cluster.work
            log(f"kept {cluster.work} (logs: n*.log)")
        else:
            shutil.rmtree(cluster.work, ignore_errors=True)
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
