"""Undo, transaction iteration, the undo log, record iteration and object
count on a real cluster (2 storages, replicas 1, 12 partitions)."""
from __future__ import annotations

import os
import sqlite3

import pytest
import transaction
import ZODB
from BTrees.Length import Length
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping
from ZODB.Connection import TransactionMetaData
from ZODB.POSException import POSKeyError, UndoError
from ZODB.utils import maxtid, z64

from fsdata import commit, records
from neozodb.cli.cluster import wait_until
from neozodb.client import Storage, iteration
from neozodb.protocol import u64

pytestmark = pytest.mark.timeout(120)


def obj_rows(cluster, oid: bytes) -> list[list]:
    """(tid, data_id, value_tid) of oid's revisions, on each storage."""
    result = []
    for i in (1, 2):
        path = os.path.join(cluster.directory, "storage%d.sqlite" % i)
        conn = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
        try:
            result.append(conn.execute("SELECT tid, data_id, value_tid FROM obj WHERE oid=?"
                                       " ORDER BY tid", (u64(oid),)).fetchall())
        finally:
            conn.close()
    return result


def test_undo_creation_then_redo_with_back_pointers(cluster):
    storage = Storage(cluster.masters, cluster.name)
    try:
        oid = storage.new_oid()
        t1 = commit(storage, [(oid, z64, b"first revision")])
        t = TransactionMetaData()
        storage.tpc_begin(t)
        assert storage.undo(t1, t) == (None, [oid])
        storage.tpc_vote(t)
        t2 = storage.tpc_finish(t)
        # the creation is undone: the object is gone, except in the past
        with pytest.raises(POSKeyError):
            storage.load(oid)
        with pytest.raises(POSKeyError):
            storage.loadBefore(oid, maxtid)
        with pytest.raises(KeyError):
            storage.getTid(oid)
        assert storage.loadBefore(oid, t2) == (b"first revision", t1, t2)
        assert [h["tid"] for h in storage.history(oid, 10)] == [t2, t1]
        # redo: undo the undo, a back-pointer to the first revision
        t3 = commit(storage, undos=[t2])
        assert storage.load(oid) == (b"first revision", t3)
        assert storage.loadBefore(oid, maxtid) == (b"first revision", t3, None)
        txns = list(storage.iterator())
        assert [txn.tid for txn in txns] == [t1, t2, t3]
        assert [records(txn) for txn in txns] == [
            [(oid, t1, b"first revision", None)],
            [(oid, t2, None, None)],
            [(oid, t3, b"first revision", t1)],
        ]
        # no data was copied: the redo shares the data row of t1 (unlocks
        # reach the disk within a second)
        wait_until(lambda: all(len(rows) == 3 for rows in obj_rows(cluster, oid)), 10,
                   "unlocks written")
        for rows in obj_rows(cluster, oid):
            (_, first, _), (_, undone, _), (_, redone, value_tid) = rows
            assert undone is None and redone == first and value_tid == u64(t1)
        # a second client sees the same (not from its cache)
        other = Storage(cluster.masters, cluster.name)
        try:
            assert other.load(oid) == (b"first revision", t3)
            with pytest.raises(POSKeyError):
                other.loadBefore(oid, t3)
        finally:
            other.close()
    finally:
        storage.close()


def test_undo_with_conflict_resolution_and_undo_errors(cluster):
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        root = conn.root()
        root["length"] = Length(0)
        # BTrees resolve value changes of different keys (not insertions
        # against deletions, as an undo of an insertion would be)
        root["tree"] = OOBTree({"a": 0, "b": 0})
        root["plain"] = PersistentMapping(value=0)
        tm.commit()
        root["length"].change(5)
        root["tree"]["a"] = 1
        root["plain"]["value"] = 1
        tm.get().note("first change")
        tm.commit()
        root["length"].change(10)
        root["tree"]["b"] = 2
        tm.get().note("second change")
        tm.commit()
        log = db.undoLog(0, 3)
        assert [d["description"] for d in log] == ["second change", "first change", ""]
        # the plain mapping did not change since: a back-pointer; Length
        # and the tree changed: their undo is merged by conflict resolution
        db.undo(log[1]["id"], tm.get())
        tm.get().note("undo")
        tm.commit()
        conn.sync()
        assert root["length"]() == 10
        assert list(root["tree"].items()) == [("a", 0), ("b", 2)]
        assert root["plain"]["value"] == 0
        # now the mapping changed after "second change"... undoing the
        # first one again is impossible for it
        root["plain"]["value"] = 7
        tm.commit()
        db.undo(log[0]["id"], tm.get())  # second change: length and tree only
        tm.commit()
        conn.sync()
        assert root["length"]() == 0
        assert list(root["tree"].items()) == [("a", 0), ("b", 0)]
        root["plain"]["value"] = 8
        tm.commit()
        undone = db.undoLog(0, 1)[0]["id"]  # 7 -> 8
        root["plain"]["value"] = 9
        tm.commit()
        db.undo(undone, tm.get())
        with pytest.raises(UndoError, match="Some data were modified by a later transaction"):
            tm.commit()
        tm.abort()
        db.undo(b"\0\0\0\0\0\0\0\1", tm.get())
        with pytest.raises(UndoError, match="Invalid undo transaction id"):
            tm.commit()
        tm.abort()
        assert root["plain"]["value"] == 9
    finally:
        db.close()


def test_iterator_and_undo_log_match_the_commits(cluster, monkeypatch):
    # small chunks, so that partition buffers are refilled while merging
    # and records come in several batches
    monkeypatch.setattr(iteration, "TIDS_PER_PARTITION", 3)
    monkeypatch.setattr(iteration, "RECORD_BATCH", 4)
    storage = Storage(cluster.masters, cluster.name)
    try:
        oids = [storage.new_oid() for _ in range(12)]
        serials = dict.fromkeys(oids, z64)
        expected = []  # (tid, description, [(oid, data, data_txn)])

        def do(description, stores=(), deletes=(), undos=()):
            tid = commit(storage, [(oid, serials[oid], data) for oid, data in stores],
                         [(oid, serials[oid]) for oid in deletes], undos,
                         description=description)
            for oid, _ in stores:
                serials[oid] = tid
            for oid in deletes:
                serials[oid] = tid
            return tid

        for i in range(30):
            objects = [oids[(i + j * 5) % 12] for j in range(1 + i % 3)]
            stores = [(oid, b"%s at %d" % (oid.hex().encode(), i)) for oid in objects]
            tid = do(b"txn %d" % i, stores)
            expected.append((tid, b"txn %d" % i, [(oid, data, None) for oid, data in stores]))
        big = [(oid, b"big %d" % n) for n, oid in enumerate(oids)]  # more than a batch
        tid = do(b"big", big)
        expected.append((tid, b"big", [(oid, data, None) for oid, data in big]))
        tid = do(b"delete", deletes=oids[:2])
        expected.append((tid, b"delete", [(oid, None, None) for oid in oids[:2]]))
        # undoing the deletions: back-pointers to the "big" revisions
        big_tid = expected[-2][0]
        tid = commit(storage, undos=[expected[-1][0]], description=b"undo delete")
        expected.append((tid, b"undo delete",
                         [(oid, b"big %d" % n, big_tid) for n, oid in enumerate(oids[:2])]))

        def summary(txns):
            return [(txn.tid, txn.description, sorted((r.oid, r.data, r.data_txn) for r in txn))
                    for txn in txns]

        want = [(tid, d, sorted(recs)) for tid, d, recs in expected]
        txns = list(storage.iterator())
        assert summary(txns) == want
        assert all(txn.status == " " and txn.user == b"" for txn in txns)
        for txn in txns:  # records can be read again, big transaction included
            assert records(txn) == records(txn)
            assert all(r.tid == txn.tid and r.version == "" for r in txn)
        tids = [tid for tid, _, _ in expected]
        assert summary(storage.iterator(tids[5], tids[20])) == want[5:21]
        between = (u64(tids[7]) + u64(tids[8])) // 2
        assert summary(storage.iterator(between.to_bytes(8, "big"))) == want[8:]
        assert list(storage.iterator(tids[9], tids[8])) == []
        # the undo log, newest first, sliced and filtered
        log = storage.undoLog(0, 1000)
        assert [d["id"] for d in log] == tids[::-1]
        assert [d["description"] for d in log[:2]] == [b"undo delete", b"delete"]
        assert storage.undoLog(5, 12) == log[5:12]
        assert storage.undoLog(3, -4) == log[3:7]
        assert storage.undoInfo(0, 10, {"description": b"big"}) == [log[2]]
        assert storage.undoLog(2, 5, lambda d: d["description"].startswith(b"txn 1")) == [
            d for d in log if d["description"].startswith(b"txn 1")][2:5]
    finally:
        storage.close()


def test_reads_never_go_past_the_snapshot(cluster):
    """undoLog, undoInfo, history, iterator and record_iternext show only
    what the client was told is committed (NEO's TODO: transactional
    isolation of undoLog)."""
    a = Storage(cluster.masters, cluster.name)
    b = Storage(cluster.masters, cluster.name)
    try:
        oid = b.new_oid()
        t1 = commit(b, [(oid, z64, b"one")], description=b"one")
        a.sync()
        assert a.lastTransaction() == t1
        # hold a's invalidations, as a slow network would (whichever thread
        # reads them: a's own, when it reads the master connection)
        held: list = []
        invalidate = a.app.invalidate
        a.app.invalidate = lambda tid, oids: held.append((tid, oids))
        new = b.new_oid()
        t2 = commit(b, [(oid, t1, b"two"), (new, z64, b"new")], description=b"two")
        assert b.undoLog()[0]["id"] == t2
        assert a.lastTransaction() == t1
        assert [d["id"] for d in a.undoLog()] == [t1]
        assert [d["id"] for d in a.undoInfo()] == [t1]
        assert [h["tid"] for h in a.history(oid, 5)] == [t1]
        with pytest.raises(POSKeyError):
            a.history(new)  # created after the snapshot
        assert [txn.tid for txn in a.iterator()] == [t1]
        assert [txn.tid for txn in a.iterator(t2)] == []
        assert a.record_iternext() == (oid, t1, b"one", None)
        assert len(a) == 1
        a.sync()  # the invalidation of t2 is read now, at the latest: still held
        assert [tid for tid, _ in held] == [t2] and a.lastTransaction() == t1
        assert [d["id"] for d in a.undoLog()] == [t1]
        a.app.invalidate = invalidate
        for tid, oids in held:
            invalidate(tid, oids)
        a.sync()
        assert a.lastTransaction() == t2
        assert [d["id"] for d in a.undoLog()] == [t2, t1]
        assert [h["tid"] for h in a.history(oid, 5)] == [t2, t1]
        assert [txn.tid for txn in a.iterator()] == [t1, t2]
        assert len(a) == 2
    finally:
        a.close()
        b.close()


def test_record_iternext_len_and_size(cluster):
    storage = Storage(cluster.masters, cluster.name, compress=False)
    try:
        oids = [storage.new_oid() for _ in range(30)]
        data = {oid: os.urandom(100 + i) for i, oid in enumerate(oids)}
        t1 = commit(storage, [(oid, z64, data[oid]) for oid in oids])
        changed = oids[10:20]
        t2 = commit(storage, [(oid, t1, data[oid] * 2) for oid in changed])
        deleted = oids[:5]
        commit(storage, deletes=[(oid, t1) for oid in deleted])
        current = {}
        for oid in oids[5:]:
            current[oid] = (t2, data[oid] * 2) if oid in changed else (t1, data[oid])
        seen = {}
        cursor = None
        while True:
            oid, tid, record, cursor = storage.record_iternext(cursor)
            assert oid not in seen
            seen[oid] = (tid, record)
            if cursor is None:
                break
        assert seen == current
        assert list(seen) == sorted(seen)
        # an 8-byte oid starts there
        assert storage.record_iternext(oids[-1])[:3] == (oids[-1], t1, data[oids[-1]])
        assert len(storage) == 25
        # 25 objects: all of them are in the sample, the estimate is exact
        assert storage.getSize() == sum(
            len(data[oid]) * (3 if oid in changed else 1) for oid in current)
        assert storage  # truth does not count objects
    finally:
        storage.close()


def test_iteration_and_undo_go_on_when_a_storage_dies(cluster):
    storage = Storage(cluster.masters, cluster.name)
    try:
        oids = [storage.new_oid() for _ in range(24)]  # every partition, twice
        t1 = commit(storage, [(oid, z64, b"v1") for oid in oids])
        t2 = commit(storage, [(oid, t1, b"v2") for oid in oids])
        # connections to both storages are open; S2 dies without a word
        assert len(list(storage.iterator())) == 2
        assert len(storage.app._storages) == 2
        cluster.nodes["S2"].kill()
        txns = list(storage.iterator())  # requests sent to S2 go to S1
        assert [(txn.tid, len(records(txn))) for txn in txns] == [(t1, 24), (t2, 24)]
        assert [d["id"] for d in storage.undoLog()] == [t2, t1]
        assert len(storage) == 24
        t3 = commit(storage, undos=[t2])
        assert all(storage.load(oid) == (b"v1", t3) for oid in oids)
        assert [r.data_txn for r in list(storage.iterator(t3))[0]] == [t1] * 24
    finally:
        storage.close()
