"""PostgreSQL for the benchmarks (``bench.py --postgresql``,
``replication.py --adapter PostgreSQL``): one throw-away server
(``neozodb.throwaway.postgresql``, fsync on) shared by every backend that
needs it, neozodb clusters whose storages use the PostgreSQL backend on
it, and RelStorage on the same server.

The scripts import it as ``from pg import ...`` (this directory is the
first entry of sys.path when one of them runs).
"""
from __future__ import annotations

import os

import common
from common import NeoBackend, RelStorageBackend


def skip_reason() -> str | None:
    """Why PostgreSQL cannot be measured here, or None."""
    import importlib.util

    from neozodb.throwaway.postgresql import find_binaries
    if importlib.util.find_spec("psycopg") is None:
        return "psycopg is not installed (extra postgresql)"
    if find_binaries() is None:
        return "PostgreSQL binaries not found (initdb, pg_ctl, postgres)"
    return None


class SharedServer(common.SharedServer):
    """A throw-away PostgreSQL server shared by the backends on it."""

    adapter = "PostgreSQL"

    def _start(self, workdir: str):
        from neozodb.throwaway.postgresql import start
        return start(os.path.join(workdir, "postgresql"))

    def stats(self, dsn: str) -> dict:
        """Counts of a PostgreSQL backend's database (``replication.db_stats``'s)."""
        import psycopg
        with psycopg.connect(dsn, autocommit=True) as conn:
            obj = conn.execute("SELECT COUNT(*) FROM obj").fetchone()[0]
            trans = conn.execute("SELECT COUNT(*) FROM trans").fetchone()[0]
            data, size = conn.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(value)), 0)"
                                      " FROM data").fetchone()
        return {"obj_records": obj, "transactions": trans, "data_records": data,
                "data_bytes": int(size)}


class NeoPGBackend(NeoBackend):
    """A neozodb cluster whose storages use the PostgreSQL backend, one
    database each on the shared server."""

    def __init__(self, server: SharedServer, storages: int, replicas: int) -> None:
        super().__init__(storages, replicas, adapter="PostgreSQL")
        self.key += "_pg"
        self.label += " PG"
        self.shared = server
        self.acquired = False

    def start(self, workdir: str) -> None:
        self.shared.acquire(workdir)
        self.acquired = True
        self.databases = lambda i: self.shared.database("%s_s%d" % (self.key, i))
        super().start(workdir)

    def stop(self) -> None:
        super().stop()
        if self.acquired:
            self.acquired = False
            self.shared.release()


class RelStoragePGBackend(RelStorageBackend):
    """RelStorage 4 on the shared server (its psycopg2 driver), history
    kept, default caches, in the benchmark process."""
    key = "relstorage_pg"
    label = "RelStorage/PG"
    in_process = False  # the server is shared by processes

    def __init__(self, server: SharedServer) -> None:
        self.shared = server
        self.acquired = False
        self.dsn = None

    def start(self, workdir: str) -> None:
        import psycopg2  # noqa: F401 - RelStorage's driver (extra bench): fail at start
        self.shared.acquire(workdir)
        self.acquired = True
        self.dsn = self.shared.database("relstorage")

    def zconfig(self) -> str:
        return "<relstorage>\n  <postgresql>\n    dsn %s\n  </postgresql>\n</relstorage>" \
            % self.dsn

    def stop(self) -> None:
        if self.acquired:
            self.acquired = False
            self.shared.release()


def postgresql_backends(skipped: dict[str, str]) -> list:
    """The neozodb clusters on PostgreSQL (1S r0, 2S r1) and RelStorage on
    the same server; [] (said in ``skipped``) when it cannot run here."""
    why = skip_reason()
    if why is not None:
        skipped["neo on PostgreSQL"] = why
        return []
    server = SharedServer()
    return [NeoPGBackend(server, 1, 0), NeoPGBackend(server, 2, 1), RelStoragePGBackend(server)]
