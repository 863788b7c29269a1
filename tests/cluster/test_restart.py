"""A cluster stopped and started again: storages keep their NID, the
partition table and every committed transaction."""
from __future__ import annotations

import pytest
import transaction
import ZODB

from neozodb.client import Storage

pytestmark = pytest.mark.timeout(180)


def test_stop_and_restart_keeps_everything(cluster):
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    conn = db.open()
    root = conn.root()
    for i in range(50):
        root["k%d" % i] = "value %d" % i
        transaction.commit()
    last = db.lastTransaction()
    db.close()
    pt_before = cluster.pt_lines()
    cluster.stop()
    assert all(not n.running for n in cluster.nodes.values())
    for node in cluster.nodes.values():
        node.start()
    cluster.wait_state("RUNNING", 60)
    assert cluster.pt_lines() == pt_before  # same NIDs, same cells, same ptid
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    try:
        assert db.lastTransaction() == last
        root = db.open().root()
        assert {k: root[k] for k in root} == {"k%d" % i: "value %d" % i for i in range(50)}
        root["after"] = "restart"
        transaction.commit()
        assert db.lastTransaction() > last
    finally:
        db.close()


def test_killed_storages_restart_with_the_data(cluster):
    """SIGKILL every node after commits: what was acknowledged is there."""
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    conn = db.open()
    root = conn.root()
    for i in range(20):
        root["n"] = i
        transaction.commit()
    last = db.lastTransaction()
    db.close()
    cluster.kill()
    for node in cluster.nodes.values():
        node.start()
    cluster.wait_state("RUNNING", 60)
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    try:
        assert db.lastTransaction() == last
        assert db.open().root()["n"] == 19
    finally:
        db.close()


def test_storage_restarted_while_running_rejoins(cluster):
    """With replicas 1, losing one storage keeps the cluster running; the
    storage, restarted, is accepted again, commits, including ones that
    check their reads, go on, and replication brings its cells up to date."""
    from neozodb.cli.cluster import wait_until
    from neozodb.protocol import NodeStates

    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        root = conn.root()
        from persistent.mapping import PersistentMapping
        root["a"] = 1
        root["m"] = PersistentMapping(x=1)
        tm.commit()
        # S2 locks this one only after unlocking the previous one: once it
        # is committed, S2 surely has m
        root["barrier"] = 1
        tm.commit()
        cluster.nodes["S2"].kill()
        wait_until(lambda: cluster.storage_state("S2") is NodeStates.DOWN, 30, "S2 down")
        assert cluster.cluster_state() == "RUNNING"
        root["a"] = 2
        root["m"]["x"] = 2  # S2 misses this revision
        tm.commit()
        cluster.nodes["S2"].start()
        wait_until(lambda: cluster.storage_state("S2") is NodeStates.RUNNING, 30, "S2 back")
        conn.readCurrent(root["m"])  # checked on S1, and on S2 once it caught up
        root["b"] = 3
        tm.commit()
        tm.begin()
        assert (root["a"], root["b"]) == (2, 3)
        # replication brings S2 up to date by itself
        wait_until(lambda: cluster.pt_lines()[1:] == ["S1 R " + "U" * 12, "S2 R " + "U" * 12],
                   30, "S2 up to date")
    finally:
        db.close()
