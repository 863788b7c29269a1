"""A storage node that loses its master in the middle of commits, driven
in-process (no network): what it keeps for the next master's verification.

The messages of one commit do not reach every storage at once: a master
that dies (SIGKILL, machine crash) may have sent the lock of a transaction
to some storages and not to the others.  Those that got it hold the
transaction locked; the new master's verification validates it on every
storage, so the others must still have their voted rows then."""
from __future__ import annotations

import hashlib

import pytest

from neozodb.protocol import NodeTypes, Packets, make_nid, p64
from neozodb.storage.handlers import ClientHandler, MasterHandler
from storage_inprocess import FakeConn, run

pytestmark = pytest.mark.timeout(60)

CLIENT = make_nid(NodeTypes.CLIENT, 1)
OID = p64(5)
TTID, TID = p64(0x100), p64(0x101)
NOTHING = p64(0)


def vote(app, client, data: bytes) -> None:
    handler = ClientHandler(app)
    handler.AskStoreObject(client, 1, OID, NOTHING, 0, hashlib.sha1(data).digest(), data,
                           None, TTID)
    handler.AskStoreTransaction(client, 2, TTID, b"user", b"description", b"", [OID], None)
    app.group_sync.flush()  # the answer leaves once synced, at the end of the loop iteration
    assert client.sent == [(Packets.AnswerStoreObject, (None,)),
                           (Packets.AnswerStoreTransaction, ())]


def current(app):
    found = app.backend.get_object(5)
    return found and (found[0], found[4])


def test_voted_transaction_survives_master_loss_for_verification(tmp_path):
    def scenario(app):
        vote(app, FakeConn(CLIENT), b"data")
        # the master dies before our lock: another storage may have it
        app.master_lost()
        master = FakeConn()
        handler = MasterHandler(app)
        handler.AskLockedTransactions(master, 1)
        assert master.sent == [(Packets.AnswerLockedTransactions, ({TTID: None},))]
        handler.ValidateTransaction(master, 2, TTID, TID)  # locked elsewhere
        app.start_operation(master)
        assert current(app) == (0x101, b"data")
        assert app.locks.txns == {} and app.locks.write_locks == {}
    run(tmp_path, scenario)


def test_voted_transaction_nobody_locked_is_dropped_at_start(tmp_path):
    def scenario(app):
        vote(app, FakeConn(CLIENT), b"data")
        app.master_lost()
        master = FakeConn()
        MasterHandler(app).AskLockedTransactions(master, 1)
        app.start_operation(master)  # verification validated nothing
        assert current(app) is None
        assert app.backend.get_locked_transactions() == {}
    run(tmp_path, scenario)


def test_locked_transaction_not_validated_leaves_no_lock(tmp_path):
    """We locked it without holding its metadata (partition(ttid) is on
    other storages, which the dead master never told to lock): it is not
    committed, and its locks must not hold loads and stores back."""
    def scenario(app):
        client = FakeConn(CLIENT)
        handler = ClientHandler(app)
        data = b"data"
        handler.AskStoreObject(client, 1, OID, NOTHING, 0, hashlib.sha1(data).digest(), data,
                               None, TTID)
        handler.AskVoteTransaction(client, 2, TTID)  # metadata elsewhere
        MasterHandler(app).AskLockInformation(FakeConn(), 3, TTID, TID, False)
        app.master_lost()
        master = FakeConn()
        MasterHandler(app).AskLockedTransactions(master, 1)
        app.start_operation(master)
        assert app.locks.txns == {} and app.locks.read_locks == {} \
            and app.locks.write_locks == {}
        reader = FakeConn(CLIENT)
        handler.AskObject(reader, 4, OID, None, None)
        assert reader.sent and reader.sent[0][0] is not Packets.AnswerObject  # answered at once
    run(tmp_path, scenario)


def test_identification_waiting_for_the_master_is_closed_with_the_operation(tmp_path):
    """A client the master did not tell us about yet waits (its
    identification is delayed); the master is lost meanwhile: the client
    learns it by the close, not by waiting for an answer forever."""
    from neozodb.protocol.features import ANNOUNCEMENT
    from neozodb.storage.handlers import IdentificationHandler

    def scenario(app):
        handler = IdentificationHandler(app)
        conn = FakeConn(None, handler)
        handler.RequestIdentification(conn, 0, NodeTypes.CLIENT, make_nid(NodeTypes.CLIENT, 7),
                                      None, app.name_bytes, 1.0, ANNOUNCEMENT)
        assert conn.sent == [] and not conn.closed  # delayed
        app.master_lost()
        assert conn.closed
        assert app.delayed == []
    run(tmp_path, scenario)
