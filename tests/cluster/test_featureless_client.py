"""A client that announces no neozodb feature (``Storage(features=False)``):
the master and the storages take it for NEO's client and tell it none of
theirs, so it must use only what NEO's nodes offer.  This is how a neozodb
cluster shows the client what a NEO cluster would, without NEO."""
from __future__ import annotations

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping
from test_pack import gone, make_garbage, print_pack
from ZODB.serialize import referencesf

from fsdata import commit
from neozodb.client import Storage
from neozodb.client import pack as packing
from neozodb.protocol import p64, u64
from neozodb.tid import time_from_tid

pytestmark = pytest.mark.timeout(180)


def featureless(cluster) -> Storage:
    return Storage(cluster.masters, cluster.name, features=False)


def test_nodes_tell_a_featureless_client_nothing(cluster):
    storage = featureless(cluster)
    try:
        app = storage.app
        assert app.get_master().peer_features == frozenset()
        nid = next(iter(app.running_storages()))
        assert app.storage_conn(nid).peer_features == frozenset()
    finally:
        storage.close()
    storage = Storage(cluster.masters, cluster.name)
    try:
        assert b"gc-pack" in storage.app.get_master().peer_features
    finally:
        storage.close()


def test_gc_without_gc_pack_deletes_the_garbage_itself(cluster):
    """The master does not offer gc-pack: the pack sends it only NEO's
    history pack orders (no GC order), and the garbage goes anyway, by
    deletions then partial history packs; the undo log shows neither the
    deletions nor the pack transactions."""
    db = ZODB.DB(featureless(cluster))
    try:
        conn = db.open()
        root = conn.root()
        root["keep"] = keep = PersistentMapping(v=1)
        transaction.commit()
        garbage = make_garbage(root, "g", 30, per_txn=10)
        serials = {oid: [h["tid"] for h in db.storage.history(oid, 10)] for oid in garbage}
        pack_time = time_from_tid(u64(db.lastTransaction())) + 1e-6
        keep["v"] = 2
        transaction.get().note("last")
        transaction.commit()
        db.storage.pack(pack_time, referencesf)
        orders = print_pack(cluster)[1]["orders"]
        assert orders and not any(o["gc"] for o in orders), orders
        # partial packs of the deleted objects, then the history pack
        assert [o["partial"] for o in orders] == [True, False]
        assert all(gone(db.storage, oid, serials[oid]) for oid in garbage)
        conn.sync()
        assert root["keep"]["v"] == 2
        log = db.storage.undoLog(0, 10)
        assert [d["description"] for d in log] == [b"last"]
    finally:
        db.close()


def test_gc_deletion_skips_objects_changed_since_the_mark(cluster, monkeypatch):
    """An unreachable object changed after the mark (seen in the
    invalidations, or the deletion based on the serial the mark saw
    conflicts) is kept, the others go."""
    db = ZODB.DB(featureless(cluster))
    try:
        conn = db.open()
        root = conn.root()
        garbage = make_garbage(root, "g", 5)
        storage = db.storage
        original = packing.delete_garbage

        def change_one_first(storage, mark, unreachable, pack_tid):
            # another client changes one of them after the mark
            other = featureless(cluster)
            try:
                data, serial = other.load(garbage[1])
                commit(other, stores=[(garbage[1], serial, data)])
            finally:
                other.close()
            return original(storage, mark, unreachable, pack_tid)

        monkeypatch.setattr(packing, "delete_garbage", change_one_first)
        storage.pack(time_from_tid(u64(db.lastTransaction())) + 1e-6, referencesf)
        storage.load(garbage[1])  # kept
        assert all(gone(storage, oid, ()) for oid in garbage if oid != garbage[1])
    finally:
        db.close()


def test_pack_transactions_tell_their_pack_tid(cluster):
    """NEO's storages keep packed transactions in the undo log: the client
    leaves out those up to the pack_tid its pack transactions record (in
    the extension, with or without GC; not the partial packs of the
    garbage), since NEO's master cannot tell it reliably."""
    db = ZODB.DB(featureless(cluster))
    try:
        conn = db.open()
        root = conn.root()
        make_garbage(root, "g", 3)
        first = db.lastTransaction()
        db.storage.pack(time_from_tid(u64(first)) + 1e-6, referencesf)
        root["x"] = 1
        transaction.commit()
        second = db.lastTransaction()
        db.storage.pack(time_from_tid(u64(second)) + 1e-6, referencesf, gc=False)
        packs = [(txn.extension.get("neozodb_pack_tid"), list(txn))
                 for txn in db.storage.iterator() if txn.description == b"IStorage.pack"]
        # the deletions, the partial pack of the garbage, the pack, the pack
        assert [(tid, len(records)) for tid, records in packs] == [
            (None, 0), (None, 0), (first, 0), (second, 0)]
    finally:
        db.close()


def test_restore_sends_the_data_alone_when_the_back_pointer_is_packed_away(cluster):
    """NEO's storages refuse a back-pointer to a revision they packed away
    (UNDO_PACK_ERROR, even with the data sent along): a client that sees
    storages without features checks first and sends the data alone; the
    copied record then has no back-pointer.  A back-pointer to a revision
    still there is kept."""
    from ZODB.Connection import TransactionMetaData
    from ZODB.tests.MinPO import MinPO
    from ZODB.tests.StorageTestBase import zodb_pickle
    storage = featureless(cluster)
    try:
        oid = storage.new_oid()
        tid1 = commit(storage, stores=[(oid, None, zodb_pickle(MinPO(1)))])
        tid2 = commit(storage, stores=[(oid, tid1, zodb_pickle(MinPO(2)))])
        kept = storage.new_oid()
        tid3 = commit(storage, stores=[(kept, None, zodb_pickle(MinPO(3)))])
        storage.pack(time_from_tid(u64(tid2)) + 1e-6, referencesf, gc=False)
        restored = []
        for prev_txn, data in ((tid1, MinPO(1)), (tid3, MinPO(3))):
            t = TransactionMetaData()
            storage.tpc_begin(t, p64(u64(storage.lastTransaction()) + 1))
            target = oid if prev_txn == tid1 else kept
            storage.restore(target, prev_txn, zodb_pickle(data), "", prev_txn, t)
            storage.tpc_vote(t)
            restored.append(storage.tpc_finish(t))
        records = {txn.tid: [(r.oid, r.data_txn) for r in txn]
                   for txn in storage.iterator(restored[0])}
        assert records == {restored[0]: [(oid, None)], restored[1]: [(kept, tid3)]}
        assert storage.load(oid)[0] == zodb_pickle(MinPO(1))
    finally:
        storage.close()
