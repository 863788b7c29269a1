"""Undo as NEO's client does it, message by message, against real neozodb
storages: the serials it names in AskStoreObject are the ones
AskObjectUndoSerial answered, and it points undo records at the revision
answered as the one to go back to.  The messages go through a neozodb
client's connections (no NEO needed); tests/interop runs ZODB's suite
through NEO's client itself."""
from __future__ import annotations

import hashlib
import time

import pytest
from ZODB.serialize import referencesf
from ZODB.utils import z64

from fsdata import commit
from neozodb.client import Storage
from neozodb.protocol import Packets, p64, u64

pytestmark = pytest.mark.timeout(120)


class NEOStyleTransaction:
    """One transaction whose stores and undo questions are sent as NEO's
    client sends them (neo/client/app.py: undo, _store)."""

    def __init__(self, storage: Storage) -> None:
        self.app = app = storage.app
        (self.ttid,) = app.get_master().call(Packets.AskBeginTransaction, None, timeout=10)
        self.ltid = p64(u64(app.last_tid) + 1)
        self.oids: list[bytes] = []
        self.involved: set[int] = set()

    def undo_serials(self, undone_tid: bytes, oid: bytes) -> tuple:
        (answer,) = self.app.ask_storage(oid, Packets.AskObjectUndoSerial, self.ttid, self.ltid,
                                         undone_tid, [oid])
        return answer[oid]

    def store(self, oid: bytes, serial: bytes, data: bytes, data_serial: bytes | None = None
              ) -> list:
        """AskStoreObject to every cell; their answers (None: stored)."""
        if oid not in self.oids:
            self.oids.append(oid)
        answers = []
        for nid in self.app.writable_cells(oid):
            self.involved.add(nid)
            (conflict,) = self.app.storage_conn(nid).call(
                Packets.AskStoreObject, oid, serial, 0, hashlib.sha1(data).digest(), data,
                data_serial, self.ttid, timeout=10)
            answers.append(conflict)
        return answers

    def commit(self) -> bytes:
        app, ttid = self.app, self.ttid
        metadata = app.writable_cells(ttid)
        for nid in metadata:
            app.storage_conn(nid).call(Packets.AskStoreTransaction, ttid, b"", b"undo", b"",
                                       self.oids, None, timeout=10)
        for nid in self.involved.difference(metadata):
            app.storage_conn(nid).call(Packets.AskVoteTransaction, ttid, timeout=10)
        _, tid = app.get_master().call(Packets.AskFinishTransaction, ttid, self.oids, [], [],
                                       None, timeout=30)
        return tid


def _revisions(storage: Storage, *datas: bytes) -> tuple[bytes, list[bytes]]:
    """A new object, committed with each of ``datas`` in turn (a
    transaction each): its oid, and the tids."""
    oid = storage.new_oid()
    tids, serial = [], z64
    for data in datas:
        serial = commit(storage, [(oid, serial, data)])
        tids.append(serial)
    return oid, tids


def _state(cluster, oid: bytes) -> tuple:
    """What a new client loads, and the back-pointer of the last record."""
    storage = Storage(cluster.masters, cluster.name)
    try:
        data, serial = storage.load(oid)
        *_, last = storage.iterator(serial, serial)
        (record,) = [r for r in last if r.oid == oid]
        return data, serial, record.data_txn
    finally:
        storage.close()


def test_two_undos_of_one_object_in_one_transaction(cluster):
    """The second undo of the object names, as the serial its store is
    based on, the back-pointer of the first one (what AskObjectUndoSerial
    answers as current): stored, not a conflict (ZODB's
    testTwoObjectUndoAtOnce and RecoveryStorage's
    testRestoreWithMultipleUndoRedo through NEO's client)."""
    storage = Storage(cluster.masters, cluster.name)
    try:
        oid, (t1, t2, t3) = _revisions(storage, b"A", b"B", b"C")
        txn = NEOStyleTransaction(storage)
        assert txn.undo_serials(t3, oid) == (t3, t2, True)
        assert txn.store(oid, t3, b"B", t2) == [None, None]
        # current: the revision the first undo points to
        assert txn.undo_serials(t2, oid) == (t2, t1, True)
        assert txn.store(oid, t2, b"A", t1) == [None, None]
        tid = txn.commit()
    finally:
        storage.close()
    assert _state(cluster, oid) == (b"A", tid, t1)



def test_equal_data_in_two_rows_is_the_same_state(cluster):
    """Storages on SQLite do not deduplicate data by default: a revision
    that stores again the bytes of an older one gets a row of its own.  An
    undo of the older one still finds the current state to be the undone
    one (storage/undo.py, same_state), as when both shared a row."""
    storage = Storage(cluster.masters, cluster.name)
    try:
        oid, (t1, t2, t3) = _revisions(storage, b"A" * 100, b"B" * 100, b"A" * 100)
        txn = NEOStyleTransaction(storage)
        assert txn.undo_serials(t2, oid) == (t3, t1, False)
        # undoing t1 (the creation) from t3 (equal to it): the object goes
        assert txn.undo_serials(t1, oid) == (t3, None, True)
    finally:
        storage.close()

def test_undo_after_a_merged_undo_in_one_transaction(cluster):
    """After a store without back-pointer (an undo merged by conflict
    resolution), AskObjectUndoSerial answers the TTID as current and NEO's
    client bases its next store on it: stored (ZODB's
    testUndoMultipleConflictResolution through NEO's client)."""
    storage = Storage(cluster.masters, cluster.name)
    try:
        oid, (t1, t2, t3) = _revisions(storage, b"0", b"1", b"2")
        txn = NEOStyleTransaction(storage)
        # undo of t2 merged with t3 by the client: stored with data
        assert txn.undo_serials(t2, oid) == (t3, t1, False)
        assert txn.store(oid, t3, b"1 (merged)") == [None, None]
        # then the undo of t3, from the state this transaction stored
        assert txn.undo_serials(t3, oid) == (txn.ttid, t2, False)
        assert txn.store(oid, txn.ttid, b"0 (merged twice)") == [None, None]
        tid = txn.commit()
    finally:
        storage.close()
    assert _state(cluster, oid) == (b"0 (merged twice)", tid, None)


def test_store_after_an_undo_must_be_based_on_its_target(cluster):
    """After an undo in the transaction, a store of the object based on
    another serial than the undo's target (or the first store's base) is a
    conflict answered with that target, as NEO's storages do."""
    storage = Storage(cluster.masters, cluster.name)
    try:
        oid, (t1, t2) = _revisions(storage, b"A", b"B")
        txn = NEOStyleTransaction(storage)
        assert txn.store(oid, t2, b"A", t1) == [None, None]
        assert txn.store(oid, txn.ttid, b"C") == [t1, t1]
        assert txn.store(oid, t1, b"C") == [None, None]
        assert txn.commit()
    finally:
        storage.close()
    assert _state(cluster, oid)[0] == b"C"


def test_undo_points_to_the_previous_record_which_a_pack_keeps(cluster):
    """The revision to go back to is the record before the undone one,
    not the one holding its data: once a pack removed the older records,
    the back-pointer record is still there and the undo works."""
    storage = Storage(cluster.masters, cluster.name)
    try:
        oid, (t1, t2) = _revisions(storage, b"A", b"B")
        t3 = commit(storage, undos=[t2])  # back to A: a back-pointer to t1
        assert storage.load(oid) == (b"A", t3)
        now = packtime = time.time()
        while packtime <= now:  # strictly after t3, whatever the clock's resolution
            packtime = time.time()
        storage.pack(packtime, referencesf, gc=False)  # t1 and t2 go, t3 stays
        t4 = commit(storage, [(oid, t3, b"D")])
        txn = NEOStyleTransaction(storage)
        assert txn.undo_serials(t4, oid) == (t4, t3, True)
        storage.app.get_master().notify(Packets.AbortTransaction, txn.ttid, [])
        t5 = commit(storage, undos=[t4])
        assert storage.load(oid) == (b"A", t5)
    finally:
        storage.close()
    assert _state(cluster, oid) == (b"A", t5, t3)
