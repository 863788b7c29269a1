"""Pack orders read back from NEO's SQLite storages, whose oids arrive as
one byte string (``AnswerPackOrders``): NEO's storage keeps an order's oids
as one blob and answers ``AskPackOrders`` with it unsplit, and NEO's master
passes such orders on as it got them.

Three ways they reach our nodes:

- our master, verifying the cluster at its start, asks every readable
  storage for its orders: NEO's storages answer it so;
- NEO's master, verifying at its start, reloads the orders not completed
  yet from its readable storages and passes them on to our storage as it
  got them;
- NEO's master answers an ``AskPackOrders`` for orders older than the last
  one every readable storage completed by asking its storages again
  (NEO's ``RequestOld``) and passes what they answer on.  Our storage asks
  that when it comes back after missing a pack: its cells still wait for
  every order since the last it applied.

The partial order here packs the history of one object of two, committed
by our client as NEO's client would (NEO's ``app.pack(tid, oids)``): what
each storage keeps of both objects shows whether it read the order's oids.
"""
from __future__ import annotations

import os
import signal
import sqlite3

import pytest
import ZODB
from neopeer import MixedCluster
from persistent.mapping import PersistentMapping

from neozodb.cli.cluster import wait_until
from neozodb.client import Storage
from neozodb.protocol import p64, u64

pytestmark = pytest.mark.timeout(240)

REVISIONS = 4


def _cluster(tmp_path, neo) -> MixedCluster:
    return MixedCluster(str(tmp_path / "c"), neo=neo, name="packs", storages=2, replicas=1,
                        partitions=4).start_or_kill()


def _history(c) -> tuple[int, int, bytes]:
    """Two objects, each with REVISIONS revisions; their oids and the TID
    of the last commit."""
    db = ZODB.DB(Storage(c.masters, c.name))
    try:
        with db.transaction() as conn:
            root = conn.root()
            root["packed"], root["kept"] = PersistentMapping(v=0), PersistentMapping(v=0)
        for v in range(1, REVISIONS):
            with db.transaction() as conn:
                conn.root()["packed"]["v"] = conn.root()["kept"]["v"] = v
        with db.transaction() as conn:
            root = conn.root()
            return u64(root["packed"]._p_oid), u64(root["kept"]._p_oid), db.lastTransaction()
    finally:
        db.close()


def _partial_pack(c, oid: int, pack_tid: bytes) -> bytes:
    """Commit a partial history pack of ``oid`` up to ``pack_tid`` and wait
    until the master counts it completed; its TID."""
    from neozodb.client.pack import commit_pack_order
    storage = Storage(c.masters, c.name)
    try:
        tid = commit_pack_order(storage, [p64(oid)], pack_tid)
        storage.app.wait_for_pack(tid)
        return tid
    finally:
        storage.close()


def _rows(path: str, oid: int) -> int:
    """Revisions of ``oid`` in a storage's SQLite database (ours and NEO's
    share the obj table's oid column)."""
    db = sqlite3.connect(path, timeout=30)
    try:
        return db.execute("SELECT COUNT(*) FROM obj WHERE oid=?", (oid,)).fetchone()[0]
    finally:
        db.close()


def _partial_orders_in(path: str) -> list[bytes]:
    """The oids column of the partial orders in a NEO storage's pack table:
    what it answers AskPackOrders with."""
    db = sqlite3.connect(path, timeout=30)
    try:
        return [row[0] for row in db.execute("SELECT oids FROM pack WHERE partial ORDER BY tid")]
    finally:
        db.close()


def _read(c) -> tuple[int, int]:
    db = ZODB.DB(Storage(c.masters, c.name))
    try:
        with db.transaction() as conn:
            root = conn.root()
            return root["packed"]["v"], root["kept"]["v"]
    finally:
        db.close()


def _s1_down(c) -> None:
    """SIGKILL our storage S1; its cells go out of date."""
    c.nodes["S1"].signal(signal.SIGKILL)
    c.nodes["S1"].wait(10)
    wait_until(lambda: "U" not in c.cells()["S1"], 30, "S1's cells out of date")


def _s1_back(c) -> None:
    """Restart S1; it catches up."""
    c.nodes["S1"].start()
    wait_until(lambda: c.storage_state("S1") is not None and c.all_up_to_date(), 90,
               "S1 to catch up")


def _s1_applies_the_order(c, packed: int, kept: int) -> None:
    """S1 packs the listed object's history, not the other's, with no
    error about the orders it was told."""
    wait_until(lambda: _rows(c.database(1), packed) == 1, 60,
               "S1 to pack the listed object's history")
    assert _rows(c.database(1), kept) == REVISIONS
    assert _answer_errors(c, "S1") == []


def _restart_master(c) -> None:
    """SIGKILL the master M1 and start it again; the cluster runs again."""
    c.nodes["M1"].signal(signal.SIGKILL)
    c.nodes["M1"].wait(10)
    c.nodes["M1"].start()
    c.wait_state("RUNNING", 90)


def _answer_errors(c, name: str) -> list[str]:
    with open(os.path.join(c.directory, name + ".log"), errors="replace") as f:
        return [line for line in f if "AnswerPackOrders" in line]


def test_our_storage_learns_orders_neo_master_reads_back(tmp_path):
    """NEO's master and storage S2, our storage S1.  S1 is down while a
    client orders a partial pack; S2 applies it and NEO's master counts it
    completed.  S1 comes back and asks for every order since the last it
    applied: NEO's master reads them back from S2 and passes them on with
    their oids as one byte string.  S1 must apply the order as S2 did:
    the history of the listed object goes, the other's stays."""
    c = _cluster(tmp_path, ("M1", "S2"))
    try:
        packed, kept, last = _history(c)
        _s1_down(c)
        _partial_pack(c, packed, last)
        # what NEO's storage did, and how it keeps the order's oids
        assert (_rows(c.database(2), packed), _rows(c.database(2), kept)) == (1, REVISIONS)
        assert _partial_orders_in(c.database(2)) == [p64(packed)]
        # S1 missed it (its last commit may be unlocked only when it is back)
        assert _rows(c.database(1), packed) >= REVISIONS - 1
        _s1_back(c)
        _s1_applies_the_order(c, packed, kept)
        # and S1 alone serves everything
        c.nodes["S2"].kill()
        wait_until(lambda: "U" not in c.cells()["S2"], 30, "S2 down")
        assert _read(c) == (REVISIONS - 1, REVISIONS - 1)
    finally:
        c.kill()


class _NoPackS2(MixedCluster):
    """NEO's S2 with --disable-pack: it keeps the orders it stores pending
    (it never reports a partition packed), so NEO's master reloads them
    from it at its verification."""

    def storage_argv(self, i: int) -> list[str]:
        return super().storage_argv(i) + (["--disable-pack"] if i == 2 else [])


def test_our_storage_learns_orders_neo_master_reloads(tmp_path):
    """NEO's master and storage S2 (which does not pack), our storage S1.
    S1 is down while a client orders a partial pack.  NEO's master is
    killed and restarted: verifying, it reloads the pending order from S2,
    oids as one byte string.  S1 comes back and asks for orders: it gets
    that one, and applies it."""
    c = _NoPackS2(str(tmp_path / "c"), neo=("M1", "S2"), name="packs", storages=2,
                  replicas=1, partitions=4).start_or_kill()
    try:
        packed, kept, last = _history(c)
        _s1_down(c)
        _partial_pack(c, packed, last)
        assert _partial_orders_in(c.database(2)) == [p64(packed)]
        assert _rows(c.database(2), packed) == REVISIONS  # S2 does not pack
        _restart_master(c)
        _s1_back(c)
        _s1_applies_the_order(c, packed, kept)
        assert _read(c) == (REVISIONS - 1, REVISIONS - 1)
    finally:
        c.kill()


def test_our_master_verifies_with_neo_storages_orders(tmp_path):
    """Our master and admin, NEO's storages.  After a partial pack, our
    master is killed and restarted: verifying, it asks NEO's storages for
    their orders, which come with their oids as one byte string.  The
    cluster runs again and the master knows the order and its oid."""
    c = _cluster(tmp_path, ("S1", "S2"))
    try:
        packed, kept, last = _history(c)
        tid = u64(_partial_pack(c, packed, last))
        assert [p64(packed)] == _partial_orders_in(c.database(1)) == _partial_orders_in(
            c.database(2))
        _restart_master(c)
        lines = wait_until(lambda: _pack_lines(c), 30, "the master to report its orders")
        assert len(lines) == 1 and lines[0].startswith(
            "pack %#x: up to %#x (" % (tid, u64(last))), lines
        assert "history of 1 objects, approved" in lines[0], lines
        assert _answer_errors(c, "M1") == []
        assert _read(c) == (REVISIONS - 1, REVISIONS - 1)
        assert [_rows(c.database(i), packed) for i in (1, 2)] == [1, 1]
    finally:
        c.kill()


def _pack_lines(c) -> list[str] | None:
    from neozodb.ctl.neoctl import CtlError
    try:
        lines = c.neoctl("print", "pack")[0]
    except CtlError:
        return None  # the admin still reaching the restarted master
    return None if lines == ["no pack order"] else lines


def test_gc_by_deletion_with_a_replica_down(tmp_path):
    """Our client's GC on NEO's master (no gc-pack: deletions, then partial
    packs of the deleted objects) while our storage S1 is down: S1 comes
    back and catches up from NEO's storage, which tells it the pack it
    applied meanwhile (AnswerFetchTransactions' completed pack): S1 then
    compares every object and drops the garbage the deletions removed."""
    c = _cluster(tmp_path, ("M1", "S2"))
    try:
        db = ZODB.DB(Storage(c.masters, c.name))
        try:
            with db.transaction() as conn:
                conn.root()["junk"] = [PersistentMapping(i=i) for i in range(8)]
            with db.transaction() as conn:
                junk = [u64(o._p_oid) for o in conn.root()["junk"]]
                del conn.root()["junk"]
            _s1_down(c)
            db.pack()
        finally:
            db.close()
        assert sum(_rows(c.database(2), oid) for oid in junk) == 0
        _s1_back(c)
        wait_until(lambda: _applied_every_order(c.database(1)), 60, "S1 to apply the orders")
        assert sum(_rows(c.database(1), oid) for oid in junk) == 0
    finally:
        c.kill()


def _applied_every_order(path: str) -> bool:
    """Whether our storage's partitions all applied the last order it knows."""
    db = sqlite3.connect(path, timeout=30)
    try:
        (last,) = db.execute("SELECT MAX(tid) FROM pack").fetchone()
        (done,) = db.execute("SELECT MIN(done) FROM pack_progress").fetchone()
        return last is not None and done is not None and done >= last
    finally:
        db.close()
