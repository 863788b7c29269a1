"""A transaction belongs to the client that began it: other clients cannot
abort, vote, finish, fail or store into it; a storage never says "locked"
for a transaction it dropped; an imposed TID is bounded."""
from __future__ import annotations

import hashlib
import time

import pytest
from rawpeer import Client, commit_one, load

from neozodb.net.endpoint import RemoteError
from neozodb.protocol import ErrorCodes, NodeStates, Packets, p64, u64
from neozodb.tid import tid_from_time

pytestmark = pytest.mark.timeout(180)


def _voted(owner: Client, data: bytes) -> tuple[bytes, bytes, list[int]]:
    """A transaction of ``owner`` storing one new object, voted:
    (ttid, oid, storages involved)."""
    oid = owner.new_oid()
    ttid = owner.begin()
    owner.store(ttid, oid, data)
    return ttid, oid, owner.vote(ttid, [oid])


def test_another_client_cannot_abort_a_voted_transaction(cluster):
    """Before: the stranger's abort reached the master and the storages,
    the storages dropped the data, the master still reported the commit."""
    owner, stranger = Client(cluster), Client(cluster)
    try:
        ttid, oid, nids = _voted(owner, b"precious")
        stranger.master.notify(Packets.AbortTransaction, ttid, nids)
        for nid in nids:
            stranger.conn(nid).notify(Packets.AbortTransaction, ttid, [])
        # the stranger's connections carry on (a Ping is answered after the
        # aborts were processed)
        stranger.master.call(Packets.Ping, timeout=10)
        for nid in nids:
            stranger.conn(nid).call(Packets.Ping, timeout=10)
        tid = owner.finish(ttid, [oid])
        assert u64(tid) > 0
        assert load(cluster, oid) == b"precious"
    finally:
        owner.close()
        stranger.close()
    assert cluster.cluster_state() == "RUNNING"


def test_another_client_cannot_finish_fail_or_store_into_a_transaction(cluster):
    owner, stranger = Client(cluster), Client(cluster)
    try:
        ttid, oid, nids = _voted(owner, b"mine")
        with pytest.raises(RemoteError) as e:
            stranger.finish(ttid, [oid])
        assert e.value.code is ErrorCodes.DENIED and "not yours" in e.value.message
        # FailedVote would make the master drop those storages
        with pytest.raises(RemoteError) as e:
            stranger.master.call(Packets.FailedVote, ttid, nids[:1], timeout=10)
        assert e.value.code is ErrorCodes.DENIED
        # a store into it is a protocol error: that connection closes
        conn = stranger.conn(nids[0])
        with pytest.raises(RemoteError) as e:
            conn.call(Packets.AskStoreObject, oid, bytes(8), 0, b"\0" * 20, b"", None, ttid,
                      timeout=10)
        assert e.value.code is ErrorCodes.PROTOCOL_ERROR
        assert "belongs to another client" in e.value.message
        tid = owner.finish(ttid, [oid])
        assert load(cluster, oid) == b"mine"
        assert u64(tid) > 0
    finally:
        owner.close()
        stranger.close()
    assert cluster.storage_state("S1") is NodeStates.RUNNING
    assert cluster.storage_state("S2") is NodeStates.RUNNING
    commit_one(cluster, b"others still commit")


def test_lock_of_a_transaction_the_storages_dropped_is_not_reported_committed(cluster):
    """The owner aborts on the storages only, then asks the master to
    finish: the storages refuse to lock what they no longer hold, and the
    master must not report a commit whose data is gone.  Before: every
    storage answered "locked" and the client was told it committed."""
    owner = Client(cluster)
    try:
        ttid, oid, nids = _voted(owner, b"gone")
        for nid in nids:
            owner.conn(nid).notify(Packets.AbortTransaction, ttid, [])
            owner.conn(nid).call(Packets.Ping, timeout=10)  # the abort was processed
        with pytest.raises(RemoteError) as e:
            owner.finish(ttid, [oid])
        assert e.value.code is ErrorCodes.INCOMPLETE_TRANSACTION
    finally:
        owner.close()
    with pytest.raises(KeyError):
        load(cluster, oid)
    assert cluster.cluster_state() == "RUNNING"
    new_oid, _ = commit_one(cluster, b"after")
    assert load(cluster, new_oid) == b"after"


def test_imposed_tid_far_in_the_future_is_refused(cluster):
    """Before: accepted, and every later TID of the cluster came after it."""
    client = Client(cluster)
    try:
        future = p64(tid_from_time(time.time() + 10 * 365 * 86400))
        with pytest.raises(RemoteError) as e:
            client.begin(future)
        assert e.value.code is ErrorCodes.DENIED and "ahead of the clock" in e.value.message
        with pytest.raises(RemoteError) as e:
            client.begin(b"\xff" * 8)  # beyond 63 bits
        assert e.value.code is ErrorCodes.PROTOCOL_ERROR
    finally:
        client.close()
    _, tid = commit_one(cluster, b"now")
    assert u64(tid) < tid_from_time(time.time() + 60)


def test_idle_imposed_transaction_does_not_block_other_commits(cluster):
    """A client imposing a TID and then doing nothing would hold back
    every later commit forever: it is aborted once commits wait behind it
    (master/commits.py IMPOSED_IDLE)."""
    from neozodb.master.commits import IMPOSED_IDLE
    blocker = Client(cluster)
    try:
        ttid = blocker.begin(p64(tid_from_time(time.time() + 1)))
        start = time.monotonic()
        oid, tid = commit_one(cluster, b"not blocked forever")
        assert time.monotonic() - start < IMPOSED_IDLE * 2 + 10
        assert u64(tid) > u64(ttid)
        assert load(cluster, oid) == b"not blocked forever"
        with pytest.raises(RemoteError):
            blocker.finish(ttid, [])  # aborted meanwhile
    finally:
        blocker.close()


def test_failed_vote_for_a_storage_back_since_the_begin_is_ignored(cluster):
    """A storage that was down at the begin and came back before the stores
    may be in the client's table and fail it: the master used to refuse the
    whole FailedVote (DENIED, "not involved"), which failed the commit.  It
    ignores that storage now; the storage refuses to lock what it never got,
    and the commit completes on the other replica."""
    from neozodb.cli.cluster import wait_until
    from neozodb.protocol import NodeTypes, make_nid
    s1, s2 = (make_nid(NodeTypes.STORAGE, i) for i in (1, 2))
    cluster.storage(2).kill()
    wait_until(lambda: cluster.storage_state("S2") is NodeStates.DOWN, 30, "S2 down")
    owner = Client(cluster)
    try:
        oid = owner.new_oid()
        ttid = owner.begin()
        cluster.storage(2).start()
        wait_until(lambda: cluster.storage_state("S2") is NodeStates.RUNNING, 30, "S2 back")
        data = b"on S1 only"
        s1_conn = owner.conn(s1)
        s1_conn.call(Packets.AskStoreObject, oid, bytes(8), 0, hashlib.sha1(data).digest(),
                     data, None, ttid, timeout=30)
        s1_conn.call(Packets.AskStoreTransaction, ttid, b"user", b"desc", b"", [oid], None,
                     timeout=30)
        owner.master.call(Packets.FailedVote, ttid, [s2], timeout=30)  # DENIED before
        tid = owner.finish(ttid, [oid])
    finally:
        owner.close()
    assert load(cluster, oid) == data
    assert u64(tid) > 0
    wait_until(lambda: cluster.all_up_to_date(), 60, "S2 replicated")
    assert cluster.cluster_state() == "RUNNING"
