"""Measure neomigrate (see bench/README.md, "Migration").

A FileStorage is generated: --objects new objects in transactions of 5
(each a PersistentMapping with 100 to 900 characters of hardly compressible
text, indexed by an IOBTree), then --updates transactions changing 5 objects
each.  It is then copied, each copy into a fresh destination:

1. FileStorage -> FileStorage with ``zodbconvert`` (RelStorage's, the
   ``bench`` extra; skipped if absent) and with
   ``FileStorage.copyTransactionsFrom`` in this process (no process start);
2. FileStorage -> neozodb with ``neomigrate``, on a 1-storage replicas-0
   cluster and on a 2-storage replicas-1 one, and with ``zodbconvert``
   through ZConfig (``%import neozodb``, ``<NEOStorage destination>``);
3. neozodb -> FileStorage with ``neomigrate``.

For neomigrate the time is the copy as it reports it (without process
start and connection); for zodbconvert the wall time of the command.  Each
copy is made --rounds times, one of each per round, and the median shown.  Every
node process started here is stopped and the temporary directory removed
on exit, error or Ctrl-C.

Usage: .venv/bin/python bench/migrate.py [--objects N] [--updates N] [--rounds R]
       [--quick] [--keep]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import time

import transaction
import ZODB
from bench import format_table  # bench/bench.py, next to this script
from BTrees.IOBTree import IOBTree
from common import count, temporary_directory  # bench/common.py
from persistent.mapping import PersistentMapping
from ZODB.FileStorage import FileStorage

PER_TXN = 5
SUMMARY = re.compile(r"copied (\d+) transactions, (\d+) objects .* in ([\d.]+) s ")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def generate(path: str, objects: int, updates: int, seed: int = 1) -> None:
    rnd = random.Random(seed)
    db = ZODB.DB(FileStorage(path, create=True))
    try:
        conn = db.open()
        index = conn.root()["objects"] = IOBTree()
        transaction.commit()
        made = []
        while len(made) < objects:
            for _ in range(PER_TXN):
                text = "%x" % rnd.getrandbits(4 * rnd.randint(100, 900))
                obj = PersistentMapping(n=len(made), text=text)
                index[len(made)] = obj
                made.append(obj)
            transaction.commit()
        for _ in range(updates):
            for obj in rnd.sample(made, PER_TXN):
                obj["n"] += 1
            transaction.commit()
        conn.close()
    finally:
        db.close()


def zodbconvert(workdir: str, source: str, destination: str) -> float | None:
    """Wall time of RelStorage's zodbconvert, None if not installed."""
    exe = shutil.which("zodbconvert", path=os.path.dirname(sys.executable))
    if exe is None:
        return None
    conf = os.path.join(workdir, "convert-%d.conf" % time.monotonic_ns())
    with open(conf, "w") as f:
        f.write("%%import neozodb\n<filestorage source>\n  path %s\n  read-only true\n"
                "</filestorage>\n%s\n" % (source, destination))
    began = time.perf_counter()
    subprocess.run([exe, conf], check=True, capture_output=True)
    return time.perf_counter() - began


def neomigrate(*args: str) -> tuple[float, float, str]:
    """(copy time as reported, wall time, summary)."""
    began = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "neozodb.cli.migrate", "-q", *args],
                            capture_output=True, text=True)
    wall = time.perf_counter() - began
    if result.returncode:
        raise RuntimeError("neomigrate %s: %s" % (" ".join(args), result.stderr.strip()))
    match = SUMMARY.search(result.stdout)
    return float(match.group(3)), wall, result.stdout.strip()


def start_cluster(cleanup: contextlib.ExitStack, workdir: str, key: str, storages: int,
                  replicas: int):
    from neozodb.cli.cluster import LocalCluster
    cluster = LocalCluster(os.path.join(workdir, key), name="bench-" + key, storages=storages,
                           replicas=replicas, partitions=12)
    cleanup.callback(cluster.kill)
    cluster.start(wait=60)
    return cluster


def run(opts) -> tuple[list[list[str]], dict]:
    """Every copy, --rounds times (interleaved: one of each per round);
    the table shows the median of each."""
    times: dict[str, list[float]] = {}
    notes: dict[str, str] = {}
    with temporary_directory("migrate", opts.keep, say, "files kept in ") as (cleanup, workdir):
        source = os.path.join(workdir, "source.fs")
        say("generating %d objects + %d update transactions..." % (opts.objects, opts.updates))
        generate(source, opts.objects, opts.updates)
        transactions, records = count(source)
        info = {"transactions": transactions, "records": records,
                "megabytes": os.path.getsize(source) / 1e6}
        say("source: %(transactions)d transactions, %(records)d records, %(megabytes).1f MB"
            % info)

        def measured(label: str, seconds: float | None, note: str) -> None:
            notes[label] = note
            times.setdefault(label, [])
            if seconds is not None:
                times[label].append(seconds)
                say("  %s: %.2f s" % (label, seconds))

        for i in range(opts.rounds):
            say("round %d/%d" % (i + 1, opts.rounds))
            target = os.path.join(workdir, "round%d-" % i)
            measured("FS -> FS, zodbconvert", zodbconvert(
                workdir, source, "<filestorage destination>\n  path %s\n</filestorage>"
                % (target + "zodbconvert.fs")), "wall time of the command")
            began = time.perf_counter()
            fs_source = FileStorage(source, read_only=True)
            fs_copy = FileStorage(target + "copy.fs", create=True)
            try:
                fs_copy.copyTransactionsFrom(fs_source)
            finally:
                fs_copy.close()
                fs_source.close()
            measured("FS -> FS, copyTransactionsFrom", time.perf_counter() - began,
                     "in process")
            for storages, replicas in ((1, 0), (2, 1)):
                key = "round%d-%ds-r%d" % (i, storages, replicas)
                cluster = start_cluster(cleanup, workdir, key, storages, replicas)
                copy, wall, _ = neomigrate("-c", cluster.name, source, cluster.masters)
                measured("FS -> neozodb %dS r%d, neomigrate" % (storages, replicas), copy,
                         "copy as reported (wall %.1f s)" % wall)
                copy, wall, _ = neomigrate("-c", cluster.name, cluster.masters,
                                           target + "back-%ds.fs" % storages)
                measured("neozodb %dS r%d -> FS, neomigrate" % (storages, replicas), copy,
                         "copy as reported (wall %.1f s)" % wall)
                cluster.kill()
            cluster = start_cluster(cleanup, workdir, "round%d-zconfig" % i, 1, 0)
            measured("FS -> neozodb 1S r0, zodbconvert", zodbconvert(
                workdir, source, "<NEOStorage destination>\n  master_nodes %s\n  name %s\n"
                "</NEOStorage>" % (cluster.masters, cluster.name)), "wall time of the command")
            cluster.kill()
    rows = []
    reference = None
    for label, values in times.items():
        if not values:
            rows.append([label, "skipped", "", "", "", "", "zodbconvert not installed"])
            continue
        seconds = statistics.median(values)
        reference = reference or seconds
        rows.append([label, "%.2f" % seconds, "%.2f-%.2f" % (min(values), max(values)),
                     "%.0f" % (transactions / seconds), "%.0f" % (records / seconds),
                     "%.2f" % (seconds / reference), notes[label]])
    return rows, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=10_000, help="objects created (10000)")
    parser.add_argument("--updates", type=int, default=1000,
                        help="transactions changing %d objects each (1000)" % PER_TXN)
    parser.add_argument("--rounds", type=int, default=3,
                        help="times every copy is made; the median is shown (3)")
    parser.add_argument("--quick", action="store_true",
                        help="--objects 1000 --updates 100 --rounds 1")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.objects, opts.updates, opts.rounds = 1000, 100, 1
    say("migration benchmark: %d CPUs, Python %s" % (os.cpu_count() or 0,
                                                     platform.python_version()))
    rows, info = run(opts)
    print("%(transactions)d transactions, %(records)d records, %(megabytes).1f MB;" % info,
          "load average %.1f" % os.getloadavg()[0])
    print(format_table(["copy", "median s", "range s", "txn/s", "obj/s", "x first", "note"],
                       rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
