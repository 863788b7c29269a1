"""Where the CPU goes (see bench/README.md, "CPU per operation"): the wall
time of an operation and the CPU (user + system) each process used for it,
neozodb against ZEO, one client (this process).

Measures, on each backend: one-object commits through ZODB (--commits,
24 objects changed in turn), commits of 1000 new objects and updates of
them (--rounds, as bench.py: PersistentMappings in an OOBTree), and
loads of objects not in the client's cache with the raw storage API
(--loads, in a random order, from a database of --objects written with
``build_raw``).  The CPU comes from /proc/PID/stat for the servers and
from getrusage for this process (its reader threads included), read
before and after each measure.  Processes that together use about as
much CPU as the wall time of an operation done one at a time cannot go
faster by overlapping round trips: only by using less CPU.

Usage: .venv/bin/python bench/cpu.py [--quick] [--commits N] [--rounds R] [--loads N]
       [--objects N] [--only LIST] [--json FILE] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time

import transaction
import ZODB
from common import (
    NeoBackend,
    ZEOBackend,
    build_raw,
    fill_defaults,
    format_table,
    new_objects,
    payload,
    start_backends,
    temporary_directory,
)
from persistent.mapping import PersistentMapping

TICK = os.sysconf("SC_CLK_TCK")
FULL = {"commits": 2000, "rounds": 8, "loads": 5000, "objects": 20000}
QUICK = {"commits": 200, "rounds": 2, "loads": 500, "objects": 2000}
HEADER = ["measure", "backend", "wall", "client", "servers", "all CPU", "CPU / wall"]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def cpu_of(pids: dict[str, int]) -> dict[str, float]:
    """Seconds of CPU of each server process, and of this one ("client")."""
    out = {}
    for name, pid in pids.items():
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        out[name] = (int(fields[11]) + int(fields[12])) / TICK
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["client"] = usage.ru_utime + usage.ru_stime
    return out


class Meter:
    """Wall time and CPU per process over several calls of ``measure``."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.wall = 0.0
        self.cpu = dict.fromkeys([*pids, "client"], 0.0)
        self.ops = 0

    def measure(self, fn, ops: int) -> None:
        before, t0 = cpu_of(self.pids), time.perf_counter()
        fn()
        self.wall += time.perf_counter() - t0
        after = cpu_of(self.pids)
        for name in self.cpu:
            self.cpu[name] += after[name] - before[name]
        self.ops += ops

    def row(self, what: str, label: str) -> list[str]:
        us = {name: seconds / self.ops * 1e6 for name, seconds in self.cpu.items()}
        servers = " ".join("%s %.0f" % (n, v) for n, v in us.items() if n != "client" and v)
        total = sum(us.values())
        wall = self.wall / self.ops * 1e6
        return [what, label, "%.0f" % wall, "%.0f" % us["client"], servers or "-",
                "%.0f" % total, "%.2f" % (total / wall)]


def commits(backend, meter: Meter, n: int) -> None:
    db = ZODB.DB(backend.open_storage())
    try:
        tm = transaction.TransactionManager()
        root = db.open(tm).root()
        objs = root["cpu"] = [PersistentMapping(v=0) for _ in range(24)]
        tm.commit()

        def loop(count, start=0):
            for i in range(start, start + count):
                objs[i % 24]["v"] = i
                tm.commit()
        loop(100)  # warm-up
        meter.measure(lambda: loop(n, 100), n)
    finally:
        db.close()


def big(backend, new: Meter, update: Meter, rounds: int) -> None:
    db = ZODB.DB(backend.open_storage())
    try:
        tm = transaction.TransactionManager()
        root = db.open(tm).root()
        for r in range(rounds + 1):
            objs = new_objects(root, tm, "big%d" % r, 1000)
            if r == 0:  # warm-up
                tm.commit()
                continue
            new.measure(tm.commit, 1)
            for obj in objs:
                obj["data"] = payload()
            update.measure(tm.commit, 1)
    finally:
        db.close()


def loads(backend, meter: Meter, objects: int, n: int) -> None:
    storage = backend.open_storage()
    try:
        oids = build_raw(storage, objects)
    finally:
        storage.close()
    random.Random(1).shuffle(oids)
    storage = backend.open_storage()  # empty cache
    try:
        storage.load(oids[-1])
        wanted = oids[:n]
        meter.measure(lambda: [storage.load(oid) for oid in wanted], len(wanted))
    finally:
        storage.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="--commits 200 --rounds 2 --loads 500 --objects 2000")
    parser.add_argument("--commits", type=int, help="one-object commits (2000)")
    parser.add_argument("--rounds", type=int, help="1000-object commits (8)")
    parser.add_argument("--loads", type=int, help="cold loads (5000)")
    parser.add_argument("--objects", type=int, help="database size for the loads (20000)")
    parser.add_argument("--only", default="commit,big,load", help="some of commit,big,load")
    parser.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    opts = parser.parse_args(argv)
    fill_defaults(opts, FULL, QUICK)
    only = set(opts.only.split(","))
    rows = []
    with temporary_directory("cpu", opts.keep, say=say) as (cleanup, workdir):
        backends = [NeoBackend(1, 0), NeoBackend(2, 0), NeoBackend(2, 1), ZEOBackend()]
        for backend in start_backends(cleanup, backends, workdir, {}):
            pids = {k: v for k, v in backend.pids().items() if k != "A1"}
            if "commit" in only:
                meter = Meter(pids)
                commits(backend, meter, opts.commits)
                rows.append(meter.row("one-object commit", backend.label))
            if "big" in only:
                new, update = Meter(pids), Meter(pids)
                big(backend, new, update, opts.rounds)
                rows.append(new.row("commit of 1000 new objects", backend.label))
                rows.append(update.row("update of 1000 objects", backend.label))
            if "load" in only:
                meter = Meter(pids)
                loads(backend, meter, opts.objects, opts.loads)
                rows.append(meter.row("cold load (storage API)", backend.label))
            say("  %s measured" % backend.label)
    rows.sort(key=lambda r: r[0])
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"header": HEADER, "rows": rows}, f, indent=1)
    print("CPU per operation, us (user + system; 'CPU / wall' above 1: processes worked"
          " in parallel; one client, %d CPUs)" % (os.cpu_count() or 0))
    print(format_table(HEADER, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
