"""A store based on a revision being committed (locked, not unlocked
yet): the next transaction of a pipelined copy (client/copying.py) takes
the object's lock as soon as the previous transaction is locked, rather
than after its unlock.  Driven in-process (tests/storage_inprocess.py)."""
from __future__ import annotations

import hashlib

import pytest

from neozodb.protocol import ZERO_HASH, NodeTypes, Packets, make_nid, p64
from neozodb.storage.handlers import ClientHandler, MasterHandler
from storage_inprocess import FakeConn, run

pytestmark = pytest.mark.timeout(60)

CLIENT = make_nid(NodeTypes.CLIENT, 1)
OID = p64(5)
T1, TID1 = p64(0x100), p64(0x101)
T2, TID2 = p64(0x200), p64(0x201)
NOTHING = p64(0)


def store(app, ttid, serial, data, data_serial=None) -> FakeConn:
    """A store, answered on a connection of its own (same client)."""
    handler = ClientHandler(app)
    conn = FakeConn(CLIENT, handler)
    checksum = ZERO_HASH if data is None else hashlib.sha1(data).digest()
    handler.AskStoreObject(conn, 1, OID, serial, 0, checksum, data or b"", data_serial, ttid)
    return conn


def vote(app, ttid) -> FakeConn:
    conn = FakeConn(CLIENT)
    ClientHandler(app).AskStoreTransaction(conn, 2, ttid, b"", b"", b"", [OID], None)
    app.group_sync.flush()
    return conn


def lock(app, ttid, tid) -> None:
    master = FakeConn()
    MasterHandler(app).AskLockInformation(master, 3, ttid, tid, False)
    app.group_sync.flush()
    assert master.sent == [(Packets.AnswerInformationLocked, (ttid,))]


def unlock(app, ttid) -> None:
    MasterHandler(app).NotifyUnlockInformation(FakeConn(), 4, ttid)


def load(app) -> FakeConn:
    handler = ClientHandler(app)
    conn = FakeConn(CLIENT, handler)
    handler.AskObject(conn, 5, OID, None, None)
    return conn


def committed(app):
    found = app.backend.get_object(5)
    return found and (found[0], found[4])


ACCEPTED = [(Packets.AnswerStoreObject, (None,))]


def test_a_store_based_on_a_locked_revision_goes_through_before_its_unlock(tmp_path):
    def scenario(app):
        assert store(app, T1, NOTHING, b"one").sent == ACCEPTED
        assert vote(app, T1).sent == [(Packets.AnswerStoreTransaction, ())]
        early = store(app, T2, TID1, b"two")
        assert early.sent == []  # T1 is voted, not locked: it may still abort
        lock(app, T1, TID1)
        assert early.sent == ACCEPTED
        reader = load(app)
        assert reader.sent == []  # loads still wait for the unlock
        assert vote(app, T2).sent == [(Packets.AnswerStoreTransaction, ())]
        unlock(app, T1)
        assert reader.sent[0][0] is Packets.AnswerObject
        assert reader.sent[0][1][1] == TID1
        assert committed(app) == (0x101, b"one")
        lock(app, T2, TID2)
        unlock(app, T2)
        assert committed(app) == (0x201, b"two")
        assert app.locks.txns == {} and app.locks.write_locks == {} \
            and app.locks.read_locks == {}
    run(tmp_path, scenario)


def test_a_store_based_on_the_committed_revision_conflicts_with_the_locked_one(tmp_path):
    def scenario(app):
        store(app, T1, NOTHING, b"one")
        vote(app, T1)
        lock(app, T1, TID1)
        # the revision being committed is what it conflicts with, at once
        assert store(app, T2, NOTHING, b"two").sent == [(Packets.AnswerStoreObject, (TID1,))]
        assert app.locks.write_locks == {OID: T1}  # given back
        unlock(app, T1)
        assert app.locks.write_locks == {}
    run(tmp_path, scenario)


def test_a_back_pointer_to_the_locked_revision_waits_for_its_unlock(tmp_path):
    """A restore whose record points to the revision being committed (an
    undo's): its data row is found only once that revision is unlocked."""
    def scenario(app):
        store(app, T1, NOTHING, b"one")
        vote(app, T1)
        lock(app, T1, TID1)
        pointer = store(app, T2, TID1, None, data_serial=TID1)
        assert pointer.sent == []
        unlock(app, T1)
        assert pointer.sent == ACCEPTED
        vote(app, T2)
        lock(app, T2, TID2)
        unlock(app, T2)
        assert committed(app) == (0x201, b"one")  # the same data row
    run(tmp_path, scenario)
