"""Clusters whose storages run the PostgreSQL backend, on a throw-away
server (tests/pgserver.py): commits, replication to a new storage, a
tampered copy found and repaired by ``neoctl check``, pack, truncate, a
second storage refused on a database in use, whole-cluster SIGKILL rounds
while clients commit, a live import into PostgreSQL, and blobs (stored,
replicated to and from SQLite, garbage-collected, checked and repaired)."""
from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import textwrap

import psycopg
import pytest
import transaction
import ZODB
from blob_backends import BlobSQL, blob_scenario
from persistent.mapping import PersistentMapping
from test_crash import check_writers, crash_rounds
from test_import import ImportCluster, commit, logged
from test_pack import completed_by, gone, make_garbage
from test_replication import all_up_to_date
from test_truncate import truncated_and_running
from ZODB.FileStorage import FileStorage

from fsdata import make_filestorage, transactions
from neozodb.cli.cluster import LocalCluster, wait_until
from neozodb.client import Storage
from neozodb.protocol import NodeStates, u64
from neozodb.tid import time_from_tid
from pgserver import skip_reason
from replicas import raw_contents_postgresql

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or '')]

_clusters = itertools.count()


def pg_cluster(tmp_path, server, storages: int = 2, partitions: int = 6, **kw) -> LocalCluster:
    """A cluster (not started) whose storage i has database c<n>s<i>, new."""
    prefix = 'c%ds' % next(_clusters)
    return LocalCluster(str(tmp_path / "cluster"), name="pg", storages=storages, replicas=1,
                        partitions=partitions, adapter="PostgreSQL",
                        databases=lambda i: server.database(prefix + str(i)), **kw)


@pytest.fixture
def cluster(tmp_path, postgresql_server):
    c = pg_cluster(tmp_path, postgresql_server)
    try:
        c.start(wait=60)
        yield c
    finally:
        c.kill()


def same_replicas(cluster, names) -> None:
    """Stop the cluster: each partition's copies are identical row by row
    (read with raw SQL)."""
    grid = {line.split()[0]: line.split()[2] for line in cluster.pt_lines()[1:]}
    cluster.stop()
    contents = {n: raw_contents_postgresql(cluster.database(int(n[1:]))) for n in names}
    for p in range(cluster.partitions):
        holders = [n for n in names if grid[n][p] == "U"]
        assert len(holders) == 2, (p, grid)
        assert contents[holders[0]][p] == contents[holders[1]][p], p


def test_commit_replicate_check_pack_truncate(cluster):
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    conn = db.open()
    root = conn.root()
    for i in range(200):
        root[i] = PersistentMapping(n=i, blob=b"x" * (i * 10))
        if i % 50 == 49:
            transaction.commit()
    garbage = make_garbage(root, "garbage", 100, per_txn=50)
    pack_time = time_from_tid(u64(root._p_serial)) + 1e-6

    # a second node on a database in use is refused
    out = subprocess.run(cluster.storage_argv(1)[:-2] + ["--wait", "0"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "in use by another storage node" in out.stderr, out.stderr

    # replication to a new storage
    cluster.storage(3).start()
    wait_until(lambda: cluster.storage_state("S3") is NodeStates.PENDING, 30, "S3 pending")
    assert cluster.neoctl("add", "S3")[0] == ["Nodes added: S3"]
    cluster.neoctl("tweak")
    wait_until(lambda: all_up_to_date(cluster, {"S1", "S2", "S3"}), 60, "S3 up to date")

    # a tampered copy: found and repaired by neoctl check
    s2 = cluster.nodes["S2"]
    s2.kill()
    wait_until(lambda: cluster.storage_state("S2") is NodeStates.DOWN, 30, "S2 down")
    with psycopg.connect(cluster.database(2), autocommit=True) as pg:
        part, tid = pg.execute("SELECT partition, MIN(tid) FROM trans GROUP BY partition"
                               " ORDER BY partition LIMIT 1").fetchone()
        pg.execute("UPDATE trans SET description=%s WHERE partition=%s AND tid=%s",
                   (b"tampered", part, tid))
    s2.start()
    wait_until(lambda: all_up_to_date(cluster, {"S1", "S2", "S3"}), 60, "S2 back")
    grid = {line.split()[0]: line.split()[2] for line in cluster.pt_lines()[1:]}
    # two copies: the good one is named as the reference
    (good,) = [n for n in ("S1", "S3") if grid[n][part] == "U"]
    out = cluster.run_neoctl("check", "%d:%s" % (part, good), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "partition %d: S2 differed from %s; S2 repaired" % (part, good),
        "1 partitions checked, 1 corrupted copies found, 1 repaired"]
    out = cluster.run_neoctl("check", timeout=120)
    assert out.stdout.splitlines()[-1].endswith("0 corrupted copies found, 0 repaired")

    # pack: the unreachable objects go on every storage
    transaction.commit()
    db.pack(pack_time)
    wait_until(lambda: completed_by(cluster, ["S1", "S2", "S3"]), 60, "the pack")
    fresh = Storage(cluster.masters, cluster.name)
    try:
        assert all(gone(fresh, oid, []) for oid in garbage)
    finally:
        fresh.close()

    # truncate: back to the state after the first 100 objects
    tids = []
    for i in range(3):
        root["t"] = i
        transaction.commit()
        tids.append(db.lastTransaction())
    db.close()
    assert cluster.neoctl("truncate", "tid:%#x" % u64(tids[0]), refusal=True)[1]["ok"]
    wait_until(lambda: truncated_and_running(cluster, tids[0]), 60, "the truncation")
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    try:
        root = db.open().root()
        assert root["t"] == 0 and root[199]["n"] == 199 and "garbage" not in root
    finally:
        db.close()
    same_replicas(cluster, ["S1", "S2", "S3"])
    for i in (1, 2, 3):
        with psycopg.connect(cluster.database(i), autocommit=True) as pg:
            # no data row left behind by pack, truncate and repairs
            assert pg.execute("SELECT COUNT(*) FROM data WHERE id NOT IN (SELECT data_id"
                              " FROM obj WHERE data_id IS NOT NULL)").fetchone()[0] == 0


def test_whole_cluster_killed_while_committing(tmp_path, postgresql_server):
    cluster = pg_cluster(tmp_path, postgresql_server, partitions=12)
    try:
        cluster.start(wait=60)
        writers = crash_rounds(cluster, tmp_path, rounds=5)
        committed = check_writers(cluster, writers)
        assert all(len(revisions) > 4 for revisions in committed.values())
        same_replicas(cluster, ["S1", "S2"])
    finally:
        cluster.kill()


def test_live_import_into_postgresql(tmp_path, postgresql_server):
    """The Importer adapter writing into PostgreSQL: usable at once,
    commits while importing, SIGKILLed in the middle and resumed, then
    every record of the source and the new commits through the cluster,
    and the same database served by the PostgreSQL adapter alone."""
    fs_path = str(tmp_path / "Data.fs")
    make_filestorage(fs_path, transactions=1500, objects=100)
    source = FileStorage(fs_path, read_only=True)
    expected = transactions(source.iterator())
    dsn = postgresql_server.database("import%d" % next(_clusters))
    conf = str(tmp_path / "importer.conf")
    with open(conf, "w") as f:
        f.write(textwrap.dedent(f"""\
            [neo]
            adapter = PostgreSQL
            database = {dsn}
            rate = 500

            [root]
            storage = <filestorage>
                path {fs_path}
                read-only true
              </filestorage>
            """))
    cluster = ImportCluster(str(tmp_path / "cluster"), conf)
    storage = None
    try:
        cluster.start()
        storage = Storage(cluster.masters, cluster.name)
        assert storage.lastTransaction() == source.lastTransaction()
        oid = expected[-1][5][0][0]
        assert storage.load(oid) == source.load(oid)
        new = [commit(storage, [(oid, source.load(oid)[1], b"changed during the import")])]
        assert cluster.import_status()["state"] == "importing"
        s1 = cluster.storage(1)
        s1.signal(signal.SIGKILL)
        s1.wait(30)
        s1.start()
        cluster.wait_state("RUNNING", 60)
        done = cluster.wait_import("finished")
        assert done["imported"] == len(expected)
        assert 0 < done["transactions"] < len(expected)  # resumed, not started over
        wait_until(lambda: logged(s1, "run it with -a PostgreSQL -d 'user=postgres dbname=import"), 30,
                   "the log to name the options of the PostgreSQL backend")
        got = transactions(storage.iterator())
        assert got == expected + new
        storage.close()
        storage = None
        # the import done, the database is a PostgreSQL backend's
        s1.signal(signal.SIGTERM)
        assert s1.wait(30) == 0
        s1.argv[s1.argv.index("-a") + 1] = "PostgreSQL"
        s1.argv[s1.argv.index("-d") + 1] = dsn
        s1.start()
        cluster.wait_state("RUNNING", 60)
        storage = Storage(cluster.masters, cluster.name)
        assert storage.load(oid)[0] == b"changed during the import"
        assert len(transactions(storage.iterator())) == len(expected) + 1
    finally:
        source.close()
        if storage is not None:
            storage.close()
        cluster.kill()


def test_lost_database_connection_stops_the_storage(cluster):
    """S1's connection to PostgreSQL is killed: S1 stops at its next write
    (status 1, one log line saying why), the cluster goes on with S2, and
    S1 restarted catches up."""
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    try:
        root = db.open().root()
        root["a"] = 1
        transaction.commit()
        with psycopg.connect(cluster.database(1), autocommit=True) as pg:
            killed = pg.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                " WHERE datname=current_database() AND pid<>pg_backend_pid()"
                                ).fetchall()
        assert killed == [(True,)]
        s1 = cluster.nodes["S1"]
        for i in range(5):
            root["a"] = 2 + i
            transaction.commit()   # S2 has every partition: commits go on
        assert s1.wait(30) == 1
        with open(s1.logfile, "rb") as f:
            f.seek(s1.log_offset)
            log = f.read().decode()
        assert "database error (AdminShutdown: terminating connection" in log, log[-2000:]
        assert "stopping, the database is in an unknown state" in log
        s1.start()
        wait_until(lambda: all_up_to_date(cluster, {"S1", "S2"}), 60, "S1 back up to date")
        root["a"] = "after"
        transaction.commit()
    finally:
        db.close()
    same_replicas(cluster, ["S1", "S2"])


def test_neosimple_with_a_postgresql_server_of_its_own(tmp_path):
    """``neosimple --adapter PostgreSQL``: a cluster usable at once on a
    server it started, which it stops with the cluster (Ctrl-C)."""
    import os
    import re
    env = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, "-m", "neozodb.cli.simple", "--adapter", "PostgreSQL",
         "--storages", "2", "--partitions", "6", str(tmp_path / "simple")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C" in line:
                break
        uri = re.search(r"connect with: neo://(\S+)@(\S+)", "".join(lines))
        assert uri, lines
        db = ZODB.DB(Storage(uri.group(2), uri.group(1)))
        try:
            root = db.open().root()
            root["x"] = "on PostgreSQL"
            transaction.commit()
        finally:
            db.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert "stopping..." in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    files = (tmp_path / "simple" / "server" / "postgresql-files")
    where = files.read_text().strip() if files.exists() else str(tmp_path / "simple" / "server")
    # the server is gone: no postmaster.pid left (as root, no files at all)
    assert not os.path.exists(os.path.join(where, "data", "postmaster.pid"))


class PostgreSQLBlobs(BlobSQL):
    BLOBS = ("SELECT o.partition, d.hash, b.blob_id FROM obj o JOIN data d ON d.id = o.data_id"
             " JOIN data_blob b ON b.data_id = d.id")
    CHUNKS = "SELECT bytes FROM blob_chunk WHERE blob_id=%s ORDER BY n"
    CHUNK_ROWS = "SELECT COUNT(*) FROM blob_chunk"
    CHUNK_OF = ("SELECT c.blob_id, c.bytes FROM obj o JOIN data_blob b ON b.data_id = o.data_id"
                " JOIN blob_chunk c ON c.blob_id = b.blob_id WHERE o.partition=%s AND c.n=%s")
    ALTER_CHUNK = "UPDATE blob_chunk SET bytes=%s WHERE blob_id=%s AND n=%s"

    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self.sqlite = 3

    def rows(self, i: int, what: str, *params) -> list[tuple]:
        with psycopg.connect(self.cluster.database(i), autocommit=True) as pg:
            cur = pg.execute(getattr(self, what), params or None)
            return cur.fetchall() if cur.description else []


def test_blobs(cluster, tmp_path):
    blob_scenario(cluster, tmp_path, PostgreSQLBlobs(cluster))
