"""A storage that lost a transaction locked elsewhere (its vote was not
durable, feature lazy-vote, and the power went before its own lock was) is
outdated by the verification and catches up by replication: it never
serves the revisions before that transaction as current."""
from __future__ import annotations

import os
import signal
import sqlite3

import pytest
from ZODB.utils import p64, u64, z64

from commits import commit, finish_in_thread, locked_in, voted
from neozodb.cli.cluster import LocalCluster, wait_until
from neozodb.client import Storage
from neozodb.protocol.enums import nid_str

pytestmark = pytest.mark.timeout(180)


def edit(path: str, *statements: tuple[str, tuple]) -> None:
    conn = sqlite3.connect(path)
    try:
        with conn:
            for sql, args in statements:
                conn.execute(sql, args)
    finally:
        conn.close()


def relock(path: str, tid: int) -> None:
    """Back to the state of a storage that locked ``tid`` and stopped
    before the unlock: the metadata and objects in ttrans and tobj."""
    conn = sqlite3.connect(path)
    try:
        (ttid,) = conn.execute("SELECT ttid FROM trans WHERE tid=?", (tid,)).fetchone()
    finally:
        conn.close()
    edit(path,
         ("INSERT INTO ttrans (partition, tid, packed, oids, user, description, ext, ttid)"
          " SELECT partition, tid, packed, oids, user, description, ext, ttid FROM trans"
          " WHERE tid=?", (tid,)),
         ("INSERT INTO tobj (partition, oid, tid, data_id, value_tid)"
          " SELECT partition, oid, ?, data_id, value_tid FROM obj WHERE tid=?", (ttid, tid)),
         ("DELETE FROM obj WHERE tid=?", (tid,)),
         ("DELETE FROM trans WHERE tid=?", (tid,)))


def forget(path: str, tid: int) -> None:
    """As a storage whose vote of ``tid`` was lost: no trace of it."""
    edit(path, ("DELETE FROM obj WHERE tid=?", (tid,)), ("DELETE FROM trans WHERE tid=?", (tid,)))


def has_revision(path: str, oid: bytes, tid: int) -> bool:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT 1 FROM obj WHERE oid=? AND tid=?",
                            (u64(oid), tid)).fetchone() is not None
    finally:
        conn.close()


def nid_of(path: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT value FROM config WHERE name='nid'").fetchone()[0])
    finally:
        conn.close()


def all_up_to_date(cluster) -> bool:
    return all(set(row) <= {"U", "."} for row in cluster.cells().values())


def lost_votes(cluster) -> str:
    with open(os.path.join(cluster.directory, "M1.log")) as f:
        return "".join(line for line in f if "lacks transaction" in line)


def test_a_storage_without_a_transaction_locked_elsewhere_catches_up(tmp_path):
    cluster = LocalCluster(str(tmp_path / "cluster"), name="test", storages=2, replicas=1,
                           partitions=4)
    try:
        cluster.start(wait=60)
        storage = Storage(cluster.masters, cluster.name)
        try:
            oid = storage.new_oid()
            serial = commit(storage, oid, b"first", z64)
            tid = u64(commit(storage, oid, b"second", serial))
        finally:
            storage.close()
        cluster.stop()
        s1, s2 = cluster.database(1), cluster.database(2)
        relock(s1, tid)
        forget(s2, tid)
        assert not has_revision(s2, oid, tid)
        cluster.start(wait=60)
        wait_until(lambda: all_up_to_date(cluster), 60, "every cell up to date")
        # S2 was outdated, not left serving "first" as current: it fetched
        # the transaction from S1
        assert has_revision(s1, oid, tid) and has_revision(s2, oid, tid)
        log = lost_votes(cluster)
        assert "%s lacks transaction" % nid_str(nid_of(s2)) in log
        assert "its cells are outdated" in log
        storage = Storage(cluster.masters, cluster.name)
        try:
            assert storage.load(oid) == (b"second", p64(tid))
        finally:
            storage.close()
    finally:
        cluster.kill()


def test_a_lazy_vote_lost_in_a_crash(cluster):
    """2 storages, replicas 1: both vote without a sync (feature lazy-vote);
    S2 stops before its lock, S1 locks, every node is killed.  S2 lost its
    vote (it was not even committed), the verification validates the
    transaction from S1 and outdates S2, which fetches it again."""
    s1, s2 = cluster.database(1), cluster.database(2)
    storage = Storage(cluster.masters, cluster.name)
    try:
        oid = storage.new_oid()
        serial = commit(storage, oid, b"first", z64)
        txn = voted(storage, oid, b"second", serial)
        stopped = cluster.nodes["S2"].proc
        os.kill(stopped.pid, signal.SIGSTOP)
        thread, outcome = finish_in_thread(storage, txn)
        try:
            wait_until(lambda: locked_in(s1, serial), 30, "S1 to lock")
        finally:
            cluster.kill()  # SIGKILL, S2 still stopped
        cluster.start(wait=60)
        # the client learns the outcome from the new master
        thread.join(90)
        assert not thread.is_alive()
    finally:
        storage.close()
    wait_until(lambda: all_up_to_date(cluster), 60, "every cell up to date")
    assert "%s lacks transaction" % nid_str(nid_of(s2)) in lost_votes(cluster)
    storage = Storage(cluster.masters, cluster.name)
    try:
        data, tid = storage.load(oid)
    finally:
        storage.close()
    assert outcome == {"tid": tid}
    assert data == b"second" and tid > serial
    assert has_revision(s1, oid, u64(tid)) and has_revision(s2, oid, u64(tid))
