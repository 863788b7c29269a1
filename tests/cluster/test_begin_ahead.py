"""Feature begin-ahead: the master's answer to a begin reserves the
client's next TTIDs (one in each partition), so that its next commit
stores at once, under a TTID in its first object's partition, and reads
the master's answer at the vote.  The master takes such a begin only if
it sent the client nothing about nodes or partitions since the
reservation: the stores went where the client's tables said."""
from __future__ import annotations

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping
from ZODB.Connection import TransactionMetaData
from ZODB.POSException import ConflictError
from ZODB.utils import z64

from neozodb.cli.cluster import wait_until
from neozodb.client import Storage
from neozodb.net.endpoint import ConnectionClosed, RemoteError
from neozodb.protocol import ErrorCodes, NodeStates, NodeTypes, Packets, make_nid, p64, u64

pytestmark = pytest.mark.timeout(120)
TIMEOUT = 30


def _commit(storage, oid: bytes, serial: bytes, data: bytes) -> bytes:
    txn = TransactionMetaData()
    storage.tpc_begin(txn)
    storage.store(oid, serial, data, "", txn)
    storage.tpc_vote(txn)
    return storage.tpc_finish(txn)


def test_the_stores_of_a_reserved_ttid_do_not_wait_for_the_master(spread_cluster):
    """Where partitions are on different storages, the TTID is the block's
    in the first object's partition (as with begin-partition)."""
    cluster = spread_cluster
    storage = Storage(**cluster.client_kwargs())
    try:
        app = storage.app
        oid = storage.new_oid()
        serial = _commit(storage, oid, z64, b"first")
        master = app.get_master()
        assert app.reserved.holds(master)  # the first answer reserved a block
        # keep the master's reader thread out of its socket: the answer to
        # the next begin stays there until the commit reads it
        master.direct_grace = 60.0
        master.call(Packets.AskLastTransaction, timeout=TIMEOUT)
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        storage.store(oid, serial, b"second", "", txn)
        commit = storage._commit(txn)
        assert commit.reserved and not commit.deferred
        assert commit.begin_answer is not None  # asked (it leaves with the vote), not read
        partition = app.pt.partition(oid)
        assert app.pt.partition(commit.ttid) == partition
        storage.tpc_vote(txn)
        tid = storage.tpc_finish(txn)
        assert app.pt.partition(tid) == partition  # the TID keeps the TTID's
        assert app.reserved.holds(master)  # and the next block is there
    finally:
        storage.close()
    reader = Storage(**cluster.client_kwargs())
    try:
        assert reader.load(oid) == (b"second", tid)
    finally:
        reader.close()


def _stale_block(cluster, app) -> None:
    """The race the check is for: the client took a block, then the master
    told it that a storage went down, before its begin arrived."""
    master = app.get_master()
    base = app.reserved.take(master)
    assert base is not None
    app.reserved.add(master, 1)  # forgotten once a notification is read
    cluster.storage(2).kill()
    s2 = make_nid(NodeTypes.STORAGE, 2)

    def told() -> bool:
        # both the node's state and its cells' (the master sends nothing
        # more then): a block put back before the last would be forgotten
        node = app.nm.get(s2)
        return (not app.reserved.holds(master) and node.state is not NodeStates.RUNNING
                and not app.pt.partitions_of(s2, readable=True))
    wait_until(told, TIMEOUT, "the client told")
    app.reserved.add(master, base)  # as if its begin had left before


def test_a_block_gone_stale_is_refused_and_the_commit_begins_again(cluster):
    """The storages drop what went with the refused TTID, the same stores
    go again with a new one: the application sees nothing."""
    db = ZODB.DB(Storage(**cluster.client_kwargs()))
    try:
        tm = transaction.TransactionManager()
        root = db.open(tm).root()
        root["x"] = PersistentMapping(v=1)
        root["y"] = PersistentMapping(v=1)
        tm.commit()
        app = db.storage.app
        _stale_block(cluster, app)
        root["x"]["v"] = 2
        root["y"]["v"] = 2
        root._p_jar.readCurrent(root)  # a check too, sent again as well
        tm.commit()
        assert app.begins_again == 1
        root["x"]["v"] = 3
        tm.commit()  # would wait for the refused one's lock, were it kept
        assert app.begins_again == 1
        oid = root["x"]._p_oid
    finally:
        db.close()
    reader = ZODB.DB(Storage(**cluster.client_kwargs()))
    try:
        root = reader.open().root()
        assert (root["x"]["v"], root["y"]["v"]) == (3, 2)
        assert len(reader.history(oid, size=10)) == 3  # nothing of the refused one
    finally:
        reader.close()


def test_a_refused_commit_that_cannot_begin_again_is_a_conflict(cluster):
    """An undo (what the storages answered holds for its TTID only) is not
    sent again: ConflictError, which the application tries again."""
    storage = Storage(**cluster.client_kwargs())
    try:
        app = storage.app
        x, y = storage.new_oid(), storage.new_oid()
        _commit(storage, x, z64, b"x1")
        serial_y = _commit(storage, y, z64, b"y1")
        undone = _commit(storage, x, storage.load(x)[1], b"x2")
        _stale_block(cluster, app)
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        storage.store(y, serial_y, b"y2", "", txn)  # takes the block
        assert storage._commit(txn).reserved
        storage.undo(undone, txn)
        with pytest.raises(ConflictError, match="the cluster changed"):
            storage.tpc_vote(txn)
        storage.tpc_abort(txn)
        assert app.begins_again == 0
        # nothing of it stayed, nor holds a lock
        assert storage.load(x)[0] == b"x2" and storage.load(y)[0] == b"y1"
        _commit(storage, y, serial_y, b"y3")
    finally:
        storage.close()


def _refused(master, args, code, why: str, closed: bool) -> None:
    with pytest.raises(RemoteError) as e:
        master.call(Packets.AskBeginAhead, *args, timeout=TIMEOUT)
    assert e.value.code is code and why in e.value.message
    if closed:
        with pytest.raises(ConnectionClosed):
            master.call(Packets.AskLastTransaction, timeout=TIMEOUT)
    else:
        master.call(Packets.AskLastTransaction, timeout=TIMEOUT)


def test_begin_ahead_is_checked(one_storage):
    cluster = one_storage
    owner = Storage(**cluster.client_kwargs())
    stranger = Storage(**cluster.client_kwargs())
    try:
        np = owner.app.pt.num_partitions
        master = owner.app.get_master()
        ttid, base = master.call(Packets.AskBeginAhead, None, None, timeout=TIMEOUT)
        master.notify(Packets.AbortTransaction, ttid, [])
        first = u64(base)
        mine = p64(first + (3 - first) % np)
        # a TTID of a block reserved for another connection, or of none
        _refused(stranger.app.get_master(), (3, mine), ErrorCodes.NOT_READY,
                 "cluster changed", closed=False)
        _refused(master, (None, ttid), ErrorCodes.NOT_READY, "cluster changed", closed=False)
        # the owner's block is still good, once
        got, base2 = master.call(Packets.AskBeginAhead, 3, mine, timeout=TIMEOUT)
        assert got == mine and u64(base2) >= first + np
        master.notify(Packets.AbortTransaction, mine, [])
        _refused(master, (3, mine), ErrorCodes.NOT_READY, "cluster changed", closed=False)
        _refused(master, (np, None), ErrorCodes.PROTOCOL_ERROR, "invalid partition",
                 closed=True)
    finally:
        owner.close()
        stranger.close()
    # a client without the feature may not use it
    featureless = Storage(**cluster.client_kwargs(), features=False)
    try:
        _refused(featureless.app.get_master(), (None, None), ErrorCodes.PROTOCOL_ERROR,
                 "unexpected AskBeginAhead", closed=True)
    finally:
        featureless.close()
    # the master goes on serving
    db = ZODB.DB(Storage(**cluster.client_kwargs()))
    try:
        tm = transaction.TransactionManager()
        db.open(tm).root()["x"] = 1
        tm.commit()
    finally:
        db.close()
