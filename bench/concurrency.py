"""Throughput with several client processes: neozodb against ZEO (see
bench/README.md, "Concurrency").

1. commits/s: N client processes (4, then 8) each commit one-object
   transactions, each on its own object (so no conflicts), through ZODB
   (``transaction.commit()``), as fast as they can for --seconds.
2. loads/s: 8 client processes each load objects of a database of
   --objects (100,000) objects, in a random order of its own with no
   repetition (so every load misses the client caches), with the raw
   storage API (``storage.load(oid)``), for --seconds.

Every process started here (nodes, ZEO server, client processes, py-spy)
is stopped and the temporary directory removed on exit, error, Ctrl-C or
SIGTERM.

Usage: .venv/bin/python bench/concurrency.py [--quick] [--seconds S] [--rounds R]
       [--objects N] [--procs 4,8] [--load-procs 8] [--py-spy DIR] [--json FILE]
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
import time

from common import (
    Backend,
    Clients,
    NeoBackend,
    PeakMemory,
    ZEOBackend,
    build_raw,
    client_ready,
    client_result,
    fill_defaults,
    format_table,
    measure_and_report,
    open_spec,
    payload,
    percentile,
    read_spec,
    say,
    start_backends,
    temporary_directory,
    write_spec,
)

HERE = os.path.abspath(__file__)
FULL = {"seconds": 5.0, "rounds": 2, "objects": 100_000}
QUICK = {"seconds": 1.0, "rounds": 1, "objects": 5_000}
TARGETS = {"commits": 1.5, "loads": 2.0}  # issue 12: ZEO time / neozodb time


# -- client processes -------------------------------------------------------------------
def repeat_for(seconds: float, step) -> dict:
    """Call ``step()``, which returns how long its operation took, again
    and again for ``seconds``: the count, the time, the median and p90 of
    the operations in ms."""
    times = []
    began = time.perf_counter()
    end = began + seconds
    while True:
        times.append(step())
        if time.perf_counter() >= end:
            break
    return {"count": len(times), "seconds": time.perf_counter() - began,
            "median_ms": statistics.median(times) * 1e3,
            "p90_ms": percentile(times, 90) * 1e3}


def commit_worker(spec: dict, oid: bytes) -> None:
    import transaction
    import ZODB
    db = ZODB.DB(open_spec(spec))
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    obj = conn.get(oid)
    obj["data"] = payload()
    tm.commit()  # warm-up: connections made, the object loaded
    seconds = client_ready()

    def step() -> float:
        obj["data"] = payload()
        t0 = time.perf_counter()
        tm.commit()
        return time.perf_counter() - t0
    result = repeat_for(seconds, step)
    conn.close()
    db.close()
    client_result(result)


def load_worker(spec: dict, oids_file: str, seed: int) -> None:
    with open(oids_file, "rb") as f:
        data = f.read()
    oids = [data[i:i + 8] for i in range(0, len(data), 8)]
    random.Random(seed).shuffle(oids)
    storage = open_spec(spec)
    storage.load(oids.pop())  # warm-up: connections made
    seconds = client_ready()
    loaded = 0

    def step() -> float:
        nonlocal loaded
        oid = oids[loaded % len(oids)]  # wraps only if a process reads the whole database
        loaded += 1
        t0 = time.perf_counter()
        storage.load(oid)
        return time.perf_counter() - t0
    result = repeat_for(seconds, step)
    storage.close()
    result["wrapped"] = loaded > len(oids)
    client_result(result)


def worker_main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.ERROR)
    kind, spec = argv[0], read_spec(argv[1])
    if kind == "commit":
        commit_worker(spec, bytes.fromhex(argv[2]))
    else:
        load_worker(spec, argv[2], int(argv[3]))


# -- py-spy -----------------------------------------------------------------------------------
class Profiler:
    """py-spy record on the nodes of a cluster and on the first client
    process while a measure runs (raw collapsed stacks, one file each)."""

    def __init__(self, directory: str | None, cleanup) -> None:
        self.directory = directory
        self.procs: list[subprocess.Popen] = []
        cleanup.callback(self.stop)

    def start(self, name: str, pids: dict[str, int], seconds: float) -> None:
        if not self.directory:
            return
        os.makedirs(self.directory, exist_ok=True)
        py_spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
        for node, pid in pids.items():
            out = os.path.join(self.directory, "%s-%s.txt" % (name, node))
            self.procs.append(subprocess.Popen(
                [py_spy, "record", "--format", "raw", "--rate", "200", "--nonblocking",
                 "-d", str(max(1, int(seconds))), "-p", str(pid), "-o", out],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def stop(self) -> None:
        procs, self.procs = self.procs, []
        for p in procs:
            try:
                p.wait(30)  # py-spy writes its file when its duration ends
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


# -- measures ------------------------------------------------------------------------------------
def run_clients(cleanup, argvs: list[list[str]], seconds: float, profiler: Profiler,
                name: str, backend: Backend) -> dict:
    clients = Clients(cleanup, argvs)

    def profile() -> None:
        pids = dict(backend.pids())
        pids.pop("A1", None)
        pids["client"] = clients.pids()[0]
        profiler.start(name, pids, seconds)
    try:
        results = clients.run(seconds, ready=profile)
    finally:
        clients.kill()
        profiler.stop()
    return {"per_second": sum(r["count"] / r["seconds"] for r in results),
            "count": sum(r["count"] for r in results),
            "median_ms": statistics.median(r["median_ms"] for r in results),
            "p90_ms": max(r["p90_ms"] for r in results),
            "client_vmhwm": max(r["vmhwm"] for r in results),
            "wrapped": any(r.get("wrapped") for r in results)}


def make_objects(backend: Backend, n: int) -> list[bytes]:
    """n PersistentMappings in the root, committed through ZODB; their oids."""
    import transaction
    import ZODB
    from persistent.mapping import PersistentMapping
    db = ZODB.DB(backend.open_storage())
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        objs = [PersistentMapping({"data": payload()}) for _ in range(n)]
        conn.root()["concurrency"] = objs
        tm.commit()
        oids = [o._p_oid for o in objs]
        conn.close()
    finally:
        db.close()
    return oids


def measure(opts, peaks: PeakMemory) -> dict:
    results: dict = {"commits": {}, "loads": {}}
    with temporary_directory("concurrency", opts.keep) as (cleanup, workdir):
        commit_backends = [NeoBackend(1, 0, event_loop=opts.event_loop),
                           NeoBackend(2, 0, event_loop=opts.event_loop),
                           NeoBackend(2, 1, event_loop=opts.event_loop), ZEOBackend()]
        load_backends = [commit_backends[2], commit_backends[3]]
        active = start_backends(cleanup, commit_backends, workdir, {}, peaks=peaks)
        profiler = Profiler(opts.py_spy, cleanup)
        specs = {b.key: write_spec(workdir, b) for b in active}

        oids = {b.key: make_objects(b, max(opts.procs)) for b in commit_backends}
        for r in range(opts.rounds):
            for n in opts.procs:
                line = "  commits, %d processes, round %d/%d:" % (n, r + 1, opts.rounds)
                for b in commit_backends:
                    argvs = [[HERE, "--worker", "commit", specs[b.key], oids[b.key][i].hex()]
                             for i in range(n)]
                    res = run_clients(cleanup, argvs, opts.seconds, profiler,
                                      "commit%d-%s-r%d" % (n, b.key, r), b)
                    results["commits"].setdefault(str(n), {}).setdefault(b.key, []).append(res)
                    line += " %s %.0f/s" % (b.label, res["per_second"])
                say(line)

        for b in load_backends:
            t0 = time.perf_counter()
            storage = b.open_storage()
            try:
                built = build_raw(storage, opts.objects)
            finally:
                storage.close()
            path = os.path.join(workdir, b.key + ".oids")
            with open(path, "wb") as f:
                f.write(b"".join(built))
            oids[b.key] = path
            say("  %s: %d objects written in %.1fs" % (b.label, opts.objects,
                                                      time.perf_counter() - t0))
        n = opts.load_procs
        for r in range(opts.rounds):
            line = "  loads, %d processes, round %d/%d:" % (n, r + 1, opts.rounds)
            for b in load_backends:
                argvs = [[HERE, "--worker", "load", specs[b.key], oids[b.key],
                          str(r * 1000 + i)] for i in range(n)]
                res = run_clients(cleanup, argvs, opts.seconds, profiler,
                                  "load%d-%s-r%d" % (n, b.key, r), b)
                results["loads"].setdefault(str(n), {}).setdefault(b.key, []).append(res)
                line += " %s %.0f/s" % (b.label, res["per_second"])
            say(line)
        results["labels"] = {b.key: b.label for b in commit_backends}
    return results


def best(rounds: list[dict]) -> dict:
    return max(rounds, key=lambda r: r["per_second"])


def summary_rows(results: dict) -> list[dict]:
    """One row per measure and neozodb configuration: rate, ZEO's, ratio,
    target (what bench.py --all puts in its table)."""
    rows = []
    labels = results["labels"]
    for what, unit in (("commits", "commits/s"), ("loads", "loads/s")):
        for n, per_backend in results[what].items():
            zeo = best(per_backend["zeo"])["per_second"] if "zeo" in per_backend else None
            for key, rounds in per_backend.items():
                if key == "zeo":
                    continue
                value = best(rounds)["per_second"]
                rows.append({"measure": "%s, %s client processes" % (unit, n),
                             "neo": labels[key], "value": value, "zeo": zeo, "unit": unit,
                             "ratio": value / zeo if zeo else None,  # rates: neo / ZEO
                             "target": TARGETS[what]})
    return rows


def report(results: dict) -> str:
    labels = results["labels"]
    out = []
    for what, unit in (("commits", "commits/s"), ("loads", "loads/s")):
        rows = []
        for n, per_backend in results[what].items():
            for key, rounds in per_backend.items():
                b = best(rounds)
                rows.append(["%s, %s processes" % (what, n), labels[key],
                             "%.0f" % b["per_second"],
                             " ".join("%.0f" % r["per_second"] for r in rounds),
                             "%.2f" % b["median_ms"], "%.2f" % b["p90_ms"],
                             "%.1f" % (b["client_vmhwm"] / 1e6)])
        if rows:
            out += [format_table([what, "backend", unit + " (best)", "every round",
                                  "median ms", "p90 ms", "client MB"], rows), ""]
    rows = [[r["measure"], r["neo"], "%.0f" % r["value"],
             "%.0f" % r["zeo"] if r["zeo"] else "-",
             "%.2f" % r["ratio"] if r["ratio"] else "-", ">= %.1f" % r["target"]]
            for r in summary_rows(results)]
    out.append(format_table(["ratio (>1: neo faster)", "neozodb", "neo", "ZEO",
                             "neo / ZEO", "target"], rows))
    if any(r.get("wrapped") for x in ("commits", "loads") for per in results[x].values()
           for rounds in per.values() for r in rounds):
        out.append("\nnote: a load process read the whole database and started again: "
                   "some loads hit its cache (use more --objects)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="--seconds 1 --rounds 1 --objects 5000")
    parser.add_argument("--seconds", type=float, help="length of each measure (5)")
    parser.add_argument("--rounds", type=int, help="rounds; the best is kept (2)")
    parser.add_argument("--objects", type=int, help="database size for the loads (100000)")
    parser.add_argument("--procs", default="4,8", help="client processes committing (4,8)")
    parser.add_argument("--load-procs", type=int, default=8, help="client processes loading (8)")
    parser.add_argument("--py-spy", metavar="DIR",
                        help="record py-spy profiles (raw collapsed stacks) of the master,"
                        " the storages and the first client of every measure into DIR")
    parser.add_argument("--event-loop", default="auto", choices=("auto", "asyncio", "uvloop"),
                        help="the nodes' event loop (auto: uvloop if installed)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    opts = parser.parse_args(argv)
    fill_defaults(opts, FULL, QUICK)
    opts.procs = [int(x) for x in opts.procs.split(",")]
    title = "concurrency benchmark: %s s per measure, %d round(s), %d CPUs, Python %s" % (
        opts.seconds, opts.rounds, os.cpu_count() or 0, platform.python_version())
    return measure_and_report(measure, opts, report, title, summary_rows)


if __name__ == "__main__":
    sys.exit(main())
