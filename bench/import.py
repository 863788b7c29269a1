"""Measure live import (the Importer backend) against zodbconvert (see
bench/README.md, "Live import").

1. A FileStorage of N small transactions is written (tests/fsdata.py: raw
   stores of 1 to 3 objects, undos, undone creations, deletions, BTree
   conflict resolution, extension data).
2. ``zodbconvert`` copies it to a new FileStorage (the script as ZODB ships
   it: one fsync per transaction), then the same copy is made in-process
   with ``copyTransactionsFrom`` and FileStorage's fsync disabled.
3. Live import, idle: a cluster (1 master, 1 storage with ``-a Importer``,
   1 admin) starts over the FileStorage; the time until ``neoctl print
   import`` says finished, and the storage's own count (transactions and
   objects per second while importing).
4. Live import with a client: the same over a fresh database while a
   client loads random objects of the source (cold: through the storage)
   and commits one-object transactions; their latencies during the import
   and after it.

Every process is stopped and the temporary directory removed on exit, error,
Ctrl-C or SIGTERM.

Usage: .venv/bin/python bench/import.py [--quick] [--transactions N] [--no-undo] [--keep]
       [--json FILE]
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import subprocess
import sys
import textwrap
import threading
import time

from bench import format_table, percentile  # bench/bench.py, next to this script
from common import (  # bench/common.py
    INTERRUPTED,
    count,
    interruptible,
    options,
    stop_cluster,
    temporary_directory,
    write_json,
)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from fsdata import make_filestorage, no_fsync  # noqa: E402

FULL = {"transactions": 50_000}
QUICK = {"transactions": 10_000}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def rates(seconds: float, txns: int, records: int) -> dict:
    return {"seconds": round(seconds, 3), "transactions_per_second": round(txns / seconds),
            "objects_per_second": round(records / seconds)}


# -- zodbconvert -----------------------------------------------------------------------------------
def measure_zodbconvert(workdir: str, source: str, txns: int, records: int) -> dict:
    out = os.path.join(workdir, "zodbconvert.fs")
    conf = os.path.join(workdir, "zodbconvert.conf")
    with open(conf, "w") as f:
        f.write(textwrap.dedent(f"""\
            <filestorage source>
              path {source}
              read-only true
            </filestorage>
            <filestorage destination>
              path {out}
            </filestorage>
            """))
    script = os.path.join(os.path.dirname(sys.executable), "zodbconvert")
    started = time.perf_counter()
    subprocess.run([script, conf], check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    assert count(out)[0] == txns
    return rates(seconds, txns, records)


def measure_copy_nofsync(workdir: str, source: str, txns: int, records: int) -> dict:
    from ZODB.FileStorage import FileStorage
    src = FileStorage(source, read_only=True)
    dst = FileStorage(os.path.join(workdir, "copy.fs"), create=True)
    try:
        started = time.perf_counter()
        with no_fsync():
            dst.copyTransactionsFrom(src)
        seconds = time.perf_counter() - started
    finally:
        src.close()
        dst.close()
    return rates(seconds, txns, records)


# -- live import ---------------------------------------------------------------------------------------
def import_cluster(workdir: str, key: str, source: str):
    from neozodb.cli.cluster import LocalCluster
    directory = os.path.join(workdir, key)
    os.makedirs(directory)
    conf = os.path.join(directory, "importer.conf")
    with open(conf, "w") as f:
        f.write(textwrap.dedent(f"""\
            [neo]
            database = neo.sqlite

            [source]
            storage = <filestorage>
                path {source}
                read-only true
              </filestorage>
            """))

    return LocalCluster(directory, name="bench-" + key, storages=1, replicas=0,
                        partitions=12, loglevel="INFO", importer=conf)


def import_status(cluster) -> dict | None:
    from neozodb.ctl.neoctl import CtlError, run_command
    try:
        ctl = cluster.ctl()
    except CtlError:
        return None
    try:
        return run_command(ctl, ["print", "import"])[1].get("S1")
    except CtlError:
        return None
    finally:
        ctl.close()


def wait_finished(cluster, timeout: float) -> dict:
    from neozodb.cli.cluster import wait_until

    def finished():
        status = import_status(cluster)
        if status and status["state"] == "failed":
            raise RuntimeError("import failed: %s" % status["error"])
        return status if status and status["state"] == "finished" else None
    return wait_until(finished, timeout, "the import to finish")


def measure_import(cleanup, workdir: str, source: str, txns: int, records: int,
                   timeout: float) -> dict:
    cluster = import_cluster(workdir, "idle", source)
    cleanup.callback(stop_cluster, cluster)
    started = time.perf_counter()
    cluster.start(wait=60)
    status = wait_finished(cluster, timeout)
    wall = time.perf_counter() - started
    stop_cluster(cluster)
    assert status["imported"] == txns and status["objects"] == records, status
    result = rates(wall, txns, records)
    result["storage"] = {k: status[k] for k in ("seconds", "transactions_per_second",
                                                 "objects_per_second")}
    return result


def measure_import_with_client(cleanup, workdir: str, source: str, oids: list[bytes],
                               txns: int, records: int, timeout: float) -> dict:
    from ZODB.Connection import TransactionMetaData
    from ZODB.utils import z64

    from neozodb.client import Storage
    cluster = import_cluster(workdir, "client", source)
    cleanup.callback(stop_cluster, cluster)
    cluster.start(wait=60)
    storage = Storage(cluster.masters, cluster.name, cache_size=0)
    cleanup.callback(storage.close)
    done = threading.Event()
    finished: dict = {}

    def watch():
        finished["status"] = wait_finished(cluster, timeout)
        done.set()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    rng = random.Random(3)
    oid, serial = storage.new_oid(), z64
    lat: dict[str, dict[str, list[float]]] = {
        "during": {"load": [], "commit": []}, "after": {"load": [], "commit": []}}
    during = True
    while True:
        phase = lat["during" if during else "after"]
        t0 = time.perf_counter()
        try:
            storage.load(rng.choice(oids))
        except KeyError:
            pass  # deleted in the source
        t1 = time.perf_counter()
        t = TransactionMetaData()
        storage.tpc_begin(t)
        storage.store(oid, serial, b"client %d" % len(phase["commit"]), "", t)
        storage.tpc_vote(t)
        serial = storage.tpc_finish(t)
        t2 = time.perf_counter()
        phase["load"].append(t1 - t0)
        phase["commit"].append(t2 - t1)
        if during and done.is_set():
            during = False
        elif not during and len(phase["commit"]) >= len(lat["during"]["commit"]):
            break
    watcher.join()
    status = finished["status"]
    storage.close()
    stop_cluster(cluster)
    result = {"storage": {k: status[k] for k in ("seconds", "transactions_per_second",
                                                  "objects_per_second")},
              "client_transactions": len(lat["during"]["commit"])}
    for phase, values in lat.items():
        for kind, samples in values.items():
            ms = [s * 1e3 for s in samples]
            result["%s_%s_median_ms" % (kind, phase)] = round(percentile(ms, 50), 3)
            result["%s_%s_p90_ms" % (kind, phase)] = round(percentile(ms, 90), 3)
    return result


# -- main -------------------------------------------------------------------------------------------
def run(opts) -> dict:
    results: dict = {}
    with temporary_directory("import", opts.keep, say) as (cleanup, workdir):
        source = os.path.join(workdir, "Data.fs")
        say("1. writing a FileStorage of %d transactions" % opts.transactions)
        started = time.perf_counter()
        summary = make_filestorage(source, transactions=opts.transactions,
                                   objects=max(300, opts.transactions // 10),
                                   undo=not opts.no_undo)
        txns, records = count(source)
        results["source"] = {"transactions": txns, "records": records, "undo": not opts.no_undo,
                             "bytes": os.path.getsize(source),
                             "written_seconds": round(time.perf_counter() - started, 3)}
        say("    %d transactions, %d records, %.1f MB" % (txns, records,
                                                           os.path.getsize(source) / 1e6))
        say("2. zodbconvert FileStorage -> FileStorage")
        results["zodbconvert"] = measure_zodbconvert(workdir, source, txns, records)
        results["copy_nofsync"] = measure_copy_nofsync(workdir, source, txns, records)
        say("3. live import, idle")
        results["import"] = measure_import(cleanup, workdir, source, txns, records, opts.timeout)
        say("4. live import with a client loading and committing")
        results["import_client"] = measure_import_with_client(
            cleanup, workdir, source, summary["oids"], txns, records, opts.timeout)
    return results


def report(results: dict) -> str:
    src = results["source"]
    rows = []
    for label, key in (("zodbconvert (FS -> FS, fsync per transaction)", "zodbconvert"),
                       ("copyTransactionsFrom FS -> FS, no fsync", "copy_nofsync"),
                       ("live import, from cluster start", "import")):
        r = results[key]
        rows.append([label, "%.2f" % r["seconds"], str(r["transactions_per_second"]),
                     str(r["objects_per_second"])])
    for label, r in (("live import, storage's count", results["import"]["storage"]),
                     ("live import with a client, storage's count",
                      results["import_client"]["storage"])):
        rows.append([label, "%.2f" % r["seconds"], str(r["transactions_per_second"]),
                     str(r["objects_per_second"])])
    out = ["source: %d transactions, %d records, %.1f MB%s" % (
        src["transactions"], src["records"], src["bytes"] / 1e6,
        "" if src["undo"] else ", no undo"), "",
        format_table(["copy", "seconds", "transactions/s", "objects/s"], rows)]
    c = results["import_client"]
    out += ["", "client during the live import (%d load+commit rounds) and after it:"
            % c["client_transactions"], format_table(
                ["ms", "during import", "after import"],
                [["%s %s" % (kind, stat), "%.2f" % c["%s_during_%s_ms" % (kind, stat)],
                  "%.2f" % c["%s_after_%s_ms" % (kind, stat)]]
                 for kind in ("load", "commit") for stat in ("median", "p90")])]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="--transactions 10000")
    parser.add_argument("--transactions", type=int, help="size of the FileStorage (50000)")
    parser.add_argument("--no-undo", action="store_true",
                        help="no undo transactions in the FileStorage (FileStorage.restore"
                        " scans back through the file for each undo record)")
    parser.add_argument("--timeout", type=float, default=600, help="bound on each import (600 s)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    opts = parser.parse_args(argv)
    opts.transactions = opts.transactions or (QUICK if opts.quick else FULL)["transactions"]
    started = time.perf_counter()
    say("import benchmark: %d CPUs, Python %s" % (os.cpu_count() or 0,
                                                  platform.python_version()))
    results = interruptible(run, opts)
    if INTERRUPTED:
        return 130
    print()
    print(report(results))
    print("\ntotal %.0fs" % (time.perf_counter() - started))
    if opts.json:
        write_json(opts.json, options(opts), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
