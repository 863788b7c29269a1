"""Measure blobs (see bench/README.md, "Blobs"): in one run, for neozodb
(1 storage replicas 0, 2 storages replicas 1), ZEO (its server's blob
directory, the client with a cache of its own: not shared) and RelStorage
on SQLite (contents in its database, a client cache):

1. commit --count blobs of --size bytes, 10 per transaction;
2. read them all back from a new client with an empty blob cache;
3. commit one blob of --big bytes, then read it back the same way.

Each step runs in a client process of its own, whose peak RSS is
reported with the servers'.  Contents are random (incompressible) and
every read is checked against what was written.  Every process started
here is stopped and the temporary directory removed on exit, error or
Ctrl-C.

Usage: .venv/bin/python bench/blobs.py [--count N] [--size BYTES] [--big BYTES]
       [--quick] [--keep] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import (  # bench/common.py
    Backend,
    NeoBackend,
    ZEOBackend,
    format_table,
    measure_and_report,
    relstorage_available,
    say,
    start_backends,
    temporary_directory,
    write_spec,
)

MB = 1 << 20
PER_TXN = 10

CHILD = r'''
import hashlib, json, os, sys, time
sys.path.insert(0, %(bench)r)
import transaction, ZODB
from ZODB.blob import Blob
from common import open_spec, read_spec, vm_hwm
spec_path, cache, mode, count, size = sys.argv[1:6]
count, size = int(count), int(size)
spec = read_spec(spec_path)
spec.setdefault("options", {}).update(spec.pop("blob_options", {}))
for key, value in list(spec["options"].items()):
    if value == "CACHE":
        spec["options"][key] = cache
if spec["kind"] == "zconfig":
    spec["text"] = spec["text"].replace("CACHE", cache)
db = ZODB.DB(open_spec(spec))
conn = db.open()
root = conn.root()
digest = hashlib.sha256()
block = os.urandom(1 << 20)
started = time.perf_counter()
if mode == "write":
    for i in range(count):
        blob = root.setdefault("blobs", {}) and None
        b = Blob()
        with b.open("w") as f:
            left = size
            n = 0
            while left:
                piece = block[:min(left, len(block) - 8)] + (i * 1000003 + n).to_bytes(8, "big")
                piece = piece[:left]
                f.write(piece)
                digest.update(piece)
                left -= len(piece)
                n += 1
        root["b%%d" %% i] = b
        if i %% %(per_txn)d == %(per_txn)d - 1 or i == count - 1:
            transaction.commit()
else:
    for i in range(count):
        with root["b%%d" %% i].open("r") as f:
            while True:
                piece = f.read(1 << 20)
                if not piece:
                    break
                digest.update(piece)
elapsed = time.perf_counter() - started
db.close()
print(json.dumps({"seconds": elapsed, "digest": digest.hexdigest(), "peak": vm_hwm()}))
'''


class ZEOBlobBackend(ZEOBackend):
    """ZEO with a blob directory on the server; each client its own cache."""

    def server_args(self) -> list[str]:
        config = os.path.join(self.directory, "zeo.conf")
        with open(config, "w") as f:
            f.write("<zeo>\n  address %s:%d\n</zeo>\n<filestorage>\n  path %s\n"
                    "  blob-dir %s\n</filestorage>\n" % (
                        *self.address, os.path.join(self.directory, "Data.fs"),
                        os.path.join(self.directory, "blobs")))
        return ["-C", config]

    def spec(self) -> dict:
        return {**super().spec(), "blob_options": {"blob_dir": "CACHE"}}


class NeoBlobBackend(NeoBackend):
    def spec(self) -> dict:
        return {**super().spec(), "blob_options": {"blob_dir": "CACHE"}}


class RelStorageBlobBackend(Backend):
    key = "relstorage"
    label = "RelStorage/SQLite"

    def start(self, workdir: str) -> None:
        self.directory = os.path.join(workdir, "relstorage")
        os.makedirs(self.directory)

    def spec(self) -> dict:
        # contents in the database (shared-blob-dir false), a cache per client
        return {"kind": "zconfig", "text": "%%import relstorage\n<relstorage>\n"
                "  blob-dir CACHE\n  shared-blob-dir false\n  <sqlite3>\n    data-dir %s\n"
                "  </sqlite3>\n</relstorage>" % self.directory}


def child(workdir: str, backend: Backend, mode: str, count: int, size: int,
          step: str) -> dict:
    spec = write_spec(workdir, backend)
    cache = os.path.join(workdir, "cache-%s-%s" % (backend.key, step))
    script = CHILD % {"bench": os.path.dirname(os.path.abspath(__file__)), "per_txn": PER_TXN}
    result = subprocess.run([sys.executable, "-c", script, spec, cache, mode, str(count),
                             str(size)], capture_output=True, text=True, timeout=3600)
    if result.returncode:
        raise RuntimeError("%s %s failed: %s" % (backend.label, step, result.stderr[-2000:]))
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(opts, peaks) -> dict:
    backends: list[Backend] = [NeoBlobBackend(1, 0, 12), NeoBlobBackend(2, 1, 12),
                               ZEOBlobBackend()]
    skipped: dict[str, str] = {}
    if relstorage_available():
        backends.append(RelStorageBlobBackend())
    else:
        skipped["RelStorage/SQLite"] = "not installed"
    results: dict = {"skipped": skipped, "rows": {}, "failed": {}}
    with temporary_directory("blobs", opts.keep) as (cleanup, workdir):
        active = start_backends(cleanup, backends, workdir, skipped, peaks=peaks)
        for backend in active:
            row = results["rows"][backend.label] = {}
            for step, mode, count, size in (("write", "write", opts.count, opts.size),
                                            ("read", "read", opts.count, opts.size)):
                row[step] = child(workdir, backend, mode, count, size, step)
                say("  %-18s %-5s %d x %d bytes: %.2f s" % (
                    backend.label, step, count, size, row[step]["seconds"]))
            if row["write"]["digest"] != row["read"]["digest"]:
                raise RuntimeError("%s: read back other contents" % backend.label)
        # the big blob in a new root key of the same databases
        for backend in active:
            row = results["rows"][backend.label]
            started = time.perf_counter()
            try:
                row["big write"] = child(workdir, backend, "write", 1, opts.big, "bigw")
                row["big read"] = child(workdir, backend, "read", 1, opts.big, "bigr")
            except RuntimeError as e:  # e.g. RelStorage/SQLite: SQLite's 1 GB limit
                why = str(e).strip().splitlines()[-1]
                results["failed"][backend.label] = why
                say("  %-18s big blob of %d MB: failed: %s" % (backend.label, opts.big // MB,
                                                               why))
                continue
            if row["big write"]["digest"] != row["big read"]["digest"]:
                raise RuntimeError("%s: read back another big blob" % backend.label)
            say("  %-18s big blob of %d MB: %.1f s" % (backend.label, opts.big // MB,
                                                       time.perf_counter() - started))
            for name in os.listdir(workdir):  # caches: gigabytes
                if name.startswith("cache-%s-big" % backend.key):
                    subprocess.run(["rm", "-rf", os.path.join(workdir, name)])
    return results


def report(results: dict) -> str:
    rows = []
    steps = ("write", "read", "big write", "big read")
    for label, row in results["rows"].items():
        rows.append([label] + ["%.2f s (%.0f MB/s, %.0f MB)" % (
            row[s]["seconds"], row[s]["bytes"] / MB / row[s]["seconds"], row[s]["peak"] / MB)
            if s in row else "-" for s in steps])
    text = format_table(["backend", *("%s (client peak RSS)" % s for s in steps)], rows)
    zeo = results["rows"].get("ZEO")
    if zeo:
        ratios = []
        for label, row in results["rows"].items():
            if label != "ZEO":
                ratios.append([label] + ["%.2f" % (zeo[s]["seconds"] / row[s]["seconds"])
                                         if s in row and s in zeo else "-" for s in steps])
        text += "\n\nZEO time / this time (above 1: faster than ZEO)\n" + format_table(
            ["backend", *steps], ratios)
    for label, why in results["skipped"].items():
        text += "\nskipped %s: %s" % (label, why)
    for label, why in results["failed"].items():
        text += "\n%s: the big blob failed: %s" % (label, why)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--big", type=int, default=1 << 30)
    parser.add_argument("--quick", action="store_true", help="50 blobs, a 20 MB big one")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--json", help="write the results to this file")
    opts = parser.parse_args()
    if opts.quick:
        opts.count, opts.big = 50, 20 * MB

    def measured(opts, peaks):
        results = measure(opts, peaks)
        for row in results["rows"].values():
            for step, value in row.items():
                value["bytes"] = (opts.big if step.startswith("big") else opts.count * opts.size)
        return results
    return measure_and_report(measured, opts, report, "blobs: %d x %d bytes, one of %d MB" % (
        opts.count, opts.size, opts.big // MB), lambda r: r["rows"])


if __name__ == "__main__":
    sys.exit(main())
