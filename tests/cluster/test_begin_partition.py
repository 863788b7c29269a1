"""Feature begin-partition: where partitions are on different storages, the
client sends the begin at the first store, and the master gives a TTID in
that object's partition, so that a transaction whose objects are on one
storage has its metadata there too and is voted there alone (solo vote:
one storage, one sync).  Observed: the committed TIDs' partitions, the
early votes the client counted, and what each storage's database holds."""
from __future__ import annotations

import sqlite3

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping

from neozodb.client import Storage
from neozodb.net.endpoint import ConnectionClosed, RemoteError
from neozodb.protocol import ErrorCodes, Packets, u64

pytestmark = pytest.mark.timeout(120)
TIMEOUT = 30
PARTITIONS = 12


def _trans_tids(cluster, i: int) -> set[int]:
    db = sqlite3.connect("file:%s?mode=ro" % cluster.database(i), uri=True)
    try:
        return {tid for (tid,) in db.execute("SELECT tid FROM trans")}
    finally:
        db.close()


def test_a_transaction_on_one_storage_has_its_metadata_there(spread_cluster):
    cluster = spread_cluster
    db = ZODB.DB(Storage(**cluster.client_kwargs()))
    try:
        tm = transaction.TransactionManager()
        root = db.open(tm).root()
        objs = root["objs"] = [PersistentMapping() for _ in range(2 * PARTITIONS)]
        tm.commit()
        app = db.storage.app
        assert app.spread()
        taken_before = app.early_votes[0]
        tids = []
        for i, obj in enumerate(objs):
            obj["x"] = i
            tm.commit()
            tids.append((obj._p_oid, obj._p_serial))
        partitions = {app.pt.partition(oid) for oid, _ in tids}
        assert len(partitions) > 1  # the objects are on both storages
        for oid, tid in tids:
            assert app.pt.partition(tid) == app.pt.partition(oid), (oid.hex(), tid.hex())
        # every one-object commit voted on its object's storage alone
        assert app.early_votes[0] - taken_before == len(objs)
        owner = {nid: i for i, nid in enumerate(sorted(app.pt.nids()), 1)}
    finally:
        db.close()
    cluster.stop()
    for oid, tid in tids:
        (nid,) = app.pt.writable_nids(app.pt.partition(oid))
        held = [u64(tid) in _trans_tids(cluster, i) for i in (1, 2)]
        assert held == [owner[nid] == 1, owner[nid] == 2], (oid.hex(), tid.hex(), held)


def test_begin_goes_at_tpc_begin_where_every_storage_holds_everything(cluster):
    # 2 storages, replicas 1: no partition is better than another
    storage = Storage(**cluster.client_kwargs())
    try:
        assert not storage.app.spread()
    finally:
        storage.close()


def _refused(master, partition: int, why: str) -> None:
    """The master answers a protocol error, then closes the connection."""
    with pytest.raises(RemoteError) as e:
        master.call(Packets.AskBeginInPartition, partition, timeout=TIMEOUT)
    assert e.value.code is ErrorCodes.PROTOCOL_ERROR and why in e.value.message
    with pytest.raises(ConnectionClosed):
        master.call(Packets.AskLastTransaction, timeout=TIMEOUT)


def test_begin_in_a_partition_is_checked(spread_cluster):
    cluster = spread_cluster
    client = Storage(**cluster.client_kwargs())
    try:
        (ttid,) = client.app.get_master().call(Packets.AskBeginInPartition, 7,
                                               timeout=TIMEOUT)
        assert u64(ttid) % PARTITIONS == 7
        _refused(client.app.get_master(), PARTITIONS, "invalid partition 12")
    finally:
        client.close()
    # a client without the feature may not use it
    client = Storage(**cluster.client_kwargs(), features=False)
    try:
        _refused(client.app.get_master(), 0, "unexpected AskBeginInPartition")
    finally:
        client.close()
    # the master goes on serving
    db = ZODB.DB(Storage(**cluster.client_kwargs()))
    try:
        tm = transaction.TransactionManager()
        tm.get()
        db.open(tm).root()["x"] = 1
        tm.commit()
    finally:
        db.close()
