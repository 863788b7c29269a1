"""Bursts of stores (storage/writes.py, ``Writes.prefetch``): the serials
of a burst are looked up together and, on PostgreSQL and MariaDB, its data
rows taken together.  Conflicts and lock waits inside a burst must give what
one store at a time gives, and the rows a store did not keep must not
stay in the database."""
from __future__ import annotations

import itertools
import os
import shutil
import sqlite3
import threading

import psycopg
import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping
from ZODB.Connection import TransactionMetaData
from ZODB.POSException import ConflictError

from neozodb.cli.cluster import LocalCluster, wait_until
from neozodb.client import Storage
from pgserver import skip_reason

pytestmark = pytest.mark.timeout(180)

_clusters = itertools.count()


def _mariadb_missing() -> str | None:
    try:
        import mariadb  # noqa: F401
    except ImportError:
        return "no MariaDB connector"
    if not os.path.exists("/usr/sbin/mariadbd") and not shutil.which("mariadbd"):
        return "no MariaDB server here (apt-get install mariadb-server)"
    return None


@pytest.fixture(scope="module")
def mariadb_server(tmp_path_factory):
    from mdbserver import server_fixture
    yield from server_fixture(tmp_path_factory)


_ORPHANS = ("SELECT COUNT(*) FROM data WHERE id NOT IN (SELECT data_id FROM obj"
            " WHERE data_id IS NOT NULL)")


@pytest.fixture(params=["SQLite", "PostgreSQL", "MariaDB"])
def cluster(request, tmp_path):
    """A 1-storage cluster on that backend; ``cluster.orphans()`` counts
    the data rows no object revision uses (raw SQL, node stopped)."""
    kw = {}
    name = "burst%d" % next(_clusters)
    if request.param == "PostgreSQL":
        if skip_reason() is not None:
            pytest.skip(skip_reason())
        dsn = request.getfixturevalue("postgresql_server").database(name)
        kw = dict(adapter="PostgreSQL", databases=lambda i: dsn)

        def orphans():
            with psycopg.connect(dsn) as conn:
                return conn.execute(_ORPHANS).fetchone()[0]
    elif request.param == "MariaDB":
        if _mariadb_missing():
            pytest.skip(_mariadb_missing())
        server = request.getfixturevalue("mariadb_server")
        database = server.database(name)
        kw = dict(adapter="MariaDB", databases=lambda i: database)

        def orphans():
            import mariadb
            conn = mariadb.connect(user="root", unix_socket=server.socket, database=name)
            try:
                cursor = conn.cursor()
                cursor.execute(_ORPHANS)
                return cursor.fetchone()[0]
            finally:
                conn.close()
    else:
        def orphans():
            conn = sqlite3.connect(c.database(1))
            try:
                return conn.execute(_ORPHANS).fetchone()[0]
            finally:
                conn.close()
    c = LocalCluster(str(tmp_path / "cluster"), name="bursts", storages=1, replicas=0,
                     partitions=4, **kw)
    c.orphans = orphans
    try:
        c.start(wait=60)
        yield c
    finally:
        c.kill()


def test_conflicts_and_lock_waits_inside_bursts(cluster):
    db = ZODB.DB(Storage(**cluster.client_kwargs()))
    other = Storage(**cluster.client_kwargs(name="other"))
    other_db = ZODB.DB(other)
    try:
        tm = transaction.TransactionManager()
        root = db.open(tm).root()
        objects = root["objects"] = [PersistentMapping(n=i) for i in range(300)]
        shared = root["shared"] = PersistentMapping(n=0)
        tm.commit()
        first = root._p_serial
        wait_until(lambda: other.lastTransaction() >= first, 30, "the other client to see it")
        # the other client changes object 150: our burst of 300 stores then
        # holds one with a stale serial, and fails as a whole
        other_tm = transaction.TransactionManager()
        other_db.open(other_tm).root()["objects"][150]["n"] = "theirs"
        other_tm.commit()
        for i, obj in enumerate(objects):
            obj["n"] = ("ours", i)
        with pytest.raises(ConflictError):
            tm.commit()
        tm.abort()
        assert [o["n"] for o in root["objects"]] == [
            "theirs" if i == 150 else i for i in range(300)]
        # a lock wait inside a burst: the other client holds "shared"
        # (voted, not finished) while our burst stores it among 300 others;
        # ours waits, then conflicts, since theirs committed meanwhile
        data, serial = other.load(shared._p_oid)
        meta = TransactionMetaData()
        other.tpc_begin(meta)
        other.store(shared._p_oid, serial, data, "", meta)
        other.tpc_vote(meta)
        for i, obj in enumerate(objects):
            obj["n"] = ("again", i)
        shared["n"] = "ours"
        outcome = {}

        def our_commit():
            try:
                tm.commit()
                outcome["committed"] = True
            except ConflictError as e:
                outcome["conflict"] = e
        ours = threading.Thread(target=our_commit)
        ours.start()
        ours.join(1.0)  # bounded: ours must be waiting for the lock, not done
        assert ours.is_alive() and not outcome
        theirs = other.tpc_finish(meta)
        ours.join(60)
        assert not ours.is_alive() and "conflict" in outcome
        tm.abort()
        assert other.load(shared._p_oid) == (data, theirs)  # not overwritten by ours
        # a burst without conflict commits whole
        for i, obj in enumerate(objects):
            obj["n"] = ("last", i)
        tm.commit()
        check = db.open(transaction.TransactionManager())
        check.cacheMinimize()
        assert [o["n"] for o in check.root()["objects"]] == [("last", i) for i in range(300)]
        check.close()
    finally:
        db.close()
        other_db.close()
    cluster.stop()
    assert cluster.orphans() == 0
