"""A storage whose connection with the client closes between the stores
and the vote (a storage that loses the master closes every client
connection) dropped the transaction with it: the vote must not go to it
on a new connection, where it can only refuse, but count it as failed
(FailedVote), so that the master commits with the other replicas."""
from __future__ import annotations

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
