"""Lazy votes (feature lazy-vote): the vote of a transaction sent whole to
each of its storages is answered without being committed (nor synced);
each storage's lock commits and syncs it.  What is observed, as for solo
votes (test_solo_vote.py): the storages' "group commit: N syncs for M
durable points" line at their stop, and the database files as another
SQLite connection sees them."""
from __future__ import annotations

import pytest
from test_solo_vote import COMMITS, _durable_points, _one_object_commits, _vote_on_both
from ZODB.Connection import TransactionMetaData

from neozodb.cli.cluster import LocalCluster
from neozodb.client import Storage
from neozodb.protocol import Packets

pytestmark = pytest.mark.timeout(180)


def test_one_sync_per_commit_on_each_replica(cluster):
    _one_object_commits(cluster)
    # two durable points a commit on each storage (vote, lock) without
    # lazy votes: at least 2 * COMMITS; with them, the locks
    for syncs, points in _durable_points(cluster, ("S1", "S2")):
        assert COMMITS <= points < COMMITS + 10, (syncs, points)


def test_lazy_vote_is_committed_by_the_locks(cluster):
    assert _vote_on_both(cluster, Packets.AskLazyVote) == [0, 0]  # not committed
    # the locks alone went through the group commit
    assert [points for _, points in _durable_points(cluster, ("S1", "S2"))] == [1, 1]


def test_a_transaction_across_different_storages_votes_with_syncs(tmp_path):
    """3 storages, replicas 1: a transaction whose two objects are on
    different pairs of storages did not go whole to the storages of its
    metadata, which must then sync their votes (one that locks it may lack
    the other object)."""
    cluster = LocalCluster(str(tmp_path / "cluster"), name="test", storages=3, replicas=1,
                           partitions=6)
    try:
        cluster.start(wait=60)
        storage = Storage(**cluster.client_kwargs())
        try:
            oids = [storage.new_oid() for _ in range(12)]
            app = storage.app
            a = oids[0]
            b = next(o for o in oids if app.writable_cells(o) != app.writable_cells(a))
            assert len(set(app.writable_cells(a)) | set(app.writable_cells(b))) == 3
            serials = {a: b"\0" * 8, b: b"\0" * 8}
            for i in range(COMMITS):
                txn = TransactionMetaData()
                storage.tpc_begin(txn)
                for oid in (a, b):
                    storage.store(oid, serials[oid], b"%d" % i, "", txn)
                storage.tpc_vote(txn)
                tid = storage.tpc_finish(txn)
                serials = dict.fromkeys(serials, tid)
        finally:
            storage.close()
        points = sum(p for _, p in _durable_points(cluster, ("S1", "S2", "S3")))
        # each commit: a vote and a lock on each of the 3 storages
        assert points >= 6 * COMMITS, points
    finally:
        cluster.kill()
