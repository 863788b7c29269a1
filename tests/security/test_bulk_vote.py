"""Bulk copies (feature bulk-copy) message by message: a well-formed batch
is committed transaction by transaction; a malformed AskBulkVote closes
that client's connection with a logged reason and loses nothing; the
master refuses a batch whose TIDs are not after the cluster's or not those
begun; a storage whose partitions are not all on the same storages refuses
the vote (NOT_READY) and the client may go on."""
from __future__ import annotations

import hashlib
import time

import pytest
from rawpeer import TIMEOUT, Client, commit_one, load

from neozodb.cli.cluster import LocalCluster, wait_until
from neozodb.net.endpoint import RemoteError
from neozodb.protocol import ErrorCodes, NodeStates, Packets, p64, u64
from neozodb.tid import tid_from_time

pytestmark = pytest.mark.timeout(180)


def _batch(client: Client, n: int = 3) -> tuple[bytes, list, list[bytes]]:
    """``n`` transactions storing one new object each, with TIDs after
    the cluster's last: (ttid, transactions, oids)."""
    base = max(u64(client.storage.lastTransaction()), tid_from_time(time.time() - 60))
    oids = [client.new_oid() for _ in range(n)]
    txns = []
    for i, oid in enumerate(oids):
        data = b"bulk %d" % i
        txns.append((p64(base + 1 + i), b"user", b"copy %d" % i, b"",
                     [(oid, 0, hashlib.sha1(data).digest(), data, None)]))
    return txns[-1][0], txns, oids


def _bulk(client: Client, ttid: bytes, txns: list, oids: list[bytes]) -> bytes:
    master = client.master
    (began,) = master.call(Packets.AskBulkBegin, txns[0][0], ttid, timeout=TIMEOUT)
    assert began == ttid
    for nid in client.cells(ttid):
        client.conn(nid).call(Packets.AskBulkVote, ttid, txns, timeout=TIMEOUT)
    _, tid = master.call(Packets.AskBulkFinish, ttid, [(t[0], [o]) for t, o in zip(
        txns, oids, strict=True)], timeout=TIMEOUT)
    return tid


def test_a_batch_is_committed_transaction_by_transaction(cluster):
    client = Client(cluster)
    try:
        ttid, txns, oids = _batch(client)
        assert _bulk(client, ttid, txns, oids) == ttid
        for i, (txn, oid) in enumerate(zip(txns, oids, strict=True)):
            assert load(cluster, oid) == b"bulk %d" % i
            info = client.storage.app.ask_storage(
                txn[0], Packets.AskTransactionInformation, txn[0])
            assert info[2] == b"copy %d" % i and list(info[-1]) == [oid]
    finally:
        client.close()


def _reorder(txns):
    return [txns[1], txns[0], txns[2]]


def _twice(txns):
    tid, user, description, ext, records = txns[1]
    return [txns[0], (tid, user, description, ext, records * 2), txns[2]]


def _corrupt(txns):
    tid, user, description, ext, [(oid, compression, checksum, data, serial)] = txns[1]
    return [txns[0], (tid, user, description, ext,
                      [(oid, compression, checksum, data + b"!", serial)]), txns[2]]


def _blob(txns):
    tid, user, description, ext, [(oid, compression, checksum, data, serial)] = txns[1]
    return [txns[0], (tid, user, description, ext,
                      [(oid, compression | 0x80, checksum, data, serial)]), txns[2]]


@pytest.mark.parametrize("spoil, why", [
    (_reorder, "not in order"), (_twice, "an object twice"), (_corrupt, "wrong checksum"),
    (_blob, "blob record"), (lambda txns: txns[:2], "does not end with its TTID"),
    (lambda txns: [], "without transactions")],
    ids=["reordered", "object-twice", "bad-checksum", "blob", "not-ending-at-ttid", "empty"])
def test_malformed_bulk_vote_closes_the_connection_and_loses_nothing(cluster, spoil, why):
    client = Client(cluster)
    try:
        ttid, txns, oids = _batch(client)
        nid = client.cells(ttid)[0]
        conn = client.conn(nid)
        with pytest.raises(RemoteError) as e:
            conn.call(Packets.AskBulkVote, ttid, spoil(txns), timeout=TIMEOUT)
        assert e.value.code is ErrorCodes.PROTOCOL_ERROR and why in e.value.message
        wait_until(lambda: conn.closed, 10, "the storage closing the connection")
        # nothing of it stayed: the same batch, well-formed, goes through
        assert _bulk(client, ttid, txns, oids) == ttid
        assert load(cluster, oids[1]) == b"bulk 1"
    finally:
        client.close()
    assert cluster.storage_state("S1") is NodeStates.RUNNING
    assert cluster.storage_state("S2") is NodeStates.RUNNING
    commit_one(cluster, b"others still commit")


def test_master_refuses_batches_not_after_the_cluster_or_not_begun(cluster):
    client = Client(cluster)
    try:
        _, last = commit_one(cluster, b"before")
        master = client.master
        for first, end in ((last, p64(u64(last) + 5)),  # not after the last TID
                           (p64(u64(last) + 6), p64(u64(last) + 5))):  # not in order
            with pytest.raises(RemoteError) as e:
                master.call(Packets.AskBulkBegin, first, end, timeout=TIMEOUT)
            assert e.value.code is ErrorCodes.DENIED
        ttid, txns, oids = _batch(client)
        master.call(Packets.AskBulkBegin, txns[0][0], ttid, timeout=TIMEOUT)
        for nid in client.cells(ttid):
            client.conn(nid).call(Packets.AskBulkVote, ttid, txns, timeout=TIMEOUT)
        # an ordinary transaction is not finished as a batch
        other = client.begin()
        with pytest.raises(RemoteError) as e:
            master.call(Packets.AskBulkFinish, other, [(other, [])], timeout=TIMEOUT)
        assert e.value.code is ErrorCodes.DENIED
        # the transactions named must be those begun: a protocol error
        with pytest.raises(RemoteError) as e:
            master.call(Packets.AskBulkFinish, ttid, [(t[0], []) for t in txns[1:]],
                        timeout=TIMEOUT)
        assert e.value.code is ErrorCodes.PROTOCOL_ERROR
    finally:
        client.close()
    # the batch was aborted with its client's connection: the master and
    # the storages go on
    commit_one(cluster, b"after")


def test_storage_refuses_a_batch_across_storages(tmp_path):
    """2 storages without replicas: the partitions of a batch whose
    objects are on both are not on the same storages."""
    cluster = LocalCluster(str(tmp_path / "cluster"), name="test", storages=2, replicas=0,
                           partitions=6).start_or_kill()
    client = Client(cluster)
    try:
        ttid, txns, oids = _batch(client, 6)
        assert {nid for oid in oids for nid in client.cells(oid)} == {1, 2}
        conn = client.conn(client.cells(ttid)[0])
        with pytest.raises(RemoteError) as e:
            conn.call(Packets.AskBulkVote, ttid, txns, timeout=TIMEOUT)
        assert e.value.code is ErrorCodes.NOT_READY
        conn.call(Packets.Ping, timeout=TIMEOUT)  # still open
    finally:
        client.close()
        cluster.kill()
