"""neozodb clusters whose storages run on MariaDB against RelStorage on the
same MariaDB server (and a SQLite cluster for reference): bench.py's
measures (commit of N new objects, update, N cold reads, one-object commit
latency) with each backend under the same cluster layout.

One throw-away MariaDB server (``neozodb.throwaway.mariadb``: Debian's
mariadbd in a temporary directory, 127.0.0.1 and a socket,
innodb_flush_log_at_trx_commit=1) holds every database: each neozodb
storage's and RelStorage's (history-free, see RelStorageMariaDBBackend;
through mysqlclient, as the ``bench`` extra installs it).  Everything is stopped and removed at the
end, on error or Ctrl-C.

Usage: .venv/bin/python bench/mariadb_vs_relstorage.py [--objects N] [--rounds R] [--quick]
                                                       [--json FILE]
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time

from bench import SMALL_COMMITS, measure, ratios, report
from common import (
    INTERRUPTED,
    NeoBackend,
    PeakMemory,
    RelStorageBackend,
    SharedServer,
    interruptible,
    write_json,
)

#: RelStorage 4.3 takes MariaDB 10.11 for MySQL 8 (its version number) and
#: sends it MySQL 8's syntax (INSERT ... AS excluded): the server says it is
#: MySQL 5.7.19 (@@version only)
SERVER_ARGS = ["--version=5.7.19-MariaDB-10.11"]


class SharedMariaDB(SharedServer):
    """A throw-away MariaDB server for ``bench.py --mariadb`` and
    ``replication.py --adapter MariaDB``, shared by the backends on it."""

    adapter = "MariaDB"

    def _start(self, workdir: str):
        from neozodb.throwaway import mariadb
        return mariadb.start(os.path.join(workdir, "mariadb"), SERVER_ARGS)

    @property
    def socket(self) -> str:
        return self.server.socket

    def stats(self, dsn: str) -> dict:
        """Counts of a MariaDB backend's database (``replication.db_stats``'s):
        values of 16 MiB or more are in ``bigdata``."""
        import mariadb
        name = dsn.split("@", 1)[1].split("/", 1)[0]
        conn = mariadb.connect(user="root", unix_socket=self.server.socket, database=name)
        try:
            cur = conn.cursor()
            counts = {}
            for key, sql in (("obj_records", "SELECT COUNT(*) FROM obj"),
                             ("transactions", "SELECT COUNT(*) FROM trans"),
                             ("data_records", "SELECT COUNT(*) FROM data"),
                             ("data_bytes", "SELECT COALESCE(SUM(LENGTH(value)), 0) FROM data"),
                             ("big_bytes", "SELECT COALESCE(SUM(LENGTH(value)), 0) FROM bigdata")):
                cur.execute(sql)
                counts[key] = int(cur.fetchone()[0])
        finally:
            conn.close()
        counts["data_bytes"] += counts.pop("big_bytes")
        return counts


def _acquire(backend, workdir: str) -> None:
    """A backend on a SharedMariaDB starts it (once per backend)."""
    if isinstance(backend.server, SharedMariaDB) and not getattr(backend, "acquired", False):
        backend.server.acquire(workdir)
        backend.acquired = True


def _release(backend) -> None:
    if getattr(backend, "acquired", False):
        backend.acquired = False
        backend.server.release()


def mariadb_backends(skipped: dict[str, str], shared: SharedMariaDB) -> list:
    """neozodb on MariaDB (1 storage replicas 0, 2 storages replicas 1) and
    RelStorage on the same shared server, for bench.py --mariadb."""
    backends = [MariaDBNeoBackend(shared, 1, 0), MariaDBNeoBackend(shared, 2, 1)]
    try:
        import MySQLdb  # noqa: F401
        import relstorage  # noqa: F401
        backends.append(RelStorageMariaDBBackend(shared))
    except ImportError as e:
        skipped[RelStorageMariaDBBackend.label] = "not installed: %s" % e
    return backends


class MariaDBNeoBackend(NeoBackend):
    """A neozodb cluster whose storages are on the MariaDB server."""

    def __init__(self, server, storages: int, replicas: int) -> None:
        super().__init__(storages, replicas)
        self.server = server
        self.key += "_mariadb"
        self.label += " MariaDB"

    def start(self, workdir: str) -> None:
        from neozodb.cli.cluster import LocalCluster
        _acquire(self, workdir)
        key = self.key
        self.cluster = LocalCluster(
            os.path.join(workdir, key), name="bench", storages=self.storages,
            replicas=self.replicas, partitions=self.partitions, loglevel="INFO",
            adapter="MariaDB", databases=lambda i: self.server.database("%s_s%d" % (key, i)))
        try:
            self.cluster.start(wait=60)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        super().stop()
        _release(self)


class RelStorageMariaDBBackend(RelStorageBackend):
    """RelStorage on a database of the MariaDB server, history-free:
    RelStorage 4.3's history-preserving schema cannot be created on MariaDB
    10.5 and later (its ``object_state.tid BIGINT REFERENCES "transaction"``
    is enforced there, against ``transaction.tid BIGINT UNSIGNED``: "Foreign
    key constraint is incorrectly formed")."""
    key = "relstorage_mariadb"
    label = "RelStorage/MariaDB HF"

    def __init__(self, server) -> None:
        self.server = server

    def start(self, workdir: str) -> None:
        _acquire(self, workdir)
        self.server.database("relstorage")

    def stop(self) -> None:
        _release(self)

    def zconfig(self) -> str:
        return ("<relstorage>\n  keep-history false\n  <mysql>\n    db relstorage\n"
                "    user root\n    unix_socket %s\n  </mysql>\n</relstorage>"
                % self.server.socket)


def run(args) -> tuple[dict, dict, PeakMemory]:
    from neozodb.throwaway import mariadb
    directory = tempfile.mkdtemp(prefix="neozodb-bench-mariadb-")
    skipped: dict[str, str] = {}
    peaks = PeakMemory()
    try:
        t0 = time.perf_counter()
        server = mariadb.start(directory, SERVER_ARGS)
        print("  started MariaDB server     %.1fs" % (time.perf_counter() - t0), flush=True)
        try:
            backends = [NeoBackend(1, 0), MariaDBNeoBackend(server, 1, 0),
                        MariaDBNeoBackend(server, 2, 1)]
            try:
                import MySQLdb  # noqa: F401
                import relstorage  # noqa: F401
                backends.append(RelStorageMariaDBBackend(server))
            except ImportError as e:
                skipped[RelStorageMariaDBBackend.label] = "not installed: %s" % e
            results = measure(backends, skipped, args.objects, args.rounds, peaks)
        finally:
            server.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return results, skipped, peaks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=1000, help="objects per round (1000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per backend (3)")
    parser.add_argument("--quick", action="store_true", help="--objects 200 --rounds 1")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.objects, args.rounds = 200, 1
    if args.objects < 1 or args.rounds < 1:
        parser.error("--objects and --rounds must be positive")
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    print("objects=%d rounds=%d, %d one-object commits per round, %d CPUs" % (
        args.objects, args.rounds, SMALL_COMMITS, os.cpu_count() or 0), flush=True)
    out = interruptible(run, args, stopped="every process stopped, temporary files removed")
    if INTERRUPTED:
        return 130
    results, skipped, peaks = out
    print()
    print(report(results, skipped, args.objects))
    print()
    print(peaks.table("peak RSS (VmHWM) of the servers, MB (MariaDB's own not counted)"))
    print("\nbest of %d rounds for the first three rows; total %.0fs" % (
        args.rounds, time.perf_counter() - started))
    if args.json:
        write_json(args.json, {"objects": args.objects, "rounds": args.rounds}, results,
                   ratios=ratios(results), skipped=skipped, peak_rss=peaks.peaks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
