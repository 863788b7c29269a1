"""Measure pack with garbage collection (see bench/README.md, "Pack").

A database of N objects (an LOBTree of PersistentMappings, as in
bench/replication.py) is written to 2 storages (replicas 1) and 10% of the
objects are changed once (history).  Then:

1. a quarter of the objects are removed from the tree (garbage), and
   another client process runs ``Storage.pack()`` (GC on, waiting for the
   storages) with nothing else running: the pack time (mark phase in the
   packing client, then the storages' background work);
2. another quarter is removed; one-object commits on the idle cluster,
   then the same pack while this process keeps making one-object commits
   until it returns: their latencies, idle and during the pack;
3. for both packs, the peak memory (VmHWM, reset just before) of the
   packing client, of each storage and of the master;
4. afterwards: object records and data bytes, the same on both storages;
   every reachable object still loads, the garbage does not (from a new
   client).

Every node process started here is stopped (killed if need be) and the
temporary directory removed on exit, error, Ctrl-C or SIGTERM.

Usage: .venv/bin/python bench/pack.py [--quick] [--objects N] [--partitions P]
       [--pack-rate N] [--keep] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import textwrap
import threading
import time

from bench import format_table, percentile  # bench/bench.py, next to this script
from common import run_and_report, say, stop_cluster, temporary_directory  # bench/common.py
from replication import (  # bench/replication.py
    Writer,
    compare_storages,
    log_problems,
    log_time,
    open_db,
    read_log,
    start_cluster,
    wait_all_up,
)
from ZODB.POSException import POSKeyError

from neozodb.client import Storage

FULL = {"objects": 100_000, "commits": 200}
QUICK = {"objects": 10_000, "commits": 50}
CHANGED = 0.1   # fraction of the objects changed once before the first pack
GARBAGE = 0.5   # fraction removed from the tree (unreachable), half before each pack
MB = 1e6


def vm_hwm(pid: int | str = "self") -> int:
    """Peak resident set size of a process, in bytes."""
    with open("/proc/%s/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_hwm(pid: int | str = "self") -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/%s/clear_refs" % pid, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# The packing client, in its own process (as zeopack would be): its memory
# is its own, and the mark phase does not compete for the GIL with the
# commits being measured.  Prints one JSON line.
PACKER = textwrap.dedent("""
    import json, logging, os, sys, time
    from ZODB.serialize import referencesf
    from neozodb.client import Storage

    class Mark(logging.Handler):
        end = unreachable = loads = None
        def emit(self, record):
            message = record.getMessage()
            if "unreachable objects" in message:
                Mark.end = record.created
                words = message.split()
                Mark.unreachable = int(words[words.index("unreachable") - 1])
                Mark.loads = int(message.split("(")[1].split()[0])
    log = logging.getLogger("neozodb.client")
    log.addHandler(Mark())
    log.setLevel(logging.INFO)
    storage = Storage(sys.argv[1], sys.argv[2])
    started = time.time()
    storage.pack(time.time(), referencesf)
    ended = time.time()
    with open("/proc/self/status") as f:
        hwm = [int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:")][0]
    storage.close()
    print(json.dumps({"started": started, "ended": ended, "mark_end": Mark.end,
                      "unreachable": Mark.unreachable, "loads": Mark.loads, "vmhwm": hwm}))
""")


def commits(writer: Writer, keys: list[int], count: int | None,
            until: threading.Event | None = None) -> list[tuple[float, float]]:
    """(end time, seconds) of one-object commits changing one of ``keys``:
    ``count`` of them, or until ``until`` is set."""
    times = []
    while (count is not None and len(times) < count) or (until is not None and not until.is_set()):
        t0 = time.perf_counter()
        writer.tree[writer.rng.choice(keys)]["data"] = writer.payload()
        writer.tm.commit()
        times.append((time.time(), time.perf_counter() - t0))
    return times


def storage_pack_times(cluster, since: float) -> dict:
    """Per storage: (first, last) time of its "partition N packed" lines
    after ``since``, and the objects visited."""
    out = {}
    for i in (1, 2):
        node = cluster.nodes["S%d" % i]
        stamps, visited, deleted = [], 0, 0
        for line in read_log(node.logfile, node.log_offset):
            if "packed up to order" in line:
                t = log_time(line)
                if t is not None and t >= since - 1:
                    stamps.append(t)
                    visited += int(line.split(" objects visited")[0].split()[-1])
                    deleted += int(line.split(" revisions deleted")[0].split()[-1])
        out["S%d" % i] = {"last": max(stamps, default=None), "visited": visited,
                          "deleted": deleted}
    return out


def unlink(writer: Writer, keys: list[int], count: int, rng: random.Random
           ) -> tuple[list[bytes], list[int]]:
    """Remove ``count`` random entries of ``keys`` from the tree: (their
    oids, the keys left)."""
    doomed = sorted(rng.sample(keys, count))
    oids = []
    for start in range(0, len(doomed), 5000):
        for k in doomed[start:start + 5000]:
            oids.append(writer.tree[k]._p_oid)
            del writer.tree[k]
        writer.tm.commit()
        writer.conn.cacheGC()
    gone = set(doomed)
    return oids, [k for k in keys if k not in gone]


def run_pack(cluster, opts, anomalies, writer: Writer | None = None,
             keys: list[int] | None = None) -> dict:
    """Pack from another client process; with ``writer``, make one-object
    commits until it returns."""
    pids = {name: cluster.nodes[name].proc.pid for name in ("S1", "S2", "M1")}
    reset = all(reset_hwm(pid) for pid in pids.values())
    if not reset:
        anomalies.append("could not reset VmHWM: storage peaks include the build")
    done = threading.Event()
    output: list[str] = []

    def pack():
        try:
            proc = subprocess.run([sys.executable, "-c", PACKER, cluster.masters, cluster.name],
                                  capture_output=True, text=True, timeout=opts.timeout)
            output.append(("packer failed: " + proc.stderr) if proc.returncode else proc.stdout)
        finally:
            done.set()
    thread = threading.Thread(target=pack, daemon=True)
    thread.start()
    during = commits(writer, keys, None, done) if writer is not None else []
    thread.join()
    if not output or output[0].startswith("packer failed"):
        raise RuntimeError(output[0] if output else "packer did not report")
    packed = json.loads(output[0].strip().splitlines()[-1])
    started = packed["started"]
    mark_end = packed["mark_end"] or started
    peaks = {name: vm_hwm(pid) for name, pid in pids.items()}
    peaks["packing client"] = packed["vmhwm"]
    storages = storage_pack_times(cluster, started)
    say("    packed in %.2fs (mark %.2fs)%s" % (
        packed["ended"] - started, mark_end - started,
        ", %d commits meanwhile" % len(during) if writer is not None else ""))
    return {"pack_s": packed["ended"] - started, "mark_s": mark_end - started,
            "unreachable": packed["unreachable"], "mark_loads": packed["loads"],
            "storage_apply_s": {name: (v["last"] - mark_end) if v["last"] else None
                                for name, v in storages.items()},
            "storage_visited": {name: v["visited"] for name, v in storages.items()},
            "storage_deleted": {name: v["deleted"] for name, v in storages.items()},
            "peak_rss_bytes": peaks, "peaks_reset": reset,
            "during": during, "mark_end": mark_end}


def lat(times) -> dict | None:
    t = [d for _, d in times]
    if not t:
        return None
    return {"count": len(t), "median_ms": statistics.median(t) * 1e3,
            "p90_ms": percentile(t, 90) * 1e3, "max_ms": max(t) * 1e3}


def measure(cleanup, workdir, opts, anomalies) -> dict:
    n = opts.objects
    say("database of %d objects, %d%% changed once, 2 storages, replicas 1" % (n, CHANGED * 100))
    storage_args = ["--pack-rate", str(opts.pack_rate)] if opts.pack_rate else []
    cluster = start_cluster(cleanup, workdir, "pack", 2, 1, opts.partitions, storage_args)
    db = open_db(cluster)
    rng = random.Random(2)
    result: dict = {"objects": n}
    try:
        writer = Writer(db, 1)
        t0 = time.perf_counter()
        writer.add(n, lambda done: say("    %d objects written (%.0fs)" % (
            done, time.perf_counter() - t0)))
        for start in range(0, int(n * CHANGED), 1000):
            for k in range(start, min(start + 1000, int(n * CHANGED))):
                writer.tree[k]["data"] = writer.payload()
            writer.tm.commit()
            writer.conn.cacheGC()
        keys = list(range(n))
        garbage, keys = unlink(writer, keys, int(n * GARBAGE / 2), rng)
        result["build_s"] = time.perf_counter() - t0
        wait_all_up(cluster, opts.timeout)
        say("    built in %.1fs; 1. pack of %d garbage objects, nothing else running" % (
            result["build_s"], len(garbage)))
        result["idle_pack"] = idle_pack = run_pack(cluster, opts, anomalies)
        garbage2, keys = unlink(writer, keys, int(n * GARBAGE / 2), rng)
        garbage += garbage2
        say("    2. %d one-object commits on the idle cluster, then a pack of %d garbage"
            " objects while they go on" % (opts.commits, len(garbage2)))
        idle = commits(writer, keys, opts.commits)
        result["busy_pack"] = busy_pack = run_pack(cluster, opts, anomalies, writer, keys)
        after = commits(writer, keys, 20)
        writer.close()
        for label, pack, count in (("idle", idle_pack, len(garbage) - len(garbage2)),
                                   ("busy", busy_pack, len(garbage2))):
            if pack["unreachable"] is not None and pack["unreachable"] < count:
                anomalies.append("%s pack: the mark found %d unreachable objects, %d were"
                                 " made garbage" % (label, pack["unreachable"], count))

        # what is left: reachable objects load, garbage does not
        conn = db.open()
        tree = conn.root()["objs"]
        sample = keys[::max(1, len(keys) // 500)]
        bad = [k for k in sample if "data" not in tree[k]]
        if len(tree) != len(keys) or bad:
            anomalies.append("reachable objects lost: %d entries, %d unreadable" % (
                len(tree), len(bad)))
        conn.close()
        # a new client: the others' caches keep what was collected (as ZEO's)
        storage = Storage(master_nodes=cluster.masters, name=cluster.name)
        cleanup.callback(storage.close)
        alive = 0
        for oid in garbage[::max(1, len(garbage) // 500)]:
            try:
                storage.load(oid)
                alive += 1
            except POSKeyError:
                pass
        if alive:
            anomalies.append("%d sampled garbage objects still load" % alive)
    finally:
        db.close()
    log_problems(cluster, "pack", anomalies)
    stop_cluster(cluster)
    result["after"] = compare_storages(cluster, "pack", anomalies)
    during = busy_pack.pop("during")
    mark_end = busy_pack.pop("mark_end")
    idle_pack.pop("during")
    idle_pack.pop("mark_end")
    result.update({
        "latency_idle": lat(idle), "latency_during_pack": lat(during),
        "latency_during_mark": lat([x for x in during if x[0] <= mark_end]),
        "latency_during_apply": lat([x for x in during if x[0] > mark_end]),
        "latency_after": lat(after),
        "latency_ms": {"idle": [d * 1e3 for _, d in idle],
                       "during": [[t, d * 1e3] for t, d in during]},
    })
    return result


def report(r: dict) -> str:
    rows = []
    for label, key in (("1. nothing else running", "idle_pack"),
                       ("2. commits going on", "busy_pack")):
        p = r[key]
        rows.append([label, str(p["unreachable"]), str(p["mark_loads"]), "%.2f" % p["pack_s"],
                     "%.2f" % p["mark_s"], "%.2f" % (p["storage_apply_s"]["S1"] or 0),
                     "%.2f" % (p["storage_apply_s"]["S2"] or 0),
                     str(p["storage_visited"]["S1"]), str(p["storage_deleted"]["S1"])])
    out = ["%d objects; records after: %d, data after: %.1f MB" % (
        r["objects"], r["after"]["obj_records"], r["after"]["data_bytes"] / MB), "",
        format_table(["pack", "garbage", "mark loads", "pack (s)", "mark (s)", "S1 apply (s)",
                      "S2 apply (s)", "S1 visited", "S1 deleted"], rows)]
    names = list(r["idle_pack"]["peak_rss_bytes"])
    out += ["", format_table(["peak RSS (VmHWM), MB", *names], [
        [label, *("%.1f" % (r[key]["peak_rss_bytes"][name] / MB) for name in names)]
        for label, key in (("1. pack, nothing else", "idle_pack"),
                           ("2. pack with commits", "busy_pack"))])]
    rows = []
    for label, key in (("idle", "latency_idle"), ("during the pack", "latency_during_pack"),
                       ("  during the mark", "latency_during_mark"),
                       ("  during the storages' work", "latency_during_apply"),
                       ("after", "latency_after")):
        v = r.get(key)
        if v:
            rows.append([label, str(v["count"]), "%.2f" % v["median_ms"], "%.2f" % v["p90_ms"],
                         "%.2f" % v["max_ms"]])
    out += ["", format_table(["1-object commit, ms", "commits", "median", "p90", "max"], rows)]
    return "\n".join(out)


def run(opts, anomalies: list[str]) -> dict:
    with temporary_directory("pack", opts.keep) as (cleanup, workdir):
        return measure(cleanup, workdir, opts, anomalies)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10x smaller: --objects 10000")
    parser.add_argument("--objects", type=int, help="database size (100000)")
    parser.add_argument("--commits", type=int, help="idle one-object commits (200)")
    parser.add_argument("--partitions", type=int, default=12, help="partitions (12)")
    parser.add_argument("--pack-rate", type=int, default=0,
                        help="--pack-rate of the storages (objects/s; default: no cap)")
    parser.add_argument("--timeout", type=float, default=300, help="bound on waits (300 s)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (node logs, databases)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    opts = parser.parse_args(argv)
    defaults = QUICK if opts.quick else FULL
    opts.objects = opts.objects or defaults["objects"]
    opts.commits = opts.commits or defaults["commits"]
    if min(opts.objects, opts.commits) < 1:
        parser.error("sizes must be positive")
    title = "pack benchmark: %d partitions, %d CPUs, Python %s" % (
        opts.partitions, os.cpu_count() or 0, platform.python_version())
    return run_and_report(run, opts, report, title)


if __name__ == "__main__":
    sys.exit(main())
