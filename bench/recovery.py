"""Measure recovery after a whole-cluster SIGKILL (see bench/README.md,
"Recovery after a whole-cluster SIGKILL").

For each configuration (2 storages with replicas 1, 1 storage with
replicas 0) and database size: a database of N objects is written, then,
several times, a writer process commits small transactions, every node is
SIGKILLed at once (the writer too), every node is started again, and the
script times how long until the cluster is RUNNING, until a new client
reads, and until it commits.  The log lines of the nodes (millisecond
timestamps) break the restart into its phases.

Every node process started here is stopped (killed if need be) and the
temporary directory removed on exit, error, Ctrl-C or SIGTERM.

Usage: .venv/bin/python bench/recovery.py [--quick] [--sizes N,N] [--runs R]
       [--configs LIST] [--no-writer] [--partitions P] [--keep] [--json FILE]
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import textwrap
import time

import transaction
import ZODB
from bench import format_table  # bench/bench.py, next to this script
from common import run_and_report, say, stop_cluster, temporary_directory  # bench/common.py
from replication import (  # bench/replication.py: same clusters, workload and log reading
    build,
    compare_storages,
    db_stats,
    log_problems,
    log_size,
    log_time,
    read_log,
    start_cluster,
    storage_db,
    wait_all_up,
)
from ZODB.utils import z64

CONFIGS = {"2S r1": (2, 1), "1S r0": (1, 0)}
FULL = {"sizes": [10_000, 100_000], "runs": 3}
QUICK = {"sizes": [1_000, 10_000], "runs": 1}
WRITER_COMMITS = 10  # commits the writer makes before the kill, at least

# A client process changing 5 random objects of the tree per transaction,
# printing the TID of each commit once acknowledged, until it is killed.
WRITER = textwrap.dedent("""
    import random, sys, transaction, ZODB
    from neozodb.client import Storage
    masters, name, count = sys.argv[1:]
    db = ZODB.DB(Storage(masters, name))
    tm = transaction.TransactionManager()
    tree = db.open(tm).root()["objs"]
    rng = random.Random()
    while True:
        for k in rng.sample(range(int(count)), 5):
            tree[k]["data"] = "%x" % rng.getrandbits(2000)
        tm.commit()
        print(tree[k]._p_serial.hex(), flush=True)
""")

# phases of a restart, from the node logs: (name, node, pattern); the
# last matching line of any node named counts (e.g. the last storage)
PHASES = [
    ("master up", "M1", re.compile(r"M1: listening on ")),
    ("storages up", "S", re.compile(r"S\d+: listening on ")),
    ("identified", "S", re.compile(r"S\d+: identified by master")),
    ("VERIFYING", "M1", re.compile(r"cluster state RECOVERING -> VERIFYING")),
    ("RUNNING", "M1", re.compile(r"cluster state VERIFYING -> RUNNING")),
    ("ready", "M1", re.compile(r"M1: S\d+ ready")),
]


def kill_all(cluster) -> None:
    """SIGKILL every node at once, then reap them."""
    for node in cluster.nodes.values():
        node.signal(signal.SIGKILL)
    cluster.kill()


def wait_line(path: str, offset: int, pattern: re.Pattern, timeout: float) -> None:
    """Poll a node log (5 ms steps) until a line after ``offset`` matches."""
    deadline = time.monotonic() + timeout
    while not any(pattern.search(line) for line in read_log(path, offset)):
        if time.monotonic() > deadline:
            raise TimeoutError("no %r in %s" % (pattern.pattern, path))
        time.sleep(0.005)  # polling a log file: the resolution of the measure


class LoadWriter:
    def __init__(self, cluster, objects: int, out: str) -> None:
        self.out = out
        with open(out, "wb") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", WRITER, cluster.masters, cluster.name, str(objects)],
                stdout=f, stderr=subprocess.DEVNULL)

    def tids(self) -> list[str]:
        with open(self.out) as f:
            return f.read().split()

    def wait_commits(self, count: int, timeout: float = 60) -> None:
        from neozodb.cli.cluster import wait_until
        wait_until(lambda: len(self.tids()) >= count or self.proc.poll() is not None,
                   timeout, "writer commits")
        if self.proc.poll() is not None:
            raise RuntimeError("the writer exited with status %d" % self.proc.returncode)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def missing_commits(cluster, acked: list[str]) -> list[str]:
    """The acknowledged TIDs (hex) that the cluster does not have: every
    transaction from the first of them is listed by a new client."""
    if not acked:
        return []
    from neozodb.client import Storage
    storage = Storage(cluster.masters, cluster.name)
    try:
        present = {t.tid.hex() for t in storage.iterator(bytes.fromhex(min(acked)))}
    finally:
        storage.close()
    return [tid for tid in acked if tid not in present]


def restart_and_time(cluster, probe: int, timeout: float) -> dict:
    """Start every node; a new client connects as soon as the master
    listens (it is held until the cluster runs), reads the root object and
    commits.  Times are seconds from the start of the processes."""
    from neozodb.client import Storage
    offsets = {name: log_size(node.logfile) for name, node in cluster.nodes.items()}
    master = cluster.nodes["M1"]
    t0 = time.time()
    for node in cluster.nodes.values():
        node.start()
    wait_line(master.logfile, offsets["M1"], PHASES[0][2], timeout)
    storage = Storage(cluster.masters, cluster.name)
    db = None
    try:
        connected = time.time()
        storage.load(z64)
        read = time.time()
        # what the cluster has after its recovery, before the probe's commit
        recovered = storage.lastTransaction()
        db = ZODB.DB(storage)
        tm = transaction.TransactionManager()
        root = db.open(tm).root()
        root["recovery probe"] = probe
        tm.commit()
        committed = time.time()
    finally:
        if db is not None:
            db.close()
        else:
            storage.close()
    result = {"started_at": t0, "connected_s": connected - t0, "read_s": read - t0, "commit_s": committed - t0,
              "last_tid": recovered.hex()}
    for name, who, pattern in PHASES:
        times = [log_time(line) for node_name, node in cluster.nodes.items()
                 if node_name == who or (who == "S" and node_name.startswith("S"))
                 for line in read_log(node.logfile, offsets[node_name]) if pattern.search(line)]
        result[name] = (max(times) - t0) if times else None
    return result


def measure(cleanup, workdir, opts, label: str, size: int, anomalies: list[str]) -> dict:
    storages, replicas = CONFIGS[label]
    key = "%s_%d" % (label.replace(" ", "_"), size)
    say("%s, %d objects" % (label, size))
    cluster = start_cluster(cleanup, workdir, key, storages, replicas, opts.partitions, [])
    build_s, _ = build(cluster, size, 1, key)
    if replicas:
        wait_all_up(cluster, opts.timeout)
    say("    built in %.1fs" % build_s)
    runs = []
    for r in range(opts.runs):
        writer = None
        if opts.writer:
            writer = LoadWriter(cluster, size, os.path.join(workdir, key + "-writer%d.out" % r))
            try:
                writer.wait_commits(WRITER_COMMITS)
            finally:
                kill_all(cluster)
                writer.kill()
        else:
            kill_all(cluster)
        timing = restart_and_time(cluster, r, opts.timeout)
        if writer is not None:
            acked = writer.tids()
            timing["writer_commits"] = len(acked)
            missing = missing_commits(cluster, acked)
            if missing:
                anomalies.append("%s: %d acknowledged commits of the writer missing after the"
                                 " restart (last tid recovered %s): %s" % (
                                     key, len(missing), timing["last_tid"], " ".join(missing)))
        if replicas:
            # the master may have outdated a storage it saw die before itself
            wait_all_up(cluster, opts.timeout)
            timing["all_up_s"] = time.time() - timing["started_at"]
        runs.append(timing)
        say("    run %d: RUNNING %.2fs, read %.2fs, commit %.2fs after the restart%s" % (
            r + 1, timing["RUNNING"], timing["read_s"], timing["commit_s"],
            ", %d commits by the writer before the kill" % timing["writer_commits"]
            if writer else ""))
    problems: list[str] = []
    log_problems(cluster, key, problems)
    # a node that outlives the master by a few microseconds logs it: expected
    anomalies += [p for p in problems if "lost the master" not in p]
    stop_cluster(cluster)
    stats = (compare_storages(cluster, key, anomalies) if replicas
             else db_stats(storage_db(cluster, 1)))
    summary = {name: statistics.median(r[name] for r in runs)
               for name in [p[0] for p in PHASES] + ["connected_s", "read_s", "commit_s"]
               if all(r[name] is not None for r in runs)}
    if replicas:
        summary["all_up_s"] = statistics.median(r["all_up_s"] for r in runs)
    return {"config": label, "objects": size, "build_s": build_s, **stats,
            "median": summary, "runs": runs}


def report(results: list[dict]) -> str:
    header = ["median of runs, s", "records", "data MB", "RUNNING", "read", "commit", "all U"]
    rows = [["%s, %d objects" % (r["config"], r["objects"]), str(r["obj_records"]),
             "%.1f" % (r["data_bytes"] / 1e6), "%.2f" % r["median"]["RUNNING"],
             "%.2f" % r["median"]["read_s"], "%.2f" % r["median"]["commit_s"],
             "%.2f" % r["median"]["all_up_s"] if "all_up_s" in r["median"] else "-"]
            for r in results]
    phases = [["%s, %d objects" % (r["config"], r["objects"]),
               *("%.2f" % r["median"][name] if name in r["median"] else "-"
                 for name, _, _ in PHASES)] for r in results]
    return "\n".join([format_table(header, rows), "",
                      format_table(["phases (from the logs), s", *(p[0] for p in PHASES)],
                                   phases)])


def run(opts, anomalies: list[str]) -> list[dict]:
    results = []
    with temporary_directory("recovery", opts.keep) as (cleanup, workdir):
        for size in opts.sizes:
            for label in opts.configs:
                results.append(measure(cleanup, workdir, opts, label, size, anomalies))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="--sizes 1000,10000 --runs 1")
    parser.add_argument("--sizes", help="database sizes in objects (10000,100000)")
    parser.add_argument("--runs", type=int, help="kills per database; medians are shown (3)")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="comma-separated among: %s" % ", ".join(CONFIGS))
    parser.add_argument("--no-writer", dest="writer", action="store_false",
                        help="kill an idle cluster (default: a writer commits during the kill)")
    parser.add_argument("--partitions", type=int, default=12, help="partitions (12)")
    parser.add_argument("--timeout", type=float, default=120,
                        help="bound on each wait (120 s)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (node logs, databases)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    opts = parser.parse_args(argv)
    defaults = QUICK if opts.quick else FULL
    opts.sizes = [int(s) for s in opts.sizes.split(",")] if opts.sizes else defaults["sizes"]
    opts.runs = opts.runs or defaults["runs"]
    opts.configs = opts.configs.split(",")
    if not set(opts.configs) <= set(CONFIGS):
        parser.error("--configs takes " + ", ".join(CONFIGS))
    if min(opts.sizes) < 5 or opts.runs < 1:
        parser.error("sizes must be at least 5 objects, runs at least 1")
    title = "recovery benchmark: %d partitions, %d CPUs, Python %s, %s" % (
        opts.partitions, os.cpu_count() or 0, platform.python_version(),
        "a writer committing during each kill" if opts.writer else "idle cluster killed")
    return run_and_report(run, opts, report, title)


if __name__ == "__main__":
    sys.exit(main())
