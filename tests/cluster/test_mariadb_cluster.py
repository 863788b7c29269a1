"""A cluster whose storages run the MariaDB backend, on a throw-away MariaDB
server: commits, replication to a new storage, neoctl check and repair,
pack, truncate, a storage killed (SIGKILL) under write load, a
FileStorage's history imported into it, and blobs (stored, replicated to
and from SQLite, garbage-collected, checked and repaired)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import transaction
import ZODB
from blob_backends import BlobSQL, blob_scenario
from persistent.mapping import PersistentMapping

from fsdata import make_filestorage, transactions
from neozodb.cli.cluster import LocalCluster, wait_until
from neozodb.client import Storage
from neozodb.protocol import NodeStates, u64
from writers import Writers

mariadb = pytest.importorskip("mariadb")
if not os.path.exists("/usr/sbin/mariadbd") and not shutil.which("mariadbd"):
    pytest.skip("no MariaDB server here (apt-get install mariadb-server)",
                allow_module_level=True)

from neozodb.throwaway import mariadb as throwaway  # noqa: E402

pytestmark = pytest.mark.timeout(240)

PARTITIONS = 6


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from mdbserver import server_fixture
    yield from server_fixture(tmp_path_factory)


@pytest.fixture
def cluster(server, tmp_path, request):
    prefix = request.node.name.replace("test_", "")[:20]
    c = LocalCluster(str(tmp_path / "cluster"), name="maria", storages=2, replicas=1,
                     partitions=PARTITIONS, adapter="MariaDB",
                     databases=lambda i: server.database("%s_s%d" % (prefix, i)))
    c.db_name = lambda i: "%s_s%d" % (prefix, i)
    try:
        c.start(wait=60)
        yield c
    finally:
        c.kill()


def query(server, database: str, sql: str, params=()) -> list[tuple]:
    conn = mariadb.connect(user="root", unix_socket=server.socket, database=database,
                           autocommit=True)
    try:
        cur = conn.cursor()
        # a row the storage node has locked is not waited for long
        cur.execute("SET SESSION innodb_lock_wait_timeout=10")
        cur.execute(sql, params)
        return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def contents(server, database: str) -> tuple[dict, dict]:
    """Committed transactions and object revisions (data by content), read
    with raw SQL: replicas compare on this, not through the backend."""
    trans = {row[0]: tuple(row[1:]) for row in query(
        server, database, "SELECT tid, oids, user, description, ext, packed, ttid FROM trans")}
    objs = {(tid, oid): rest for tid, oid, *rest in query(
        server, database, "SELECT o.tid, o.oid, o.value_tid, d.hash, d.compression, d.value"
        " FROM obj o LEFT JOIN data d ON d.id = o.data_id")}
    return trans, objs


def up_to_date(cluster, names) -> bool:
    lines = cluster.pt_lines()[1:]
    return len(lines) == len(names) and all(
        line.split()[0] in names and set(line.split()[2]) <= {"U", "."} for line in lines)


def test_commit_replicate_check_pack_truncate(server, cluster):
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    conn = db.open()
    root = conn.root()
    for i in range(20):
        root[i] = PersistentMapping(n=i, payload=b"x" * (100 * i))
        transaction.commit()
    garbage = root[0]._p_oid
    del root[0]
    transaction.commit()
    truncate_at = db.lastTransaction()
    root["late"] = "after the truncation point"
    transaction.commit()

    # commits are in both databases, NEO's schema
    s1, s2 = contents(server, cluster.db_name(1)), contents(server, cluster.db_name(2))
    assert s1 == s2 and len(s1[0]) >= 22

    # replication to a new storage
    cluster.storage(3).start()
    wait_until(lambda: cluster.storage_state("S3") is NodeStates.PENDING, 30, "S3 pending")
    cluster.neoctl("add", "S3")
    cluster.neoctl("tweak")
    wait_until(lambda: up_to_date(cluster, {"S1", "S2", "S3"}), 60, "S3 up to date")
    s3 = contents(server, cluster.db_name(3))
    assert s3[1] and set(s3[1]) <= set(s1[1])

    # check: a tampered transaction on S2 is found and repaired
    # a partition S2 holds that has transactions (one may have none: the
    # TIDs of a few commits fall in partitions at random)
    cells = cluster.cells()["S2"]
    firsts = query(server, cluster.db_name(2),
                   "SELECT `partition`, MIN(tid) FROM trans GROUP BY `partition`")
    part, tid = next((p, t) for p, t in sorted(firsts) if cells[p] == "U")
    query(server, cluster.db_name(2),
          "UPDATE trans SET description=? WHERE `partition`=? AND tid=?", (b"tampered", part, tid))
    out = cluster.run_neoctl("check", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "partition %d: copies on" % part in out.stdout and "differ" in out.stdout, out.stdout
    # two copies: the reference is named
    ref, = [n for n, cells in cluster.cells().items() if n != "S2" and cells[part] == "U"]
    out = cluster.run_neoctl("check", "%d:%s" % (part, ref), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "partition %d: S2 differed from %s; S2 repaired" % (part, ref) in out.stdout, \
        out.stdout
    wait_until(lambda: up_to_date(cluster, {"S1", "S2", "S3"}), 60, "S2 repaired")
    assert query(server, cluster.db_name(2), "SELECT description FROM trans"
                 " WHERE `partition`=? AND tid=?", (part, tid))[0][0] != b"tampered"

    # truncate: the last transaction goes
    db.close()
    cluster.neoctl("truncate", "tid:%#x" % u64(truncate_at))

    def truncated():
        if cluster.cluster_state() != "RUNNING":
            return False
        return cluster.neoctl("print", "ids")[1]["last_tid"] == u64(truncate_at)
    wait_until(truncated, 60, "the truncation")
    for i in (1, 2, 3):
        assert query(server, cluster.db_name(i), "SELECT MAX(tid) FROM trans")[0][0] <= \
            u64(truncate_at)

    # pack: the unreachable object goes from every storage
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    db.pack()

    def packed():
        return all(not query(server, cluster.db_name(i), "SELECT 1 FROM obj WHERE oid=?",
                             (u64(garbage),))
                   for i in (1, 2, 3))
    wait_until(packed, 60, "the pack on every storage")
    try:
        root = db.open().root()
        assert "late" not in root and root[19]["n"] == 19 and 0 not in root
    finally:
        db.close()


def test_storage_killed_under_write_load(server, cluster, tmp_path):
    writers = Writers(cluster, tmp_path)
    try:
        wait_until(lambda: all(c >= 10 for c in writers.counts()), 60, "first commits")
        for _ in range(2):  # crash rounds
            cluster.nodes["S1"].kill()
            wait_until(lambda: cluster.storage_state("S1") is NodeStates.DOWN, 30, "S1 down")
            wait_until(writers.more(10), 60, "commits without S1")
            cluster.nodes["S1"].start()
            wait_until(lambda: up_to_date(cluster, {"S1", "S2"}), 60, "S1 up to date")
            wait_until(writers.more(5), 60, "commits after S1 returned")
    finally:
        counts = writers.stop()
    writers.check()
    cluster.stop()
    s1, s2 = contents(server, cluster.db_name(1)), contents(server, cluster.db_name(2))
    assert len(s1[1]) > sum(counts)
    assert s1 == s2


def test_import_filestorage(server, cluster, tmp_path):
    from ZODB.FileStorage import FileStorage
    source_path = str(tmp_path / "source.fs")
    made = make_filestorage(source_path, transactions=300, objects=60)
    assert made["undos"] and made["deletions"], made
    done = subprocess.run([sys.executable, "-m", "neozodb.cli.migrate", "-c", cluster.name,
                           source_path, cluster.masters],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    source = FileStorage(source_path, read_only=True)
    storage = Storage(cluster.masters, cluster.name)
    try:
        expected = transactions(source.iterator())
        assert transactions(storage.iterator()) == expected
    finally:
        storage.close()
        source.close()
    cluster.stop()     # unlocks reach the databases
    s1, s2 = contents(server, cluster.db_name(1)), contents(server, cluster.db_name(2))
    assert s1 == s2 and len(s1[0]) == len(expected)


def test_database_connection_and_server_lost_under_write_load(tmp_path):
    """A storage whose database connection is killed stops (or goes on if
    nothing was pending); the server itself SIGKILLed stops every storage;
    restarted, nothing acknowledged is lost and the replicas agree."""
    srv = throwaway.start(str(tmp_path / "server"))
    c = LocalCluster(str(tmp_path / "cluster"), name="maria", storages=2, replicas=1,
                     partitions=PARTITIONS, adapter="MariaDB",
                     databases=lambda i: srv.database("lost_s%d" % i))
    try:
        c.start(wait=60)
        writers = Writers(c, tmp_path, retry=True)
        try:
            wait_until(lambda: all(n >= 10 for n in writers.counts()), 60, "first commits")
            # S1's connection killed by the server
            conn_id, = query(srv, "lost_s1", "SELECT id FROM information_schema.processlist"
                             " WHERE db='lost_s1' AND id<>CONNECTION_ID()")[0]
            query(srv, "lost_s1", "KILL ?", (conn_id,))
            wait_until(writers.more(10), 60, "commits after S1's connection was killed")
            if not c.nodes["S1"].running:
                assert c.nodes["S1"].proc.returncode != 0
                c.nodes["S1"].start()
            wait_until(lambda: up_to_date(c, {"S1", "S2"}), 60, "S1 up to date")
            # the whole server killed: every storage stops
            srv._proc.kill()
            srv._proc.wait(30)
            for name in ("S1", "S2"):
                wait_until(lambda name=name: not c.nodes[name].running, 60, name + " stopped")
                assert c.nodes[name].proc.returncode != 0
            srv.start()                     # InnoDB recovers its files
            for name in ("S1", "S2"):
                c.nodes[name].start()
            c.wait_state("RUNNING", 90)
            wait_until(writers.more(10), 90, "commits after the server came back")
        finally:
            writers.stop()
        writers.check()
        c.stop()
        s1, s2 = contents(srv, "lost_s1"), contents(srv, "lost_s2")
        assert s1 == s2 and len(s1[0]) > sum(writers.counts())
    finally:
        c.kill()
        srv.stop()


def test_neosimple_starts_and_stops_its_server(tmp_path):
    """neosimple --adapter MariaDB: a server of its own for the storages,
    stopped with the cluster."""
    import signal

    import zodburi
    directory = tmp_path / "c"
    proc = subprocess.Popen([sys.executable, "-m", "neozodb.cli.simple", "--adapter", "MariaDB",
                             "--partitions", "2", str(directory)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:  # ends when the cluster runs, or neosimple exits
            lines.append(line)
            if line.startswith("logs and databases"):
                break
        uri = next(x.split(": ", 1)[1].strip() for x in lines if x.startswith("connect with"))
        factory, dbkw = zodburi.resolve_uri(uri)
        db = ZODB.DB(factory(), **dbkw)
        try:
            with db.transaction() as conn:
                conn.root()["simple"] = "mariadb"
        finally:
            db.close()
        assert "MariaDB" in (directory / "S1.log").read_text()
        pid = int((directory / "server" / "mariadbd.pid").read_text())
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    assert not os.path.exists("/proc/%d" % pid) or \
        open("/proc/%d/cmdline" % pid, "rb").read().find(b"mariadbd") < 0
    assert not (directory / "server" / "data").exists()


class SQLiteAndMariaDB(LocalCluster):
    """S1 on SQLite, the other storages on the MariaDB server."""

    def storage_argv(self, i: int) -> list[str]:
        argv = super().storage_argv(i)
        if i == 1:
            at = argv.index("-a")
            argv[at + 1:at + 4] = ["SQLite", "-d", os.path.join(self.directory, "s1.sqlite")]
        return argv


def test_sqlite_and_mariadb_replicas_agree(server, tmp_path):
    """One replica on each backend: replication both ways, and neoctl check
    finds them equal (the digests are the same on every backend)."""
    c = SQLiteAndMariaDB(str(tmp_path / "cluster"), name="mixed", storages=2, replicas=1,
                         partitions=PARTITIONS, adapter="MariaDB",
                         databases=lambda i: server.database("mixed_s%d" % i))
    try:
        c.start(wait=60)
        assert "-a SQLite" in " ".join(c.nodes["S1"].argv)
        db = ZODB.DB(Storage(c.masters, c.name))
        try:
            for victim in ("S1", "S2"):
                c.nodes[victim].kill()
                wait_until(lambda v=victim: c.storage_state(v) is NodeStates.DOWN, 30,
                           victim + " down")
                with db.transaction() as conn:
                    root = conn.root()
                    for i in range(30):
                        root["%s%d" % (victim, i)] = PersistentMapping(v=os.urandom(200))
                c.nodes[victim].start()
                wait_until(lambda: up_to_date(c, {"S1", "S2"}), 60, victim + " up to date")
        finally:
            db.close()
        out = c.run_neoctl("check", timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines()[-1] == \
            "%d partitions checked, 0 corrupted copies found, 0 repaired" % PARTITIONS, out.stdout
        assert all(": ok: S1 S2 agree" in line for line in out.stdout.splitlines()[:-1])
    finally:
        c.kill()


class MariaDBBlobs(BlobSQL):
    BLOBS = ("SELECT o.`partition`, d.hash, b.blob_id FROM obj o JOIN data d ON d.id = o.data_id"
             " JOIN neozodb_data_blob b ON b.data_id = d.id")
    CHUNKS = "SELECT bytes FROM neozodb_blob_chunk WHERE blob_id=? ORDER BY n"
    CHUNK_ROWS = "SELECT COUNT(*) FROM neozodb_blob_chunk"
    CHUNK_OF = ("SELECT c.blob_id, c.bytes FROM obj o"
                " JOIN neozodb_data_blob b ON b.data_id = o.data_id"
                " JOIN neozodb_blob_chunk c ON c.blob_id = b.blob_id"
                " WHERE o.`partition`=? AND c.n=?")
    ALTER_CHUNK = "UPDATE neozodb_blob_chunk SET bytes=? WHERE blob_id=? AND n=?"

    def __init__(self, server, cluster) -> None:
        self.server = server
        self.cluster = cluster
        self.sqlite = 3

    def rows(self, i: int, what: str, *params) -> list[tuple]:
        return query(self.server, self.cluster.db_name(i), getattr(self, what), params)


def test_blobs(server, cluster, tmp_path):
    blob_scenario(cluster, tmp_path, MariaDBBlobs(server, cluster))
    # in the column, the blob flag is 0x40 (0x80 is NEO's bigdata)
    for i in (1, 2):
        assert {row[0] for row in query(server, cluster.db_name(i), "SELECT DISTINCT"
                                        " compression FROM data")} <= {0, 1, 0x40, 0x41}
    # "empty", "small" and "big": at most one of a content's copies is on SQLite
    assert sum(query(server, cluster.db_name(i), "SELECT COUNT(*) FROM data"
                     " WHERE compression & 64")[0][0] for i in (1, 2)) >= 3
