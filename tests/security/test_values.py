"""Values out of range are refused before they touch any state, a failing
request releases what it took, listings are capped, read-only nodes refuse
writes."""
from __future__ import annotations

import hashlib

import pytest
from rawpeer import Client, commit_one, huge, load

from neozodb.net.endpoint import RemoteError
from neozodb.protocol import ErrorCodes, Packets, p64, u64
from neozodb.protocol.values import LIST_CAP

pytestmark = pytest.mark.timeout(180)


def test_store_with_out_of_range_serial_leaves_no_lock(cluster):
    """Before: the lock was taken, then the backend failed on the
    back-pointer (OverflowError): the connection closed and the object
    stayed locked until the storage restarted (every later store of it
    waited forever)."""
    oid, serial = commit_one(cluster, b"v1")
    hostile = Client(cluster)
    try:
        ttid = hostile.begin()
        nid = hostile.cells(oid)[0]
        with pytest.raises(RemoteError) as e:
            # the right serial: the lock is granted (a wrong one is a conflict)
            hostile.conn(nid).call(Packets.AskStoreObject, oid, serial, 0,
                                   hashlib.sha1(b"x").digest(), b"x", huge(), ttid, timeout=10)
        assert e.value.code is ErrorCodes.PROTOCOL_ERROR
        assert "out of range" in e.value.message
        hostile.master.notify(Packets.AbortTransaction, ttid, [])
    finally:
        hostile.close()
    commit_one(cluster, b"v2", oid)  # would wait for the lock forever
    assert load(cluster, oid) == b"v2"


@pytest.mark.parametrize("field", ["oid", "serial", "ttid"])
def test_store_of_ids_beyond_63_bits_is_a_protocol_error(cluster, field):
    client = Client(cluster)
    try:
        ttid = client.begin()
        oid = client.new_oid()
        args = {"oid": oid, "serial": bytes(8), "ttid": ttid}
        args[field] = huge()
        nid = client.cells(oid)[0]
        conn = client.conn(nid)
        with pytest.raises(RemoteError) as e:
            conn.call(Packets.AskStoreObject, args["oid"], args["serial"], 0,
                      hashlib.sha1(b"x").digest(), b"x", None, args["ttid"], timeout=10)
        assert e.value.code is ErrorCodes.PROTOCOL_ERROR and field in e.value.message
    finally:
        client.close()
    oid, _ = commit_one(cluster, b"still fine")
    assert load(cluster, oid) == b"still fine"


def test_unknown_compression_is_refused(cluster):
    """Before: stored as given, and then nobody could load the object."""
    client = Client(cluster)
    try:
        ttid = client.begin()
        oid = client.new_oid()
        with pytest.raises(RemoteError) as e:
            client.store(ttid, oid, b"zzz", compression=7)
        assert e.value.code is ErrorCodes.PROTOCOL_ERROR and "compression" in e.value.message
    finally:
        client.close()
    commit_one(cluster, b"readable", oid)
    assert load(cluster, oid) == b"readable"


def test_finish_with_oid_beyond_63_bits_is_refused(cluster):
    """Before: the master took it as the greatest OID given, and the next
    AskNewOIDs could not be answered."""
    client = Client(cluster)
    try:
        ttid = client.begin()
        with pytest.raises(RemoteError) as e:
            client.finish(ttid, [huge(0x80)])
        assert e.value.code is ErrorCodes.PROTOCOL_ERROR
    finally:
        client.close()
    client = Client(cluster)
    try:
        (oids,) = client.master.call(Packets.AskNewOIDs, 1, timeout=10)
        assert u64(oids[0]) < 1 << 32
    finally:
        client.close()


def test_listings_are_capped(cluster):
    """One request cannot make a storage build an answer of any size."""
    from ZODB.Connection import TransactionMetaData

    from neozodb.client import Storage
    partitions = cluster.partitions
    storage = Storage(cluster.masters, cluster.name)
    try:
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        # LIST_CAP + 1 objects in partition 0
        oids = [p64(partitions * (i + 1)) for i in range(LIST_CAP + 1)]
        for oid in oids:
            storage.store(oid, bytes(8), b"o", "", txn)
        storage.tpc_vote(txn)
        tid = storage.tpc_finish(txn)
        app = storage.app
        conn = app.storage_conn(app.readable_nids(oids[0])[0])
        next_oid, listed = conn.call(Packets.AskOIDsFrom, 0, 10 ** 9, bytes(8), tid, timeout=60)
        assert list(listed) == oids[:LIST_CAP]
        assert u64(listed[-1]) < u64(next_oid) <= u64(oids[-1])  # where to go on from
        # the undo log is not read back further than MAX_UNDO_OFFSET
        with pytest.raises(RemoteError) as e:
            conn.call(Packets.AskTIDs, 0, 10 ** 12, 0, timeout=10)
        assert e.value.code is ErrorCodes.PROTOCOL_ERROR
    finally:
        storage.close()


def _restart_with(cluster, node, option):
    proc = cluster.nodes[node]
    proc.kill()
    proc.argv.append(option)
    proc.start()
    cluster.wait_state("RUNNING", 60)


def test_read_only_master_refuses_every_write(one_storage):
    cluster = one_storage
    oid, _ = commit_one(cluster, b"before")
    _restart_with(cluster, "M1", "--read-only")
    client = Client(cluster)
    try:
        for packet, args in ((Packets.AskBeginTransaction, (None,)),
                             (Packets.AskNewOIDs, (1,)),
                             (Packets.AskFinishTransaction, (bytes(8), [], [], [], None)),
                             (Packets.FailedVote, (bytes(8), []))):
            with pytest.raises(RemoteError) as e:
                client.master.call(packet, *args, timeout=10)
            assert e.value.code is ErrorCodes.READ_ONLY_ACCESS, packet.name
    finally:
        client.close()
    assert load(cluster, oid) == b"before"  # reads are served


def test_read_only_storage_refuses_writes_from_clients(one_storage):
    cluster = one_storage
    oid, _ = commit_one(cluster, b"before")
    _restart_with(cluster, "S1", "--read-only")
    client = Client(cluster)
    try:
        ttid = client.begin()  # the master is not read-only
        with pytest.raises(RemoteError) as e:
            client.store(ttid, oid, b"after")
        assert e.value.code is ErrorCodes.READ_ONLY_ACCESS
        nid = client.cells(ttid)[0]
        with pytest.raises(RemoteError) as e:
            client.conn(nid).call(Packets.AskStoreTransaction, ttid, b"", b"", b"", [], None,
                                  timeout=10)
        assert e.value.code is ErrorCodes.READ_ONLY_ACCESS
        client.master.notify(Packets.AbortTransaction, ttid, [])
    finally:
        client.close()
    assert load(cluster, oid) == b"before"


def test_a_burst_of_stores_with_an_id_beyond_63_bits(cluster):
    """Stores that arrive together are prefetched together (storage/
    writes.py): one with an oid beyond 63 bits among them is refused like a
    lone one, after the valid ones before it are served, and is not an
    internal error of the storage (found by the fuzzer)."""
    client = Client(cluster)
    try:
        ttid = client.begin()
        oids = [client.new_oid() for _ in range(3)]
        nid = client.cells(oids[0])[0]
        conn = client.conn(nid)
        queue = None
        for oid in oids[:2] + [huge()] + oids[2:]:
            queue = conn.ask(Packets.AskStoreObject, oid, bytes(8), 0, hashlib.sha1(b"x").digest(),
                             b"x", None, ttid, queue=queue, token=oid, buffer=True)
        conn.flush()
        answers = {}
        while len(answers) < 4:
            token, result, error, _ = queue.get(timeout=10)
            answers[token] = error if error is not None else result
        assert answers[oids[0]] == (None,) and answers[oids[1]] == (None,)
        refused = answers[huge()]
        assert isinstance(refused, RemoteError) and refused.code is ErrorCodes.PROTOCOL_ERROR
        assert "out of range" in refused.message
    finally:
        client.close()
    node = cluster.nodes["S%d" % (nid & 0xffff)]
    with open(node.logfile) as f:
        assert "error handling" not in f.read()
    oid, _ = commit_one(cluster, b"still fine")
    assert load(cluster, oid) == b"still fine"
