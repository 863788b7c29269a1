"""neoctl truncate TID: the cluster forgets every transaction committed
after TID, on every storage, and clients follow."""
from __future__ import annotations

import os
import sqlite3
import threading

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping

from neozodb.cli.cluster import wait_until
from neozodb.client import Storage
from neozodb.protocol import NodeStates, p64, u64
from neozodb.tid import neo_tid_time
from replicas import config_value, raw_contents

pytestmark = pytest.mark.timeout(240)


def neoctl(cluster, *words):
    """run_command's (lines, value), or the refusal's message."""
    return cluster.neoctl(*words, refusal=True)


def ids(cluster) -> dict:
    return neoctl(cluster, "print", "ids")[1]


def truncated_and_running(cluster, tid: bytes) -> bool:
    if cluster.cluster_state() != "RUNNING":
        return False
    answer = neoctl(cluster, "print", "ids")
    return isinstance(answer, tuple) and answer[1]["last_tid"] == u64(tid)


def logged(node, text: str) -> bool:
    """Whether the current run of ``node`` logged ``text``."""
    with open(node.logfile, "rb") as f:
        f.seek(node.log_offset)
        return text.encode() in f.read()


def commit_ten(db):
    """Ten transactions changing the root and a child object; returns the
    transaction manager and connection used, the tids and the state (root
    and child) after each."""
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    root = conn.root()
    root["m"] = PersistentMapping(x=-1)
    tm.commit()
    tids, states = [], []
    for i in range(10):
        root["n"] = i
        root["k%d" % i] = i
        root["m"]["x"] = i
        tm.commit()
        tids.append(db.lastTransaction())
        states.append(({k: v for k, v in root.items() if k != "m"}, dict(root["m"])))
    return tm, conn, tids, states


def state_of(root) -> tuple[dict, dict]:
    return {k: v for k, v in root.items() if k != "m"}, dict(root["m"])


def storage_db(cluster, i: int) -> str:
    return os.path.join(cluster.directory, "storage%d.sqlite" % i)


def read_only(path: str, sql: str) -> list:
    """Query a running storage's database (WAL: readers do not block it)."""
    conn = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def pending_truncation(path: str) -> int | None:
    rows = read_only(path, "SELECT value FROM config WHERE name='truncate_tid'")
    return int(rows[0][0]) if rows else None


def contents(path: str) -> dict:
    """Every committed transaction and object revision of a stopped
    storage (raw SQL: tests/replicas.py); no truncation pending."""
    assert config_value(path, "truncate_tid") is None
    return raw_contents(path)


def all_tids(content: dict) -> set[int]:
    return {tid for trans, _ in content.values() for tid in trans}


def all_up_to_date(cluster) -> bool:
    return cluster.pt_lines()[1:] == ["S1 R " + "U" * 12, "S2 R " + "U" * 12]


def test_truncate(cluster):
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    fresh = None
    try:
        tm, conn, tids, states = commit_ten(db)
        tid5, last = tids[4], tids[-1]
        m_oid = conn.root()["m"]._p_oid
        storage = db.storage
        # an old revision in the client cache: it ends at tids[7]
        assert storage.loadBefore(m_oid, tids[7])[1:] == (tids[6], tids[7])

        # refusals: at or after the last transaction, not a TID
        for tid in (last, p64(u64(last) + 1)):
            assert neoctl(cluster, "truncate", "tid:%#x" % u64(tid)) == \
                "truncating after the last transaction does nothing"
        assert neoctl(cluster, "truncate", "tid:0") == \
            "cannot truncate at tid 0x0: that would delete every transaction"
        assert neoctl(cluster, "truncate") == "usage: truncate TID"
        assert neoctl(cluster, "truncate", "%#x" % u64(tid5)) == (
            "invalid TID or time: '%#x' (write a TID as tid:%#x)" % (u64(tid5), u64(tid5)))
        assert ids(cluster)["last_tid"] == u64(last)

        assert neoctl(cluster, "truncate", "tid:%#x" % u64(tid5)) == (
            [], {"ok": True, "truncate_tid": u64(tid5)})
        wait_until(lambda: truncated_and_running(cluster, tid5), 60, "the truncation")
        lines, value = neoctl(cluster, "print", "ids")
        assert lines[1].startswith("last_tid = %#x (" % u64(tid5))
        assert len(lines) == 3 and value["truncate_tid"] is None  # nothing pending

        # a new client sees the database as it was at tid5
        fresh = ZODB.DB(Storage(cluster.masters, cluster.name))
        assert fresh.lastTransaction() == tid5
        ftm = transaction.TransactionManager()
        froot = fresh.open(ftm).root()
        assert state_of(froot) == states[4]

        # the client that stayed open too, once it syncs: nothing stale in
        # its caches, current revisions or older ones
        tm.begin()
        root = conn.root()
        assert db.lastTransaction() == tid5
        assert state_of(root) == states[4]
        assert "k9" not in root
        assert storage.loadBefore(m_oid, tids[7])[1:] == (tid5, None)
        assert storage.load(m_oid)[1] == tid5

        # commits go on after tid5, and everybody sees them
        root["n"] = "after"
        root["m"]["x"] = "after"
        tm.commit()
        new = db.lastTransaction()
        assert new > last > tid5
        ftm.begin()
        assert (froot["n"], froot["m"]["x"]) == ("after", "after")
        assert fresh.lastTransaction() == new
        assert ids(cluster)["last_tid"] == u64(new)
        # new objects: the OIDs the old client was given before the
        # truncation (beyond the last one stored at tid5) are not handed
        # out twice
        froot["b"] = PersistentMapping(by="fresh")
        ftm.commit()
        tm.begin()
        root["a"] = PersistentMapping(by="db")
        tm.commit()
        assert root["a"]._p_oid != froot["b"]._p_oid
        ftm.begin()
        assert (dict(froot["a"]), dict(froot["b"])) == ({"by": "db"}, {"by": "fresh"})
    finally:
        db.close()
        if fresh is not None:
            fresh.close()


def test_a_client_that_reconnects_before_its_reader_reports_the_loss(one_storage):
    """The client's application thread may see the master connection closed
    (it read the StopOperation itself) and connect again before the reader
    thread reports the loss: the truncation must be seen all the same."""
    cluster = one_storage
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    try:
        tm, conn, tids, states = commit_ten(db)
        app = db.storage.app
        old = app.master
        reported, release = threading.Event(), threading.Event()
        lost = old.handler.connection_lost

        def late_report(c):
            reported.set()
            release.wait(60)
            lost(c)
        old.handler.connection_lost = late_report
        try:
            assert neoctl(cluster, "truncate", "tid:%#x" % u64(tids[4]))[0] == []
            wait_until(lambda: truncated_and_running(cluster, tids[4]), 60, "the truncation")
            assert reported.wait(30)  # the reader thread holds the report back
            tm.begin()
            assert app.master is not old
            assert db.lastTransaction() == tids[4]
            assert state_of(conn.root()) == states[4]
        finally:
            release.set()
    finally:
        db.close()


def test_truncate_waits_for_a_storage_that_is_down(cluster):
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    try:
        tm, conn, tids, states = commit_ten(db)
    finally:
        db.close()
    tid5 = tids[4]
    cluster.nodes["S2"].kill()  # it has all ten: its copy must be truncated too
    wait_until(lambda: cluster.storage_state("S2") is NodeStates.DOWN, 30, "S2 down")
    assert cluster.cluster_state() == "RUNNING"
    assert neoctl(cluster, "truncate", "tid:%#x" % u64(tid5))[0] == []
    # S1 persists the truncation; then nothing starts without S2
    wait_until(lambda: pending_truncation(storage_db(cluster, 1)) == u64(tid5), 30,
               "S1 to persist the truncation")
    wait_until(lambda: logged(cluster.nodes["M1"], "S1 persisted the truncation"), 30,
               "the master to know it")
    lines, value = neoctl(cluster, "print", "ids")
    expected = "truncate_tid = %#x (%s)" % (u64(tid5), neo_tid_time(u64(tid5)))
    assert lines[3] == expected
    assert value["truncate_tid"] == u64(tid5)
    assert cluster.cluster_state() == "RECOVERING"
    assert neoctl(cluster, "truncate", "tid:%#x" % u64(tids[2])) == \
        "cluster is RECOVERING, not RUNNING"

    # a new master learns the pending truncation from S1, and waits too
    master = cluster.nodes["M1"]
    master.kill()
    master.start()
    wait_until(lambda: logged(master, "storages report a pending truncation after %#x"
                              % u64(tid5)), 30, "the new master to know")
    # (once the admin is connected to it)
    lines, value = wait_until(lambda: (lambda r: isinstance(r, tuple) and r)(
        neoctl(cluster, "print", "ids")), 30, "the admin to follow the new master")
    assert (lines[3], value["truncate_tid"]) == (expected, u64(tid5))
    assert cluster.cluster_state() == "RECOVERING"

    cluster.nodes["S2"].start()
    wait_until(lambda: truncated_and_running(cluster, tid5), 60, "the truncation")
    wait_until(lambda: all_up_to_date(cluster), 60, "S2 up to date")
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    try:
        assert db.lastTransaction() == tid5
        assert state_of(db.open().root()) == states[4]
    finally:
        db.close()
    cluster.stop()
    s1, s2 = contents(storage_db(cluster, 1)), contents(storage_db(cluster, 2))
    assert max(all_tids(s2)) == u64(tid5)
    assert s1 == s2


def test_truncate_started_without_a_storage(cluster):
    """`neoctl start` lets a truncation go on without a storage; the one
    that missed it truncates its copy when it comes back, then catches up."""
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    try:
        tm, conn, tids, states = commit_ten(db)
        tid5 = tids[4]
        cluster.nodes["S2"].kill()
        wait_until(lambda: cluster.storage_state("S2") is NodeStates.DOWN, 30, "S2 down")
        assert neoctl(cluster, "truncate", "tid:%#x" % u64(tid5))[0] == []
        wait_until(lambda: logged(cluster.nodes["M1"], "S1 persisted the truncation"), 30,
                   "S1 to persist the truncation")
        assert cluster.cluster_state() == "RECOVERING"
        assert neoctl(cluster, "start") == ([], {"ok": True})
        wait_until(lambda: truncated_and_running(cluster, tid5), 60, "the truncation")
        tm.begin()
        root = conn.root()
        assert state_of(root) == states[4]
        root["n"] = "without S2"
        tm.commit()
        new = db.lastTransaction()
        assert new > tids[-1]
    finally:
        db.close()
    cluster.nodes["S2"].start()
    wait_until(lambda: all_up_to_date(cluster), 60, "S2 up to date")
    cluster.stop()
    s1, s2 = contents(storage_db(cluster, 1)), contents(storage_db(cluster, 2))
    assert s1 == s2
    assert not all_tids(s2) & {u64(t) for t in tids[5:]}
    assert max(all_tids(s2)) == u64(new)
