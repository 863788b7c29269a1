"""neomigrate and restore on real clusters: a FileStorage with a few
hundred transactions (undos and redos, back-pointer chains, undone
creations, deletions, conflict-resolved BTree changes, extension data) is
copied into a fresh cluster, the cluster gets more commits, then it is
copied into a new FileStorage; each copy is compared record by record."""
from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import sys

import pytest
import transaction
import ZODB
from BTrees.Length import Length
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping
from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileStorage
from ZODB.POSException import StorageTransactionError
from ZODB.utils import load_current, p64, u64

from fsdata import records
from neozodb.cli.cluster import LocalCluster, wait_until
from neozodb.client import Storage

pytestmark = pytest.mark.timeout(240)


def neomigrate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neozodb.cli.migrate", *args],
                          capture_output=True, text=True, timeout=180)


def commit(tm, user: str = "", note: str = "", **extension) -> None:
    txn = tm.get()
    if user:
        txn.setUser(user)
    if note:
        txn.note(note)
    for key, value in extension.items():
        txn.setExtendedInfo(key, value)
    tm.commit()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _log(db, prefix: str, count: int = 40) -> list[bytes]:
    """Ids of the last transactions whose description starts with prefix."""
    return [d["id"] for d in db.undoLog(0, count) if _text(d["description"]).startswith(prefix)]


ROUNDS = 60


def generate(path: str) -> dict:
    """A FileStorage whose history has every kind of record; returns what
    was made, for the checks."""
    rnd = random.Random(5)
    fs = FileStorage(path, create=True)
    db = ZODB.DB(fs)
    made = {"undos": 0, "redos": 0, "creations_undone": 0, "deleted": 0, "resolved": 0}
    tm1, tm2 = transaction.TransactionManager(), transaction.TransactionManager()
    c1, c2 = db.open(tm1), db.open(tm2)
    root = c1.root()
    root["trees"] = PersistentMapping()
    root["count"] = Length()
    root["items"] = PersistentMapping()
    commit(tm1, "setup", "initial objects", origin="test_migrate")
    for i in range(ROUNDS):
        items = root["items"]
        # plain changes, with user, description and extension data
        for j in range(3):
            items["k%d" % rnd.randrange(40)] = PersistentMapping(value=(i, j))
            commit(tm1, "user%d" % (i % 3), "round %d change %d" % (i, j), round=i, step=j,
                   tags=["a", "b"] if j else None)
        # two connections change the same BTree (20 keys at most: one
        # bucket, never split) and counter: the second commit is resolved
        # by the BTree and Length resolvers
        if i % 10 == 0:
            root["trees"][i // 10] = OOBTree()
            commit(tm1, note="new tree")
        tm2.begin()
        root2 = c2.root()
        root["trees"][i // 10]["x%03d" % i] = i
        root["count"].change(1)
        root2["trees"][i // 10]["y%03d" % i] = -i
        root2["count"].change(2)
        commit(tm1, note="tree x%d" % i)
        commit(tm2, note="tree y%d (resolved)" % i)
        made["resolved"] += 1
        if i % 5 == 1:
            # undo the last plain change, then redo it (undo the undo):
            # the redo points back to the undo's back-pointer (a chain)
            db.undo(_log(db, "round")[0], tm1.get())
            commit(tm1, note="undo")
            made["undos"] += 1
            db.undo(_log(db, "undo")[0], tm1.get())
            commit(tm1, note="redo")
            made["redos"] += 1
        if i % 7 == 3:
            # an object created then its creation undone (a None record)
            items["ghost%d" % i] = PersistentMapping(ghost=i)
            commit(tm1, note="ghost %d" % i)
            db.undo(_log(db, "ghost")[0], tm1.get())
            commit(tm1, note="undo ghost %d" % i)
            made["creations_undone"] += 1
        if i % 11 == 5:
            # external GC: an object dropped from the root, then deleted
            victim = items.pop("k%d" % rnd.randrange(40), None)
            if victim is not None:
                commit(tm1, note="drop")
                oid = victim._p_oid
                serial = load_current(fs, oid)[1]
                txn = TransactionMetaData(b"gc", b"deleteObject", {"gc": True})
                fs.tpc_begin(txn)
                fs.deleteObject(oid, serial, txn)
                fs.tpc_vote(txn)
                fs.tpc_finish(txn)
                made["deleted"] += 1
    # undoMultiple of two transactions that changed the same objects: the
    # FileStorage keeps two records of each in one transaction (the last one
    # is the state), a cluster only the last
    db.undoMultiple(_log(db, "tree x")[:2], tm1.get())
    commit(tm1, note="undo multiple")
    c1.close()
    c2.close()
    db.close()
    return made


def obj_rows(cluster, i: int) -> list[tuple]:
    """(oid, tid, value_tid, data hash) of every revision on storage i."""
    path = os.path.join(cluster.directory, "storage%d.sqlite" % i)
    conn = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    try:
        return conn.execute("SELECT o.oid, o.tid, o.value_tid, d.hash FROM obj o"
                            " LEFT JOIN data d ON d.id = o.data_id ORDER BY o.oid, o.tid").fetchall()
    finally:
        conn.close()


def last_per_oid(recs: list[tuple]) -> list[tuple]:
    """One record per oid, the last one, where the oid first came: what a
    cluster keeps of a transaction that stored an object twice."""
    kept: dict[bytes, tuple] = {}
    for rec in recs:
        kept[rec[0]] = rec
    return list(kept.values())


def compare(source, destination, normalize=lambda recs: recs) -> tuple[int, int]:
    """Every transaction and record of source and destination is the same;
    returns (transactions, records)."""
    transactions = count = 0
    it1, it2 = source.iterator(), destination.iterator()
    for t1, t2 in zip(it1, it2, strict=True):
        meta1 = (t1.tid, t1.status, t1.user, t1.description, t1.extension, t1.extension_bytes)
        meta2 = (t2.tid, t2.status, t2.user, t2.description, t2.extension, t2.extension_bytes)
        assert meta1 == meta2
        r1, r2 = normalize(records(t1)), records(t2)
        assert r1 == r2, t1.tid.hex()
        transactions += 1
        count += len(r2)
    return transactions, count


@pytest.fixture
def cluster_factory(tmp_path):
    clusters = []

    def make(name: str) -> LocalCluster:
        cluster = LocalCluster(str(tmp_path / name), name=name, storages=2, replicas=1,
                               partitions=12)
        clusters.append(cluster)
        cluster.start(wait=60)
        return cluster
    yield make
    for cluster in clusters:
        cluster.kill()


def test_filestorage_to_cluster_and_back(tmp_path, cluster_factory):
    source_path = str(tmp_path / "source.fs")
    made = generate(source_path)
    assert all(made.values()), made
    cluster = cluster_factory("migrated")

    result = neomigrate("-c", cluster.name, source_path, cluster.masters)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("neomigrate: copied ")

    source = FileStorage(source_path, read_only=True)
    storage = Storage(cluster.masters, cluster.name)
    try:
        # the undoMultiple transaction has two records of one object
        transactions, count = compare(source, storage, last_per_oid)
        assert transactions > 300 and count > 600
        kinds = {"chain": 0, "back": 0, "none": 0}
        for txn in storage.iterator():
            for rec in txn:
                if rec.data is None:
                    kinds["none"] += 1
                elif rec.data_txn is not None:
                    kinds["back"] += 1
                    target = next(iter(storage.iterator(rec.data_txn, rec.data_txn)))
                    if any(r.oid == rec.oid and r.data_txn for r in target):
                        kinds["chain"] += 1
        assert all(kinds.values()), kinds
        assert source.lastTransaction() == storage.lastTransaction()
        # both replicas hold the same records, back-pointers included (the
        # last unlock reaches the files within a second)
        wait_until(lambda: all(len(obj_rows(cluster, i)) == count for i in (1, 2)), 30,
                   "every record in both SQLite files")
        assert obj_rows(cluster, 1) == obj_rows(cluster, 2)
        # the application sees the same state
        db = ZODB.DB(storage)
        try:
            with db.transaction() as conn:
                root = conn.root()
                keys = [k for tree in root["trees"].values() for k in tree]
                assert len(keys) == 2 * ROUNDS - 2  # two "x" keys undone by undoMultiple
                assert root["count"]() == 3 * ROUNDS - 2
                # more commits on the cluster, after the copied history
                for i in range(5):
                    with db.transaction(note="after migration %d" % i) as conn2:
                        conn2.root()["items"]["new%d" % i] = PersistentMapping(n=i)
                        conn2.root()["trees"][0]["z%d" % i] = i
        finally:
            db.close()  # closes the storage
    finally:
        source.close()

    # back to a new FileStorage: every record as the cluster has it
    back_path = str(tmp_path / "back.fs")
    result = neomigrate("-c", cluster.name, "-q", cluster.masters, back_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # -q: no progress
    storage = Storage(cluster.masters, cluster.name, read_only=True)
    back = FileStorage(back_path, read_only=True)
    try:
        transactions2, count2 = compare(storage, back)
        assert transactions2 == transactions + 5
        assert count2 > count
    finally:
        back.close()
        storage.close()

    # more commits, then only they are copied with --incremental
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    try:
        for i in range(3):
            with db.transaction(note="later %d" % i) as conn:
                conn.root()["items"]["later%d" % i] = PersistentMapping(n=i)
    finally:
        db.close()
    refused = neomigrate("-c", cluster.name, "-q", cluster.masters, back_path)
    assert refused.returncode == 1 and "not empty" in refused.stderr
    result = neomigrate("-c", cluster.name, "-q", "--incremental", cluster.masters, back_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("neomigrate: copied 3 transactions, ")
    storage = Storage(cluster.masters, cluster.name, read_only=True)
    back = FileStorage(back_path, read_only=True)
    try:
        assert compare(storage, back)[0] == transactions2 + 3
    finally:
        back.close()
        storage.close()
    result = neomigrate("-c", cluster.name, "--incremental", cluster.masters, back_path)
    assert result.returncode == 0 and "nothing to copy" in result.stdout
    # the destination's last transaction must be one of the source
    result = neomigrate("-c", cluster.name, "--incremental", back_path, cluster.masters)
    assert result.returncode == 0 and "nothing to copy" in result.stdout
    result = neomigrate("-c", cluster.name, "--incremental", source_path, cluster.masters)
    assert result.returncode == 1 and "is not a transaction of the source" in result.stderr


def test_restore_refuses_old_tid_and_neomigrate_bad_input(tmp_path, cluster_factory):
    older = str(tmp_path / "older.fs")
    ZODB.DB(FileStorage(older, create=True)).close()
    cluster = cluster_factory("target")
    storage = Storage(cluster.masters, cluster.name)
    try:
        db = ZODB.DB(storage)
        with db.transaction() as conn:
            conn.root()["x"] = 1
        last = storage.lastTransaction()
        for tid in (last, p64(u64(last) - 1)):
            txn = TransactionMetaData()
            with pytest.raises(StorageTransactionError,
                               match="is not greater than the last TID of the cluster"):
                storage.tpc_begin(txn, tid)
        # a greater one is fine, and a restore is no store: no conflict
        # check (the record is based on no serial at all)
        oid = p64(0)
        data, serial = storage.load(oid)
        txn = TransactionMetaData(b"me", b"restored")
        imposed = p64(u64(last) + 10)
        storage.tpc_begin(txn, imposed)
        storage.restore(oid, imposed, data, "", None, txn)
        storage.tpc_vote(txn)
        assert storage.tpc_finish(txn) == imposed
        assert storage.load(oid) == (data, imposed)
        db.close()
    finally:
        storage.close()

    source = str(tmp_path / "newer.fs")
    ZODB.DB(FileStorage(source, create=True)).close()

    def one_line(result, status):
        assert result.returncode == status, result
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("neomigrate: error: "), result.stderr
        return lines[0]

    # bad arguments: status 2
    assert "no such FileStorage" in one_line(
        neomigrate("-c", cluster.name, str(tmp_path / "missing.fs"), cluster.masters), 2)
    assert "bad port" in one_line(neomigrate("-c", cluster.name, source, "127.0.0.1:x"), 2)
    assert "missing port" in one_line(neomigrate("-c", cluster.name, source, "nowhere"), 2)
    assert "-c/--cluster is required" in one_line(neomigrate(source, cluster.masters), 2)
    assert "is a directory" in one_line(neomigrate("-c", cluster.name, source, str(tmp_path)), 2)
    usage = neomigrate("-c", cluster.name, source)
    assert usage.returncode == 2 and usage.stderr.splitlines()[-1].startswith("neomigrate: error:")
    # the cluster is not empty and newer than the source: refused, status 1
    assert "the destination is not empty" in one_line(
        neomigrate("-c", cluster.name, older, cluster.masters), 1)
    # the FileStorage destination is newer than the cluster: refused too
    size = os.path.getsize(source)
    assert "the destination is not empty" in one_line(
        neomigrate("-c", cluster.name, cluster.masters, source), 1)
    assert os.path.getsize(source) == size
    # wrong cluster name
    assert "cannot connect" in one_line(
        neomigrate("-c", "other", "--connect-timeout", "3", source, cluster.masters), 1)
