"""Measure replication between neozodb storages (see bench/README.md, "Replication").

1. Throughput: a database of N objects is written while S2 (of 2 storages,
   replicas 1) is down; S2 is started and the time until every cell is
   UP_TO_DATE again is measured.
2. Catch-up after an outage, for two database sizes: S2 is killed, a steady
   stream of small commits runs for the outage, S2 is restarted and the time
   until every cell is UP_TO_DATE is measured.  It should depend on what was
   written during the outage, not on the size of the database.
3. Latency of one-object commits on 1 storage / replicas 0 and on
   2 storages / replicas 1.

Every node process started here is stopped (killed if need be) and the
temporary directory removed on exit, error, Ctrl-C or SIGTERM.

Usage: .venv/bin/python bench/replication.py [--quick] [--objects N] [--catchup N,N]
       [--outage S] [--commits N] [--partitions P] [--adapter SQLite|PostgreSQL|MariaDB] [--keep]
       [--json FILE]
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import os
import platform
import random
import re
import sqlite3
import statistics
import sys
import time

import transaction
import ZODB
from bench import format_table, percentile  # bench/bench.py, next to this script
from BTrees.LOBTree import LOBTree
from common import run_and_report, say, stop_cluster, temporary_directory  # bench/common.py
from persistent.mapping import PersistentMapping

BATCH = 1000  # new objects per transaction while building a database
PAYLOAD_MIN, PAYLOAD_MAX = 100, 900  # characters of hardly compressible text per object
OUTAGE_OBJECTS = 5  # objects changed by each commit during the outage...
OUTAGE_PERIOD = 0.05  # ...one commit every 50 ms
LATENCY_WARMUP = 20
LATENCY_SLICE = 50  # one-object commits alternate between the clusters in slices

FULL = {"objects": 100_000, "catchup": [10_000, 100_000], "outage": 30.0, "commits": 500}
QUICK = {"objects": 10_000, "catchup": [1_000, 10_000], "outage": 3.0, "commits": 50}

LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) (\w+) ")
CELL_UP = re.compile(r"partition (\d+) up to date on (S\d+)")
REPLICATED = re.compile(r"partition (\d+) replicated from (\S+) up to \S+ \((\d+) objects in ")
MB = 1e6


def log_time(line: str) -> float | None:
    """UNIX time of a node log line (``asctime`` is local time, to the ms)."""
    m = LOG_TIME.match(line)
    if m is None:
        return None
    t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
    return t + int(m.group(2)) / 1e3


def read_log(path: str, offset: int = 0) -> list[str]:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace").splitlines()


def log_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


# -- clusters ---------------------------------------------------------------------------------
#: --adapter PostgreSQL or MariaDB: the server the storages' databases are on
#: (pg.SharedServer, mariadb_vs_relstorage.SharedMariaDB)
SERVER = None


def start_cluster(cleanup: contextlib.ExitStack, workdir: str, key: str, storages: int,
                  replicas: int, partitions: int, storage_args: list[str]):
    """storage_args: given to every storage, e.g. --replication-rate."""
    from neozodb.cli.cluster import LocalCluster
    server = SERVER
    # INFO: the replication lines of the logs are part of the measure
    cluster = LocalCluster(os.path.join(workdir, key), name="bench-" + key, storages=storages,
                           replicas=replicas, partitions=partitions, loglevel="INFO",
                           storage_args=storage_args,
                           **({} if server is None else dict(
                               adapter=getattr(server, "adapter", "PostgreSQL"),
                               databases=lambda i: server.database("%s_s%d" % (key, i)))))
    cleanup.callback(stop_cluster, cluster)  # registered before start: a failed start is cleaned
    cluster.start(wait=60)
    return cluster


def open_db(cluster) -> ZODB.DB:
    from neozodb.client import Storage
    return ZODB.DB(Storage(master_nodes=cluster.masters, name=cluster.name))


def pt_rows(cluster) -> tuple[list, dict]:
    """(partition table rows [(nid, cell state)], {storage nid: node state name})."""
    from neozodb.ctl.neoctl import CtlError
    from neozodb.protocol import NodeTypes
    try:
        ctl = cluster.ctl()
    except CtlError:
        return [], {}
    try:
        rows = ctl.partition_table().rows()
        nodes = {n[2]: n[3].name for n in ctl.nodes(NodeTypes.STORAGE)}
        return rows, nodes
    except CtlError:
        return [], {}
    finally:
        ctl.close()


def describe_pt(cluster) -> str:
    from neozodb.ctl.neoctl import CtlError, run_command
    try:
        ctl = cluster.ctl()
        try:
            return "\n".join(run_command(ctl, ["print", "pt"])[0])
        finally:
            ctl.close()
    except CtlError as e:
        return "(neoctl print pt failed: %s)" % e


def wait_all_up(cluster, timeout: float) -> float:
    """Poll the admin until every partition has replicas+1 UP_TO_DATE cells;
    return the time it took (bounded by ``timeout``)."""
    from neozodb.cli.cluster import wait_until
    from neozodb.protocol import CellStates
    up = CellStates.UP_TO_DATE.value
    t0 = time.monotonic()

    def all_up() -> bool:
        rows, _ = pt_rows(cluster)
        return bool(rows) and all(len(row) == cluster.replicas + 1 and
                                  all(state == up for _, state in row) for row in rows)
    try:
        wait_until(all_up, timeout, "every cell UP_TO_DATE")
    except TimeoutError:
        raise TimeoutError("cells not all UP_TO_DATE after %.0fs; logs in %s\n%s" % (
            timeout, cluster.directory, describe_pt(cluster))) from None
    return time.monotonic() - t0


def kill_storage(cluster, i: int, timeout: float = 30.0) -> None:
    """SIGKILL storage i, then wait until the admin shows it DOWN."""
    from neozodb.cli.cluster import wait_until
    from neozodb.cli.config import parse_nid
    nid = parse_nid("S%d" % i)
    cluster.storage(i).kill()
    wait_until(lambda: pt_rows(cluster)[1].get(nid) == "DOWN", timeout, "S%d DOWN" % i)


def start_profilers(cluster, directory: str) -> list:
    """py-spy (next to the interpreter) sampling every storage at 200 Hz,
    native frames left out, into DIRECTORY/S<i>.txt (collapsed stacks, for
    flame graphs or grep)."""
    import subprocess
    spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    os.makedirs(directory, exist_ok=True)
    procs = []
    for name, node in cluster.nodes.items():
        if name.startswith("S") and node.running:
            procs.append(subprocess.Popen(
                [spy, "record", "-p", str(node.proc.pid), "-r", "200", "-f", "raw", "-o",
                 os.path.join(directory, name + ".txt"), "--idle"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def stop_profilers(procs: list) -> None:
    import signal
    for proc in procs:
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    for proc in procs:
        try:
            proc.wait(30)
        except Exception:
            proc.kill()


def restart_and_time(cluster, i: int, timeout: float, profile: str | None = None) -> dict:
    """Start storage i, wait until all cells are UP_TO_DATE, and read the
    timings from the logs: the master's "partition N up to date on S<i>"
    lines are the moments the cells became UP_TO_DATE."""
    node = cluster.storage(i)
    name = node.name
    master_log = cluster.nodes["M1"].logfile
    master_offset = log_size(master_log)
    started = time.time()
    node.start()
    profilers = start_profilers(cluster, profile) if profile else []
    try:
        polled = wait_all_up(cluster, timeout)
    finally:
        stop_profilers(profilers)
    cells = [(log_time(line), int(m.group(1)))
             for line in read_log(master_log, master_offset)
             if (m := CELL_UP.search(line)) and m.group(2) == name]
    operational = replicated = None
    objects = 0
    for line in read_log(node.logfile, node.log_offset):
        if operational is None and name + ": operational" in line:
            operational = log_time(line)
        m = REPLICATED.search(line)
        if m:
            objects += int(m.group(3))
            replicated = (replicated or 0) + 1
    if not cells:
        raise RuntimeError("no 'up to date on %s' line in %s" % (name, master_log))
    last_up = max(t for t, _ in cells)
    return {
        "time_to_all_up_s": last_up - started,  # from the logs: ms resolution
        "polled_s": polled,  # from the admin: up to ~0.2 s late
        "startup_s": (operational - started) if operational else None,
        "cells_up": len(cells),
        "partitions_replicated": replicated or 0,
        "objects_replicated": objects,  # object records, from S<i>'s log
    }


def db_stats(path: str) -> dict:
    """Counts of a storage's SQLite database, read-only.  Read them once the
    node has stopped: a running node commits its last changes to SQLite up
    to a second late."""
    conn = sqlite3.connect("file:%s?mode=ro" % path, uri=True, timeout=10)
    try:
        obj = conn.execute("SELECT COUNT(*) FROM obj").fetchone()[0]
        trans = conn.execute("SELECT COUNT(*) FROM trans").fetchone()[0]
        data, size = conn.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(value)), 0)"
                                  " FROM data").fetchone()
    finally:
        conn.close()
    return {"obj_records": obj, "transactions": trans, "data_records": data, "data_bytes": size}


def storage_db(cluster, i: int) -> str:
    return os.path.join(cluster.directory, "storage%d.sqlite" % i)


def storage_stats(cluster, i: int) -> dict:
    """``db_stats`` of storage i, whatever its adapter."""
    if cluster.adapter != "SQLite":
        return SERVER.stats(cluster.database(i))
    return db_stats(storage_db(cluster, i))


def compare_storages(cluster, where: str, anomalies: list[str]) -> dict:
    """Counts of S1's database, after checking that S2's are the same."""
    s1, s2 = storage_stats(cluster, 1), storage_stats(cluster, 2)
    if s1 != s2:
        anomalies.append("%s: S1 and S2 databases differ after replication: S1 %s, S2 %s" % (
            where, s1, s2))
    return s1


def log_problems(cluster, where: str, anomalies: list[str]) -> None:
    """WARNING and worse lines (and tracebacks) of every node log, grouped."""
    seen: dict[str, int] = {}
    for node in cluster.nodes.values():
        try:
            lines = read_log(node.logfile)
        except FileNotFoundError:
            continue
        for line in lines:
            m = LOG_TIME.match(line)
            if (m and m.group(3) in ("WARNING", "ERROR", "CRITICAL")) or \
                    line.startswith("Traceback"):
                text = line[m.end():] if m else line
                text = re.sub(r"\b[0-9a-f]{16}\b|:\d{4,5}\b", "*", text)  # tids, ports
                seen[text] = seen.get(text, 0) + 1
    for text, count in seen.items():
        anomalies.append("%s log: %s%s" % (where, text, " (x%d)" % count if count > 1 else ""))


# -- workload ---------------------------------------------------------------------------------
class Writer:
    """Builds and changes a database of PersistentMappings in an LOBTree."""

    def __init__(self, db: ZODB.DB, seed: int) -> None:
        self.rng = random.Random(seed)
        self.tm = transaction.TransactionManager()
        self.conn = db.open(self.tm)
        root = self.conn.root()
        if "objs" not in root:
            root["objs"] = LOBTree()
            self.tm.commit()
        self.tree = root["objs"]
        self.count = len(self.tree)
        self.payload_chars = 0

    def payload(self) -> str:
        n = self.rng.randint(PAYLOAD_MIN, PAYLOAD_MAX)
        text = base64.b64encode(self.rng.randbytes(n * 3 // 4 + 3)).decode()[:n]
        self.payload_chars += n
        return text

    def add(self, n: int, progress=None) -> None:
        """Add n objects, BATCH per transaction."""
        done = 0
        while done < n:
            size = min(BATCH, n - done)
            for k in range(self.count, self.count + size):
                self.tree[k] = PersistentMapping({"data": self.payload()})
            self.tm.commit()
            self.conn.cacheGC()
            self.count += size
            done += size
            if progress and done % (20 * BATCH) == 0 and done < n:
                progress(done)

    def change(self, n: int) -> None:
        """One transaction changing n random existing objects."""
        for k in self.rng.sample(range(self.count), n):
            self.tree[k]["data"] = self.payload()
        self.tm.commit()

    def close(self) -> None:
        self.tm.abort()
        self.conn.close()


def build(cluster, objects: int, seed: int, label: str) -> tuple[float, int]:
    """Write `objects` objects; (seconds, payload characters)."""
    db = open_db(cluster)
    try:
        writer = Writer(db, seed)
        t0 = time.perf_counter()
        writer.add(objects, lambda done: say("    %s: %d objects written (%.0fs)" % (
            label, done, time.perf_counter() - t0)))
        elapsed = time.perf_counter() - t0
        writer.close()
    finally:
        db.close()
    return elapsed, writer.payload_chars


# -- measures ------------------------------------------------------------------------------------
def measure_throughput(cleanup, workdir, opts, anomalies) -> dict:
    say("1. throughput: %d objects written while S2 is down, then S2 started" % opts.objects)
    cluster = start_cluster(cleanup, workdir, "throughput", 2, 1, opts.partitions,
                            opts.storage_args)
    kill_storage(cluster, 2)
    build_s, chars = build(cluster, opts.objects, 1, "throughput")
    say("    built in %.1fs; starting S2" % build_s)
    timing = restart_and_time(cluster, 2, opts.timeout, opts.profile)
    log_problems(cluster, "throughput", anomalies)
    stop_cluster(cluster)
    stats = compare_storages(cluster, "throughput", anomalies)
    if timing["objects_replicated"] != stats["obj_records"]:
        anomalies.append("throughput: S2 logged %d objects replicated, S1 holds %d records" % (
            timing["objects_replicated"], stats["obj_records"]))
    t = timing["time_to_all_up_s"]
    result = {**timing, **stats, "objects": opts.objects, "build_s": build_s,
              "payload_chars": chars, "mb_per_s": stats["data_bytes"] / MB / t,
              "objects_per_s": stats["obj_records"] / t}
    replicating = t - (timing["startup_s"] or 0)
    result["mb_per_s_after_startup"] = stats["data_bytes"] / MB / replicating
    result["objects_per_s_after_startup"] = stats["obj_records"] / replicating
    say("    all cells U %.2fs after starting S2 (polled: %.2fs)" % (t, timing["polled_s"]))
    return result


def measure_catchup(cleanup, workdir, opts, size: int, anomalies) -> dict:
    key = "catchup%d" % size
    say("2. catch-up: database of %d objects, %.0fs outage of S2" % (size, opts.outage))
    cluster = start_cluster(cleanup, workdir, key, 2, 1, opts.partitions, opts.storage_args)
    build_s, _ = build(cluster, size, 2, key)
    wait_all_up(cluster, opts.timeout)  # both storages had everything before the outage
    db = open_db(cluster)
    try:
        writer = Writer(db, 3)
        writer.change(OUTAGE_OBJECTS)  # loads the tree before the outage
        t_kill = time.perf_counter()
        kill_storage(cluster, 2)
        commits = 0
        deadline = t_kill + opts.outage
        next_commit = time.perf_counter()
        while True:
            now = time.perf_counter()
            if now >= deadline:
                break
            if now < next_commit:
                time.sleep(min(next_commit, deadline) - now)  # the steady rate, not a wait
                continue
            writer.change(OUTAGE_OBJECTS)
            commits += 1
            next_commit += OUTAGE_PERIOD
        outage = time.perf_counter() - t_kill
        writer.close()
    finally:
        db.close()
    say("    %d commits (%d objects) during %.1fs of outage; restarting S2" % (
        commits, commits * OUTAGE_OBJECTS, outage))
    timing = restart_and_time(cluster, 2, opts.timeout)
    log_problems(cluster, key, anomalies)
    stop_cluster(cluster)
    after = compare_storages(cluster, key, anomalies)
    say("    all cells U %.2fs after restarting S2 (polled: %.2fs)" % (
        timing["time_to_all_up_s"], timing["polled_s"]))
    return {**timing, "objects": size, "build_s": build_s, "outage_s": outage,
            "commits": commits, "objects_written": commits * OUTAGE_OBJECTS,
            "obj_records": after["obj_records"], "data_bytes": after["data_bytes"]}


def measure_latency(cleanup, workdir, opts, anomalies) -> dict:
    say("3. latency of %d one-object commits: 1S r0 vs 2S r1" % opts.commits)
    configs = {"1S r0": (1, 0), "2S r1": (2, 1)}
    clusters, dbs, writers, times = {}, {}, {}, {}
    try:
        for label, (storages, replicas) in configs.items():
            key = "latency_%ds_r%d" % (storages, replicas)
            clusters[label] = start_cluster(cleanup, workdir, key, storages, replicas,
                                            opts.partitions, opts.storage_args)
            dbs[label] = open_db(clusters[label])
            writers[label] = Writer(dbs[label], 4)
            writers[label].add(100)
            for _ in range(LATENCY_WARMUP):
                writers[label].change(1)
            times[label] = []
        # slices alternate between the clusters: a load burst hits both
        while len(times["2S r1"]) < opts.commits:
            for label, writer in writers.items():
                for _ in range(min(LATENCY_SLICE, opts.commits - len(times[label]))):
                    t0 = time.perf_counter()
                    writer.change(1)
                    times[label].append(time.perf_counter() - t0)
        for writer in writers.values():
            writer.close()
    finally:
        for db in dbs.values():
            db.close()
    for label, cluster in clusters.items():
        log_problems(cluster, "latency " + label, anomalies)
        stop_cluster(cluster)
    return {label: {"median_ms": statistics.median(t) * 1e3, "p90_ms": percentile(t, 90) * 1e3,
                    "max_ms": max(t) * 1e3, "commits_ms": [x * 1e3 for x in t]}
            for label, t in times.items()}


# -- report ------------------------------------------------------------------------------------
def report(results: dict) -> str:
    out = []
    r = results.get("throughput")
    if r:
        out.append(format_table(
            ["throughput (S2 empty)", "records", "data MB", "all U (s)", "MB/s", "objects/s",
             "S2 start (s)", "MB/s w/o start"],
            [["%d objects" % r["objects"], str(r["obj_records"]), "%.1f" % (r["data_bytes"] / MB),
              "%.2f" % r["time_to_all_up_s"], "%.2f" % r["mb_per_s"],
              "%.0f" % r["objects_per_s"], "%.2f" % (r["startup_s"] or 0),
              "%.2f" % r["mb_per_s_after_startup"]]]))
    rows = [["%d objects" % c["objects"], "%.1f" % c["outage_s"], str(c["commits"]),
             str(c["objects_written"]), str(c["objects_replicated"]),
             "%.2f" % c["time_to_all_up_s"], "%.2f" % (c["startup_s"] or 0),
             "%.2f" % c["polled_s"]] for c in results.get("catchup", [])]
    if rows:
        out += ["", format_table(["catch-up (database)", "outage (s)", "commits",
                                  "objects written", "records replicated", "all U (s)",
                                  "S2 start (s)", "polled (s)"], rows)]
    lat = results.get("latency")
    if lat:
        labels = list(lat)
        out += ["", format_table(
            ["1-object commit, ms", *labels],
            [[name, *("%.2f" % lat[label][key] for label in labels)]
             for name, key in (("median", "median_ms"), ("p90", "p90_ms"), ("max", "max_ms"))])]
    return "\n".join(out)


# -- main ------------------------------------------------------------------------------------------
def run(opts, anomalies: list[str]) -> dict:
    global SERVER
    results: dict = {}
    with temporary_directory("replication", opts.keep) as (cleanup, workdir):
        if opts.adapter != "SQLite":
            if opts.adapter == "PostgreSQL":
                from pg import SharedServer
                SERVER = SharedServer()
            else:
                from mariadb_vs_relstorage import SharedMariaDB
                SERVER = SharedMariaDB()
            SERVER.acquire(workdir)
            cleanup.callback(SERVER.release)  # first in: stopped after the clusters
        if "throughput" in opts.only:
            results["throughput"] = measure_throughput(cleanup, workdir, opts, anomalies)
        if "catchup" in opts.only:
            results["catchup"] = [measure_catchup(cleanup, workdir, opts, size, anomalies)
                                  for size in opts.catchup]
        if "latency" in opts.only:
            results["latency"] = measure_latency(cleanup, workdir, opts, anomalies)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="10x smaller: --objects 10000 --catchup 1000,10000 --outage 3 "
                        "--commits 50")
    parser.add_argument("--objects", type=int, help="database size for the throughput (100000)")
    parser.add_argument("--catchup", help="database sizes for the catch-up (10000,100000)")
    parser.add_argument("--outage", type=float, help="seconds S2 is down (30)")
    parser.add_argument("--commits", type=int, help="one-object commits per cluster (500)")
    parser.add_argument("--partitions", type=int, default=12, help="partitions (12)")
    parser.add_argument("--adapter", choices=("SQLite", "PostgreSQL", "MariaDB"),
                        default="SQLite",
                        help="the storages' backend (SQLite; PostgreSQL or MariaDB: on a"
                        " throw-away server, bench/pg.py, bench/mariadb_vs_relstorage.py)")
    parser.add_argument("--replication-rate", metavar="BYTES",
                        help="passed to every storage (default: no cap)")
    parser.add_argument("--only", default="throughput,catchup,latency",
                        help="comma-separated measures to run (default: all three)")
    parser.add_argument("--timeout", type=float, default=300,
                        help="bound on each wait for all cells UP_TO_DATE (300 s)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (node logs, databases)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--profile", metavar="DIR",
                        help="py-spy the storages while S2 replicates in the throughput"
                        " measure; collapsed stacks in DIR/S1.txt and DIR/S2.txt")
    opts = parser.parse_args(argv)
    defaults = QUICK if opts.quick else FULL
    opts.objects = opts.objects or defaults["objects"]
    opts.catchup = ([int(s) for s in opts.catchup.split(",")] if opts.catchup
                    else defaults["catchup"])
    opts.outage = opts.outage if opts.outage is not None else defaults["outage"]
    opts.commits = opts.commits or defaults["commits"]
    opts.only = set(opts.only.split(","))
    if not opts.only <= {"throughput", "catchup", "latency"}:
        parser.error("--only takes throughput, catchup, latency")
    if min(opts.objects, opts.commits, *opts.catchup) < 1 or opts.outage <= 0:
        parser.error("sizes and the outage must be positive")
    opts.storage_args = (["--replication-rate", opts.replication_rate]
                         if opts.replication_rate else [])
    title = "replication benchmark: %d partitions, %d CPUs, Python %s" % (
        opts.partitions, os.cpu_count() or 0, platform.python_version())
    return run_and_report(run, opts, report, title)


if __name__ == "__main__":
    sys.exit(main())
