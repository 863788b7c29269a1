"""A storage whose connection with the client closes between the stores
and the vote (a storage that loses the master closes every client
connection) dropped the transaction with it: the vote must not go to it
on a new connection, where it can only refuse, but count it as failed
(FailedVote), so that the master commits with the other replicas.  And a
connection that a storage closed before the transaction began, unnoticed
because no thread read it since, is not taken for a new one."""
from __future__ import annotations

import select

import pytest
import ZODB
from ZODB.Connection import TransactionMetaData
from ZODB.utils import z64

from neozodb.client import Storage
from neozodb.protocol import Packets

pytestmark = pytest.mark.timeout(180)


def test_vote_after_a_storage_dropped_the_transaction(cluster):
    storage = Storage(**cluster.client_kwargs())
    try:
        oid = storage.new_oid()
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        storage.store(oid, z64, b"kept by the other replica", "", txn)
        commit = storage._commit(txn)
        commit.known_ttid()  # the store sent, if it waited for the TTID
        commit._process(block=True)  # both storages answered the store
        assert len(commit.involved) == 2  # replicas 1: every cell on both
        nid = max(commit.involved)
        storage.app._storages[nid].close("as when the storage loses the master")
        # a round trip on a new connection: the storage saw the first one
        # go (and aborted the transaction) before anything else reaches it
        storage.app.storage_conn(nid).call(Packets.Ping, timeout=30)
        storage.tpc_vote(txn)
        tid = storage.tpc_finish(txn)
    finally:
        storage.close()
    db = ZODB.DB(Storage(**cluster.client_kwargs()))
    try:
        assert db.storage.load(oid) == (b"kept by the other replica", tid)
    finally:
        db.close()


def test_a_commit_does_not_take_a_connection_the_storage_closed(cluster):
    storage = Storage(**cluster.client_kwargs())
    db = ZODB.DB(storage)
    try:
        conn = db.open()
        conn.root()["x"] = 1
        conn.transaction_manager.commit()
        app = storage.app
        old = dict(app._storages)
        assert len(old) == 2
        for c in old.values():
            c.direct_grace = 3600.0  # their reader threads stay out of the sockets
            c.call(Packets.Ping, timeout=30)  # read directly: the grace runs
            with c.lock:
                c.sock.sendall(b"\xff" * 64)  # a protocol error: the storage closes
        for c in old.values():
            assert select.select([c.sock], [], [], 30)[0]  # the end came, unread
            assert not c.closed
        conn.root()["x"] = 2
        conn.transaction_manager.commit()  # on new connections
        assert all(app._storages[nid] is not c for nid, c in old.items())
    finally:
        db.close()
