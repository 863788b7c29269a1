"""Compare neozodb with FileStorage, ZEO and (when installed) RelStorage.

Measures, for each backend (see bench/README.md):

1. commit of N new objects in one transaction,
2. update of those N objects in one transaction,
3. N cold reads through a new storage client (empty caches),
4. latency of one-object commits (100 of them): median and p90.

Every process started here (neozodb nodes, the ZEO server) and every
temporary directory is cleaned up on exit, error or Ctrl-C.

Usage: .venv/bin/python bench/bench.py [--objects N] [--rounds R] [--quick] [--tls] [--json FILE]
"""
from __future__ import annotations

import argparse
import base64
import logging
import os
import socket
import statistics
import subprocess
import sys
import time

import transaction
import ZODB
from BTrees.OOBTree import OOBTree
from common import INTERRUPTED, interruptible, stop_cluster, temporary_directory, write_json
from persistent.mapping import PersistentMapping

SMALL_COMMITS = 100  # one-object commits per round
PAYLOAD = 300  # bytes of state per object (a str in a PersistentMapping)

MEASURES = [
    ("commit_new", "commit {n} new objects"),
    ("update", "update {n} objects"),
    ("cold_read", "{n} cold reads"),
    ("small_median", "1-object commit, median"),
    ("small_p90", "1-object commit, p90"),
]
BEST_OF = ("commit_new", "update", "cold_read")  # best round kept; others pooled


def payload() -> str:
    """300 printable, hardly compressible characters."""
    return base64.b64encode(os.urandom(PAYLOAD * 3 // 4)).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))  # ceil
    return ordered[int(rank) - 1]


# -- backends ----------------------------------------------------------------------------
class Backend:
    key = ""
    label = ""

    def start(self, workdir: str) -> None:
        """Start whatever the backend needs; called once before the rounds."""

    def open_storage(self):
        """A NEW storage client object (empty caches)."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop everything start() started; must be safe to call twice."""


class NeoBackend(Backend):
    def __init__(self, storages: int, replicas: int, partitions: int = 12,
                 tls: bool = False) -> None:
        self.storages = storages
        self.replicas = replicas
        self.partitions = partitions
        self.tls = tls
        self.key = "neo_%ds_r%d%s" % (storages, replicas, "_tls" if tls else "")
        self.label = "neo %dS r%d%s" % (storages, replicas, " TLS" if tls else "")
        self.cluster = None

    def start(self, workdir: str) -> None:
        from neozodb.cli.cluster import LocalCluster
        self.cluster = LocalCluster(os.path.join(workdir, self.key), name="bench",
                                    storages=self.storages, replicas=self.replicas,
                                    partitions=self.partitions, loglevel="INFO",
                                    tls=self.tls)
        try:
            self.cluster.start(wait=60)
        except BaseException:
            self.stop()
            raise

    def open_storage(self):
        from neozodb.client import Storage
        return Storage(**self.cluster.client_kwargs())

    def stop(self) -> None:
        cluster, self.cluster = self.cluster, None
        if cluster is not None:
            stop_cluster(cluster)


class FileStorageBackend(Backend):
    key = "filestorage"
    label = "FileStorage"

    def start(self, workdir: str) -> None:
        os.makedirs(os.path.join(workdir, "fs"))
        self.path = os.path.join(workdir, "fs", "Data.fs")

    def open_storage(self):
        from ZODB.FileStorage import FileStorage
        return FileStorage(self.path)


class ZEOBackend(Backend):
    key = "zeo"
    label = "ZEO"

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def start(self, workdir: str) -> None:
        directory = os.path.join(workdir, "zeo")
        os.makedirs(directory)
        self.address = ("127.0.0.1", free_port())
        argv = [sys.executable, "-m", "ZEO.runzeo", "-a", "%s:%d" % self.address,
                "-f", os.path.join(directory, "Data.fs")]
        with open(os.path.join(directory, "zeo.log"), "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        try:
            self._wait_port(30.0)
        except BaseException:
            self.stop()
            raise

    def _wait_port(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("ZEO server exited with status %s" % self.proc.returncode)
            try:
                socket.create_connection(self.address, timeout=1).close()
                return
            except OSError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError("ZEO server did not listen on %s:%d" % self.address) from e
            time.sleep(0.05)  # bounded polling of the port

    def open_storage(self):
        from ZEO.ClientStorage import ClientStorage
        # no `client=` argument: the cache lives in memory, so a new object is cold
        return ClientStorage(self.address, wait=True, wait_timeout=30)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class RelStorageBackend(Backend):
    key = "relstorage"
    label = "RelStorage/SQLite"

    def start(self, workdir: str) -> None:
        self.directory = os.path.join(workdir, "relstorage")
        os.makedirs(self.directory)

    def open_storage(self):
        from ZODB.config import storageFromString
        return storageFromString(
            "%%import relstorage\n<relstorage>\n  <sqlite3>\n    data-dir %s\n"
            "  </sqlite3>\n</relstorage>\n" % self.directory)


def relstorage_available() -> bool:
    try:
        import relstorage  # noqa: F401
    except ImportError:
        return False
    return True


# -- one round ---------------------------------------------------------------------------------
def run_round(backend: Backend, objects: int, name: str) -> dict:
    """One round on fresh data (a new container `name` in the root)."""
    result: dict = {}
    tm = transaction.TransactionManager()
    db = ZODB.DB(backend.open_storage())
    try:
        conn = db.open(tm)
        root = conn.root()
        container = root[name] = OOBTree()
        tm.commit()
        objs = [PersistentMapping({"data": payload()}) for _ in range(objects)]
        for i, obj in enumerate(objs):
            container[i] = obj

        t0 = time.perf_counter()
        tm.commit()
        result["commit_new"] = time.perf_counter() - t0

        for obj in objs:
            obj["data"] = payload()
        t0 = time.perf_counter()
        tm.commit()
        result["update"] = time.perf_counter() - t0

        expected = {i: obj["data"] for i, obj in enumerate(objs)}
        small = []
        for i in range(SMALL_COMMITS):
            obj = objs[i * 7 % objects]
            obj["data"] = value = payload()
            expected[i * 7 % objects] = value
            t0 = time.perf_counter()
            tm.commit()
            small.append(time.perf_counter() - t0)
        result["small"] = small
        conn.close()
    finally:
        db.close()

    # cold reads: a new storage client and a new DB, so every cache is empty
    db = ZODB.DB(backend.open_storage())
    try:
        conn = db.open(tm)
        container = conn.root()[name]
        items = list(container.items())  # loads the BTree; the values stay ghosts
        ghosts = sum(1 for _, obj in items if obj._p_changed is None)
        if ghosts != objects:
            raise RuntimeError("%d of %d objects were not ghosts" % (objects - ghosts, objects))
        t0 = time.perf_counter()
        values = [obj["data"] for _, obj in items]  # unghosts each object
        result["cold_read"] = time.perf_counter() - t0
        if values != [expected[i] for i, _ in items]:
            raise RuntimeError("%s: cold reads returned wrong data" % backend.label)
        tm.abort()
        conn.close()
    finally:
        db.close()
    return result


def summarize(backend: Backend, per_round: list[dict]) -> dict:
    small = [t for r in per_round for t in r["small"]]
    ms = {key: min(r[key] for r in per_round) * 1e3 for key in BEST_OF}
    ms["small_median"] = statistics.median(small) * 1e3
    ms["small_p90"] = percentile(small, 90) * 1e3
    return {
        "label": backend.label,
        "ms": ms,
        "rounds_ms": [{key: r[key] * 1e3 for key in BEST_OF} for r in per_round],
        "small_commits_ms": [t * 1e3 for t in small],
    }


# -- report ---------------------------------------------------------------------------------------
def ratios(results: dict) -> dict:
    """{neo key: {other key: {measure: other ms / neo ms}}}"""
    out: dict = {}
    for neo_key, neo in results.items():
        if not neo_key.startswith("neo"):
            continue
        for other_key in ("zeo", "filestorage", "relstorage"):
            other = results.get(other_key)
            if other is None:
                continue
            out.setdefault(neo_key, {})[other_key] = {
                m: other["ms"][m] / neo["ms"][m] if neo["ms"][m] else None for m, _ in MEASURES}
    return out


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths, strict=True)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def report(results: dict, skipped: dict, objects: int) -> str:
    names = [label.format(n=objects) for _, label in MEASURES]
    keys = list(results)
    header = ["times in ms", *(results[k]["label"] for k in keys), *skipped]
    rows = []
    for (m, _), name in zip(MEASURES, names, strict=True):
        rows.append([name, *("%.1f" % results[k]["ms"][m] for k in keys),
                     *("skipped" for _ in skipped)])
    out = [format_table(header, rows)]
    rat = ratios(results)
    columns = [(n, o) for n in rat for o in rat[n]]
    if columns:
        short = {"zeo": "ZEO", "filestorage": "FS", "relstorage": "RS"}
        header = ["ratio (>1: neo faster)",
                  *("%s / %s" % (short[o], results[n]["label"]) for n, o in columns)]
        rows = []
        for (m, _), name in zip(MEASURES, names, strict=True):
            cells = []
            for n, o in columns:
                value = rat[n][o][m]
                cells.append("-" if value is None else "%.2f" % value)
            rows.append([name, *cells])
        out += ["", format_table(header, rows)]
    tls_pairs = [(k[:-4], k) for k in keys if k.endswith("_tls") and k[:-4] in results]
    if tls_pairs:
        header = ["TLS / plain (>1: TLS slower)",
                  *("%s / %s" % (results[t]["label"], results[p]["label"]) for p, t in tls_pairs)]
        rows = [[name, *("%.2f" % (results[t]["ms"][m] / results[p]["ms"][m])
                         if results[p]["ms"][m] else "-" for p, t in tls_pairs)]
                for (m, _), name in zip(MEASURES, names, strict=True)]
        out += ["", format_table(header, rows)]
    for label, why in skipped.items():
        out.append("\n%s skipped: %s" % (label, why))
    return "\n".join(out)


# -- main -----------------------------------------------------------------------------------------
def measure(backends: list[Backend], skipped: dict, objects: int, rounds: int) -> dict:
    """Run every backend; whatever happens, stop every process and remove
    the temporary directory before returning or raising.

    All backends run side by side and the rounds are interleaved (round 1 of
    each backend, then round 2...), so that a load spike on the machine hits
    one round of every backend rather than every round of one."""
    per_round: dict[str, list[dict]] = {}
    with temporary_directory("bench") as (cleanup, workdir):
        for backend in backends:
            cleanup.callback(backend.stop)  # idempotent: safe after a failed start
        active = []
        for backend in backends:
            t0 = time.perf_counter()
            try:
                backend.start(workdir)
            except Exception as e:
                if not isinstance(backend, RelStorageBackend):
                    raise
                skipped[backend.label] = "failed to start: %r" % (e,)
                continue
            active.append(backend)
            per_round[backend.key] = []
            print("  started %-18s %.1fs" % (backend.label, time.perf_counter() - t0), flush=True)
        for r in range(rounds):
            print("  round %d/%d:" % (r + 1, rounds), end="", flush=True)
            for backend in list(active):
                t0 = time.perf_counter()
                try:
                    per_round[backend.key].append(run_round(backend, objects, "round%d" % r))
                except Exception as e:
                    if not isinstance(backend, RelStorageBackend):
                        print(" %s FAILED" % backend.label, flush=True)
                        raise
                    skipped[backend.label] = "failed: %r" % (e,)
                    active.remove(backend)
                    del per_round[backend.key]
                    backend.stop()
                    continue
                print(" %s %.1fs" % (backend.label, time.perf_counter() - t0), end="", flush=True)
            print(flush=True)
    return {b.key: summarize(b, per_round[b.key]) for b in backends if b.key in per_round}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=1000, help="objects per round (1000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per backend (3)")
    parser.add_argument("--quick", action="store_true", help="--objects 200 --rounds 1")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--tls", action="store_true",
                        help="add 'neo 1S r0 TLS', the same cluster with TLS everywhere, and"
                        " its TLS / plain ratios")
    args = parser.parse_args(argv)
    if args.quick:
        args.objects, args.rounds = 200, 1
    if args.objects < 1 or args.rounds < 1:
        parser.error("--objects and --rounds must be positive")
    # warnings such as "lost the master: client closing" on close are expected noise
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")

    backends: list[Backend] = [NeoBackend(1, 0), NeoBackend(2, 1), FileStorageBackend(),
                               ZEOBackend()]
    if args.tls:
        backends.insert(1, NeoBackend(1, 0, tls=True))
    skipped: dict[str, str] = {}
    if relstorage_available():
        backends.append(RelStorageBackend())
    else:
        skipped[RelStorageBackend.label] = "`import relstorage` failed (not installed)"

    started = time.perf_counter()
    print("objects=%d rounds=%d, %d one-object commits per round, %d CPUs" % (
        args.objects, args.rounds, SMALL_COMMITS, os.cpu_count() or 0), flush=True)
    results = interruptible(measure, backends, skipped, args.objects, args.rounds,
                            stopped="every process stopped, temporary files removed")
    if INTERRUPTED:
        return 130

    print()
    print(report(results, skipped, args.objects))
    print("\nbest of %d rounds for the first three rows; one-object commit latencies pooled "
          "over all rounds (%d commits); total %.0fs" % (
              args.rounds, SMALL_COMMITS * args.rounds, time.perf_counter() - started))
    if args.json:
        write_json(args.json, {"objects": args.objects, "rounds": args.rounds,
                               "small_commits_per_round": SMALL_COMMITS,
                               "payload_bytes": PAYLOAD},
                   results, ratios=ratios(results), skipped=skipped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
