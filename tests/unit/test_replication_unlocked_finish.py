"""A storage that rejoins under load, driven in-process (real app, SQLite,
no network): a transaction that began before it was ready stores and
votes in its OUT_OF_DATE cells (lockless), but NEO's master commits it
without this storage in its lock phase (it involves the storages that were
ready when the transaction began).  Neither lock nor unlock ever comes; only
NotifyTransactionFinished, since the replication asked to wait for it.

Before, the voted leftover stayed in memory and its lockless stores kept
the cells from being reported (``lockless_pending``): the cells stayed
OUT_OF_DATE with everything replicated (tests/interop/test_mixed_clusters.py
test_sigkill_under_load with NEO's master, once in a while).  NEO's storage
forgets such a transaction on NotifyTransactionFinished; so does ours now."""
from __future__ import annotations

import hashlib

import pytest

import storage_inprocess
from neozodb.protocol import CellStates, NodeTypes, Packets, make_nid, p64, u64
from neozodb.storage.handlers import ClientHandler, MasterHandler
from storage_inprocess import FakeConn

pytestmark = pytest.mark.timeout(60)

PARTITIONS = 2
CLIENT = make_nid(NodeTypes.CLIENT, 1)
OTHER = make_nid(NodeTypes.STORAGE, 2)
TTID, TID = p64(0x100), p64(0x101)
TARGET = 0xF0  # the master's last tid when the replication asked
NOTHING = p64(0)


def run(tmp_path, scenario) -> None:
    # we came back: our cells are OUT_OF_DATE, the other storage's readable
    storage_inprocess.run(tmp_path, lambda app: scenario(app, app.master_conn), lambda nid: [
        [(nid, CellStates.OUT_OF_DATE), (OTHER, CellStates.UP_TO_DATE)]] * PARTITIONS)


def store_and_vote(app, ttid: bytes, oid: bytes, data: bytes) -> None:
    client = FakeConn(CLIENT)
    handler = ClientHandler(app)
    handler.AskStoreObject(client, 1, oid, NOTHING, 0, hashlib.sha1(data).digest(), data,
                           None, ttid)
    handler.AskStoreTransaction(client, 2, ttid, b"user", b"description", b"", [oid], None)
    app.group_sync.flush()
    assert client.sent == [(Packets.AnswerStoreObject, (p64(0),)),
                           (Packets.AnswerStoreTransaction, ())]


def replicated_up_to(app, partition: int, tid: int) -> None:
    """What replication from the other storage would leave: every row up
    to ``tid`` is here."""
    app.backend.set_replication(partition, (tid + 1, tid + 1, 0))


def reported(master) -> list:
    return [(partition, u64(tid)) for packet, (partition, tid) in
            ((packet, args) for packet, args in master.sent
             if packet is Packets.NotifyReplicationDone)]


def test_finished_without_our_lock_does_not_hold_the_cell(tmp_path):
    oid = p64(5)
    partition = u64(oid) % PARTITIONS

    def scenario(app, master):
        replicator = app.replicator
        store_and_vote(app, TTID, oid, b"data")  # lockless: our cell is OUT_OF_DATE
        assert app.lockless_pending(partition)
        # AnswerUnfinishedTransactions: up to TARGET, and wait for TTID
        for p in range(PARTITIONS):
            replicator.targets[p], replicator.unfinished[p] = TARGET, {TTID}
        # the master commits it with the other storage alone
        MasterHandler(app).NotifyTransactionFinished(master, 0, TTID, TID)
        assert replicator.targets[partition] == u64(TID)
        assert TTID not in app.locks.txns
        assert not app.lockless_pending(partition)
        for p in range(PARTITIONS):
            replicated_up_to(app, p, u64(TID))
            replicator._maybe_done(p)
        assert sorted(reported(master)) == [(p, u64(TID)) for p in range(PARTITIONS)]
        # its voted rows are gone (replication brought the commit)
        assert app.backend.get_locked_transactions() == {}
    run(tmp_path, scenario)


def test_locked_here_is_kept(tmp_path):
    """A transaction we locked (we were in its lock phase) is not dropped
    by a NotifyTransactionFinished: only its unlock ends it here."""
    oid = p64(5)

    def scenario(app, master):
        store_and_vote(app, TTID, oid, b"data")
        handler = MasterHandler(app)
        handler.AskLockInformation(master, 1, TTID, TID, False)
        app.group_sync.flush()
        handler.NotifyTransactionFinished(master, 0, TTID, TID)
        assert app.locks.txns[TTID].locked
        handler.NotifyUnlockInformation(master, 0, TTID)
        assert TTID not in app.locks.txns
        assert app.backend.get_object(u64(oid))[0] == u64(TID)
    run(tmp_path, scenario)


def test_aborted_by_the_master_ends_the_wait(tmp_path):
    """NEO's master tells a storage waiting for a transaction that it was
    aborted with AbortTransaction alone: the wait ends, the cell is
    reported at the target (nothing to add for it)."""
    oid = p64(5)
    partition = u64(oid) % PARTITIONS

    def scenario(app, master):
        replicator = app.replicator
        store_and_vote(app, TTID, oid, b"data")
        replicator.targets[partition], replicator.unfinished[partition] = TARGET, {TTID}
        replicated_up_to(app, partition, TARGET)
        MasterHandler(app).AbortTransaction(master, 0, TTID, [])
        assert TTID not in app.locks.txns
        replicator._maybe_done(partition)
        assert reported(master) == [(partition, TARGET)]
    run(tmp_path, scenario)
