"""Blobs on a cluster whose storages run a server backend (PostgreSQL or
MariaDB): the scenario tests/cluster/test_postgresql_cluster.py and
test_mariadb_cluster.py run, each with the SQL of its backend
(``BlobSQL``) to look at the storages' tables directly."""
from __future__ import annotations

import hashlib
import os
import signal
import sqlite3

import transaction
import ZODB
from ZODB.blob import Blob
from ZODB.serialize import referencesf
from ZODB.TimeStamp import TimeStamp

from neozodb.cli.cluster import wait_until
from neozodb.client import Storage
from neozodb.protocol import NodeStates, u64
from neozodb.protocol.blobs import CHUNK

# SQLite's tables, for the SQLite storage that joins the cluster
SQLITE_BLOBS = ("SELECT o.partition, d.hash, b.blob_id FROM obj o JOIN data d ON d.id = o.data_id"
                " JOIN data_blob b ON b.data_id = d.id")
SQLITE_CHUNKS = "SELECT bytes FROM blob_chunk WHERE blob_id=? ORDER BY n"


class BlobSQL:
    """How a test reads and alters a storage's blob tables: ``rows(i,
    what, *params)`` runs one of the statements below (by name) on storage
    i's database and returns its rows; ``sqlite`` is the storage number
    that runs on SQLite instead."""

    sqlite: int | None = None
    #: (partition, data hash, blob id) of every attached content
    BLOBS: str
    #: a content's chunks in order, by blob id
    CHUNKS: str
    #: how many chunk rows there are
    CHUNK_ROWS: str
    #: (blob id, bytes) of chunk n of the content in a partition (partition, n)
    CHUNK_OF: str
    #: (bytes, blob id, n): that chunk altered
    ALTER_CHUNK: str

    def rows(self, i: int, what: str, *params) -> list[tuple]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _rows(self, cluster, i: int, what: str, *params) -> list[tuple]:
        if i == self.sqlite:
            path = "file:%s?mode=ro" % sqlite_path(cluster, i)
            conn = sqlite3.connect(path, uri=True)
            try:
                sql = {"BLOBS": SQLITE_BLOBS, "CHUNKS": SQLITE_CHUNKS}[what]
                return conn.execute(sql, params).fetchall()
            finally:
                conn.close()
        return self.rows(i, what, *params)

    def contents(self, cluster, i: int) -> dict[int, dict[bytes, tuple[int, bytes]]]:
        """partition -> {data hash: (size, SHA-256 of its chunks in order)}."""
        found: dict[int, dict[bytes, tuple[int, bytes]]] = {}
        for partition, data_hash, blob_id in self._rows(cluster, i, "BLOBS"):
            hasher = hashlib.sha256()
            size = 0
            for (chunk,) in self._rows(cluster, i, "CHUNKS", blob_id):
                hasher.update(chunk)
                size += len(chunk)
            found.setdefault(partition, {})[bytes(data_hash)] = (size, hasher.digest())
        return found


def sqlite_path(cluster, i: int) -> str:
    return os.path.join(cluster.directory, "storage%d.sqlite" % i)


def on_sqlite(cluster, i: int) -> None:
    """Storage i of ``cluster`` runs the SQLite backend (the others keep
    theirs)."""
    argv_of = cluster.storage_argv

    def argv(j: int) -> list[str]:
        argv = argv_of(j)
        if j == i:
            k = argv.index("-a")
            argv[k + 1:k + 4] = ["SQLite", "-d", sqlite_path(cluster, i)]
        return argv
    cluster.storage_argv = argv


def up_to_date(cluster, names) -> bool:
    lines = cluster.pt_lines()[1:]
    return {line.split()[0] for line in lines} == set(names) and all(
        set(line.split()[2]) <= {"U", "."} for line in lines)


def read(blob: Blob) -> bytes:
    with blob.open("r") as f:
        return f.read()


def blob_db(cluster, directory):
    return ZODB.DB(Storage(blob_dir=str(directory), **cluster.client_kwargs()))


def same_copies(cluster, sql: BlobSQL, names) -> dict[str, dict]:
    """Each partition's two copies hold the same contents (raw SQL);
    every storage's contents by name."""
    grid = cluster.cells()
    found = {n: sql.contents(cluster, int(n[1:])) for n in names}
    for p in range(cluster.partitions):
        holders = [n for n in names if grid[n][p] == "U"]
        assert len(holders) == 2, (p, grid)
        assert found[holders[0]].get(p) == found[holders[1]].get(p), (p, holders)
    return found


def blob_scenario(cluster, tmp_path, sql: BlobSQL) -> None:
    """Two storages of the backend (replicas 1): blobs committed and read
    back through a client with an empty blob directory; a third storage,
    on SQLite, replicating them; a pack with GC removing an unreachable
    content from every storage; a chunk altered on one of the backend's
    storages found by ``neoctl check`` and repaired from a copy on the
    other backend (SQLite), or from the other storage of the backend where
    SQLite holds no copy of a blob."""
    contents = {"small": b"a small file", "empty": b"",
                "big": os.urandom(3 * CHUNK + 7),      # four chunks
                "dropped": os.urandom(CHUNK + 1)}
    db = blob_db(cluster, tmp_path / "blobs1")
    root = db.open().root()
    for name, content in contents.items():
        root[name] = Blob(content)
    transaction.commit()
    big, small = (u64(root[name]._p_oid) for name in ("big", "small"))
    db.close()

    db = blob_db(cluster, tmp_path / "blobs2")      # nothing cached
    try:
        root = db.open().root()
        for name, content in contents.items():
            assert read(root[name]) == content, name
    finally:
        db.close()

    # a new storage, on SQLite, replicates from the backend's
    on_sqlite(cluster, 3)
    cluster.storage(3).start()
    wait_until(lambda: cluster.storage_state("S3") is NodeStates.PENDING, 30, "S3 pending")
    cluster.neoctl("add", "S3")
    cluster.neoctl("tweak")
    names = ("S1", "S2", "S3")
    wait_until(lambda: up_to_date(cluster, names), 60, "S3 up to date")
    found = same_copies(cluster, sql, names)
    digests = {digest for stored in found.values() for c in stored.values()
               for _, digest in c.values()}
    assert {hashlib.sha256(c).digest() for c in contents.values()} <= digests
    assert any(found["S3"].values())

    # pack with GC: the content nothing reaches goes from every storage
    db = blob_db(cluster, tmp_path / "blobs3")
    try:
        root = db.open().root()
        del root["dropped"]
        transaction.commit()
        db.storage.pack(TimeStamp(db.lastTransaction()).timeTime() + 1e-3, referencesf,
                        gc=True)
    finally:
        db.close()
    dropped = hashlib.sha256(contents["dropped"]).digest()

    def gone() -> bool:
        return all(dropped not in {d for c in sql.contents(cluster, i).values()
                                   for _, d in c.values()} for i in (1, 2, 3))
    wait_until(gone, 30, "the pack to remove the unreachable content")
    for i in (1, 2):
        # no chunk left behind: the rows are those of the attached contents
        attached = {h: size for c in sql.contents(cluster, i).values()
                    for h, (size, _) in c.items()}
        expected = sum(max(1, -(-size // CHUNK)) for size in attached.values())
        assert sql.rows(i, "CHUNK_ROWS") == [(expected,)], "chunks left on S%d" % i

    # a chunk altered on one of the backend's copies: of "big" (its second
    # chunk), or of "small" if only then the other copy is on SQLite
    grid = cluster.cells()

    def holders_of(oid: int) -> list[str]:
        return [h for h in names if grid[h][oid % cluster.partitions] == "U"]
    choices = [("big", big, 1), ("small", small, 0)]
    name, oid, n = next((c for c in choices if "S3" in holders_of(c[1])), choices[0])
    part, holders = oid % cluster.partitions, holders_of(oid)
    victim = [h for h in holders if h != "S3"][0]
    (good,) = [h for h in holders if h != victim]
    node = cluster.nodes[victim]
    node.signal(signal.SIGTERM)         # a clean stop: what it has is committed
    assert node.wait(30) is not None
    vi = int(victim[1:])
    (blob_id, chunk), = sql.rows(vi, "CHUNK_OF", part, n)
    sql.rows(vi, "ALTER_CHUNK", bytes([chunk[0] ^ 1]) + bytes(chunk[1:]), blob_id, n)
    before = sql.contents(cluster, vi)[part]
    node.start()
    wait_until(lambda: cluster.storage_state(victim) is NodeStates.RUNNING
               and up_to_date(cluster, names), 30, "%s back" % victim)
    assert before != sql.contents(cluster, int(good[1:]))[part]
    out = cluster.run_neoctl("check", "%d:%s" % (part, good), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "partition %d: %s differed from %s; %s repaired" % (part, victim, good, victim),
        "1 partitions checked, 1 corrupted copies found, 1 repaired"], out.stdout
    wait_until(lambda: up_to_date(cluster, names)
               and sql.contents(cluster, vi).get(part)
               == sql.contents(cluster, int(good[1:])).get(part), 60,
               "%s's copy repaired" % victim)
    db = blob_db(cluster, tmp_path / "blobs4")
    try:
        assert read(db.open().root()[name]) == contents[name]
    finally:
        db.close()
