"""Solo votes (feature solo-vote): the early vote of a transaction sent to
one storage alone is answered without being committed (nor synced); the
lock's commit and sync make it durable.  A storage that sees another cell
where the transaction writes commits and syncs before answering, as for
any vote.  What is observed: the storage's "group commit: N syncs for M
durable points" line at its stop, and the database file as another SQLite
connection sees it."""
from __future__ import annotations

import re
import sqlite3

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping
from rawpeer import Client, load

from neozodb.client import Storage
from neozodb.protocol import Packets

pytestmark = pytest.mark.timeout(180)
TIMEOUT = 30
COMMITS = 30
GROUP = re.compile(rb"group commit: (\d+) syncs for (\d+) durable points")


def _durable_points(cluster, names=("S1",)) -> list[tuple[int, int]]:
    """Stop the cluster cleanly; (syncs, durable points) each storage logged."""
    cluster.stop()
    counts = []
    for name in names:
        node = cluster.nodes[name]
        with open(node.logfile, "rb") as f:
            found = GROUP.findall(f.read())
        assert found, "no group commit line in %s" % node.logfile
        counts.append(tuple(map(int, found[-1])))
    return counts


def _one_object_commits(cluster) -> tuple[int, int]:
    """COMMITS one-object commits through ZODB; the client's early votes
    (taken, refused)."""
    db = ZODB.DB(Storage(**cluster.client_kwargs()))
    try:
        tm = transaction.TransactionManager()
        root = db.open(tm).root()
        root["m"] = PersistentMapping()
        tm.commit()
        for i in range(COMMITS):
            root["m"]["x"] = i
            tm.commit()
        return db.storage.app.early_votes
    finally:
        db.close()


def test_one_sync_per_commit_alone_on_a_storage(one_storage):
    taken, refused = _one_object_commits(one_storage)
    assert taken >= COMMITS and refused == 0
    ((syncs, points),) = _durable_points(one_storage)
    # two durable points a commit (vote, lock) without solo votes: at
    # least 2 * COMMITS; with them, the locks (and the cluster's own few)
    assert points < COMMITS + 10, (syncs, points)
    assert syncs <= points


def _voted_rows(cluster, i: int, ttid: bytes) -> int:
    """The vote's rows committed in storage i's database (what another
    connection, or the disk after a crash, sees)."""
    db = sqlite3.connect("file:%s?mode=ro" % cluster.database(i), uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM tobj WHERE tid=?",
                          (int.from_bytes(ttid, "big"),)).fetchone()[0]
    finally:
        db.close()


def test_solo_vote_is_committed_by_its_lock(one_storage):
    client = Client(one_storage)
    try:
        oid = client.new_oid()
        ttid = client.begin()
        client.store(ttid, oid, b"data")
        (nid,) = client.cells(ttid)
        client.conn(nid).call(Packets.AskSoloVote, ttid, b"", b"", b"", [oid], None,
                              timeout=TIMEOUT)
        assert _voted_rows(one_storage, 1, ttid) == 0  # answered, not committed
        client.finish(ttid, [oid])
        assert load(one_storage, oid) == b"data"
    finally:
        client.close()


def _vote_on_both(cluster, packet) -> list[int]:
    """A one-object transaction of a raw client on a cluster of 2 storages
    with replicas 1, voted with ``packet`` on each: the vote's rows in each
    database once both answered; then finished, and read back."""
    client = Client(cluster)
    try:
        oid = client.new_oid()
        ttid = client.begin()
        client.store(ttid, oid, b"data")  # on both storages (replicas 1)
        nids = client.cells(ttid)
        assert len(nids) == 2
        for nid in nids:
            client.conn(nid).call(packet, ttid, b"", b"", b"", [oid], None, timeout=TIMEOUT)
        rows = [_voted_rows(cluster, i, ttid) for i in (1, 2)]
        client.finish(ttid, [oid])
        assert load(cluster, oid) == b"data"
    finally:
        client.close()
    return rows


def test_solo_vote_where_another_cell_is_synced_first(cluster):
    """A client that calls a transaction solo where the storage's table
    shows a replica: that storage syncs before it answers."""
    assert _vote_on_both(cluster, Packets.AskSoloVote) == [1, 1]  # committed
    # the vote and the lock, each synced before its answer (nothing else
    # of the cluster's start goes through the group commit)
    assert [points for _, points in _durable_points(cluster, ("S1", "S2"))] == [2, 2]
