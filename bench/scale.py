"""How neozodb's costs grow with the database: a load, a commit and the
storage's memory at 10^4, 10^5 and 10^6 objects (see bench/README.md,
"Scale").

One cluster (a master, 1 SQLite storage, an admin; --storages 2 for
replicas 1) grows in stages.  Each stage writes the new objects with the
raw storage API (PersistentMapping records of 300 random characters,
--batch per transaction, from --builders client processes side by side),
then, from a NEW client (empty cache), measures --loads loads of distinct
random objects and --commits one-object commits (raw API: tpc_begin,
store, tpc_vote, tpc_finish on a random existing object), and reads the
resident memory of every node (VmRSS now, VmHWM the peak since it
started) and the size of the SQLite files.

Every process started here is stopped and the temporary directory removed
on exit, error, Ctrl-C or SIGTERM.

Usage: .venv/bin/python bench/scale.py [--quick] [--sizes 10000,100000,1000000]
       [--builders 2] [--batch 10000] [--loads 2000] [--commits 200] [--settle S]
       [--json FILE]
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import platform
import random
import statistics
import sys
import time

from common import (
    MB,
    Clients,
    NeoBackend,
    PeakMemory,
    build_raw,
    client_ready,
    client_result,
    fill_defaults,
    format_table,
    measure_and_report,
    open_spec,
    payload,
    percentile,
    proc_status,
    read_spec,
    record_pickle,
    say,
    start_backends,
    temporary_directory,
    write_spec,
)

HERE = os.path.abspath(__file__)
FULL = {"sizes": [10_000, 100_000, 1_000_000], "loads": 2000, "commits": 200, "batch": 10_000}
QUICK = {"sizes": [1_000, 3_000, 10_000], "loads": 300, "commits": 30, "batch": 1_000}


def builder(spec_file: str, count: int, batch: int, out: str) -> None:
    """A client process writing ``count`` new objects; their oids go to ``out``."""
    logging.basicConfig(level=logging.ERROR)
    storage = open_spec(read_spec(spec_file))
    client_ready()
    began = time.perf_counter()
    oids = build_raw(storage, count, batch)
    elapsed = time.perf_counter() - began
    storage.close()
    with open(out, "wb") as f:
        f.write(b"".join(oids))
    client_result({"count": count, "seconds": elapsed})


def grow(cleanup, workdir: str, spec_file: str, count: int, opts, stage: int) -> list[bytes]:
    """Write ``count`` new objects with --builders processes; their oids."""
    n = max(1, min(opts.builders, count // opts.batch or 1))
    shares = [count // n + (i < count % n) for i in range(n)]
    outs = [os.path.join(workdir, "oids-%d-%d" % (stage, i)) for i in range(n)]
    argvs = [[HERE, "--builder", spec_file, str(share), str(opts.batch), out]
             for share, out in zip(shares, outs, strict=True)]
    Clients(cleanup, argvs, timeout=3600).run(0)
    oids = []
    for out in outs:
        with open(out, "rb") as f:
            data = f.read()
        oids += [data[i:i + 8] for i in range(0, len(data), 8)]
        os.unlink(out)
    return oids


def measure_costs(backend, oids: list[bytes], opts, rng: random.Random) -> dict:
    """Loads of distinct random objects and one-object commits, from a new
    client."""
    from ZODB.Connection import TransactionMetaData
    storage = backend.open_storage()
    try:
        sample = rng.sample(oids, min(len(oids), opts.loads + opts.commits))
        storage.load(sample[-1])  # connections made
        loads = []
        for oid in sample[:opts.loads]:
            t0 = time.perf_counter()
            storage.load(oid)
            loads.append(time.perf_counter() - t0)
        commits = []
        for oid in sample[opts.loads:opts.loads + opts.commits]:
            _, serial = storage.load(oid)
            data = record_pickle(payload())
            t0 = time.perf_counter()
            txn = TransactionMetaData()
            storage.tpc_begin(txn)
            storage.store(oid, serial, data, "", txn)
            storage.tpc_vote(txn)
            storage.tpc_finish(txn)
            commits.append(time.perf_counter() - t0)
    finally:
        storage.close()
    return {"load_median_ms": statistics.median(loads) * 1e3,
            "load_p90_ms": percentile(loads, 90) * 1e3,
            "commit_median_ms": statistics.median(commits) * 1e3,
            "commit_p90_ms": percentile(commits, 90) * 1e3}


def measure(opts, peaks: PeakMemory) -> list[dict]:
    stages = []
    rng = random.Random(1)
    with temporary_directory("scale", opts.keep) as (cleanup, workdir):
        backend = NeoBackend(opts.storages, opts.storages - 1)
        start_backends(cleanup, [backend], workdir, {}, peaks=peaks)
        spec_file = write_spec(workdir, backend)
        oids: list[bytes] = []
        for stage, size in enumerate(opts.sizes):
            t0 = time.perf_counter()
            oids += grow(cleanup, workdir, spec_file, size - len(oids), opts, stage)
            built = time.perf_counter() - t0
            time.sleep(opts.settle)  # let the storage finish what the writes left
            costs = measure_costs(backend, oids, opts, rng)
            memory = {name: proc_status(pid) for name, pid in backend.pids().items()}
            db_bytes = sum(os.path.getsize(p) for p in glob.glob(
                os.path.join(backend.cluster.directory, "storage*.sqlite*")))
            stages.append({"objects": len(oids), "build_s": built,
                           "written": size - (stages[-1]["objects"] if stages else 0),
                           **costs, "memory": memory, "db_bytes": db_bytes})
            s1 = memory.get("S1", {})
            say("  %d objects (written in %.1fs): load %.3f ms, commit %.2f ms, S1 RSS %.1f MB"
                % (len(oids), built, costs["load_median_ms"], costs["commit_median_ms"],
                   s1.get("VmRSS", 0) / MB))
    return stages


def summary_rows(stages: list[dict]) -> list[dict]:
    """Largest against smallest database (ratio > 1: it grew)."""
    first, last = stages[0], stages[-1]
    rows = []
    for key, what in (("load_median_ms", "load, median ms"),
                      ("commit_median_ms", "1-object commit, median ms")):
        rows.append({"measure": "%s at %d / at %d objects" % (what, last["objects"],
                                                              first["objects"]),
                     "value": last[key], "reference": first[key],
                     "ratio": last[key] / first[key]})
    s_first, s_last = first["memory"].get("S1", {}), last["memory"].get("S1", {})
    rows.append({"measure": "S1 RSS MB at %d / at %d objects" % (last["objects"],
                                                                first["objects"]),
                 "value": s_last.get("VmRSS", 0) / MB, "reference": s_first.get("VmRSS", 0) / MB,
                 "ratio": s_last.get("VmRSS", 0) / s_first["VmRSS"] if s_first.get("VmRSS")
                 else None})
    return rows


def report(stages: list[dict]) -> str:
    nodes = sorted(stages[0]["memory"])
    rows = []
    for s in stages:
        rows.append(["%d" % s["objects"], "%.1f" % s["build_s"],
                     "%.0f" % (s["written"] / s["build_s"]) if s["build_s"] else "-",
                     "%.3f" % s["load_median_ms"], "%.3f" % s["load_p90_ms"],
                     "%.2f" % s["commit_median_ms"], "%.2f" % s["commit_p90_ms"],
                     *("%.1f / %.1f" % (s["memory"].get(n, {}).get("VmRSS", 0) / MB,
                                        s["memory"].get(n, {}).get("VmHWM", 0) / MB)
                       for n in nodes),
                     "%.0f" % (s["db_bytes"] / MB)])
    out = [format_table(["objects", "write s", "objects/s", "load ms", "load p90",
                         "commit ms", "commit p90",
                         *("%s RSS/peak MB" % n for n in nodes), "SQLite MB"], rows)]
    rows = [[r["measure"], "%.3f" % r["value"], "%.3f" % r["reference"],
             "%.2f" % r["ratio"] if r["ratio"] else "-"] for r in summary_rows(stages)]
    out += ["", format_table(["growth (1.00: flat)", "largest", "smallest", "ratio"], rows)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--builder"]:
        builder(argv[1], int(argv[2]), int(argv[3]), argv[4])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="--sizes 1000,3000,10000 --loads 300 --commits 30 --batch 1000")
    parser.add_argument("--sizes", help="database sizes, growing (10000,100000,1000000)")
    parser.add_argument("--builders", type=int, default=2,
                        help="client processes writing the objects (2)")
    parser.add_argument("--batch", type=int, help="objects per transaction (10000)")
    parser.add_argument("--loads", type=int, help="loads measured per size (2000)")
    parser.add_argument("--commits", type=int, help="one-object commits per size (200)")
    parser.add_argument("--settle", type=float, default=0,
                        help="seconds to wait after writing, before measuring (0)")
    parser.add_argument("--storages", type=int, default=1,
                        help="storages (1); replicas is storages - 1")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    opts = parser.parse_args(argv)
    defaults = fill_defaults(opts, FULL, QUICK, ("loads", "commits", "batch"))
    opts.sizes = [int(x) for x in opts.sizes.split(",")] if opts.sizes else defaults["sizes"]
    if opts.sizes != sorted(set(opts.sizes)) or opts.sizes[0] <= opts.loads + opts.commits:
        parser.error("--sizes must grow, and exceed --loads + --commits")
    title = "scale benchmark: sizes %s, %d storage(s), %d builders, %d CPUs, Python %s" % (
        ",".join(map(str, opts.sizes)), opts.storages, opts.builders, os.cpu_count() or 0,
        platform.python_version())
    # the nodes' memory is in the report, at every stage
    return measure_and_report(measure, opts, report, title, summary_rows, show_peaks=False)


if __name__ == "__main__":
    sys.exit(main())
