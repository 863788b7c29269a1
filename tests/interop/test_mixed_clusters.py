"""Clusters mixing NEO's nodes and neozodb's: replication in both
directions, crashes under load, tweak and drop across implementations,
both clients on every mix.  Masters taking over from one another and the
admin node crashing are in test_mixed_ha.py."""
from __future__ import annotations

import signal

import pytest
import ZODB
from neopeer import mixed_cluster
from persistent.mapping import PersistentMapping

from neozodb.cli.cluster import wait_until
from neozodb.client import Storage

pytestmark = pytest.mark.timeout(240)

OBJECTS = 60


def _write(c, version: int, count: int = OBJECTS) -> None:
    """root["o<i>"]["v"] = version for every i < count, in a few transactions."""
    db = ZODB.DB(Storage(c.masters, c.name))
    try:
        with db.transaction() as conn:
            root = conn.root()
            for i in range(count):
                root.setdefault("o%d" % i, PersistentMapping())
        for first in range(0, count, 20):
            with db.transaction() as conn:
                root = conn.root()
                for i in range(first, min(first + 20, count)):
                    root["o%d" % i]["v"] = version
    finally:
        db.close()


def _read(c) -> dict[str, int]:
    """What a fresh client (empty cache) reads."""
    db = ZODB.DB(Storage(c.masters, c.name))
    try:
        with db.transaction() as conn:
            return {k: v["v"] for k, v in conn.root().items() if k.startswith("o")}
    finally:
        db.close()


def _restart(c, name: str) -> None:
    node = c.nodes[name]
    node.start()


def _down(c, name: str) -> bool:
    return c.cells().get(name, "").count("U") == 0 and name in c.cells()


# S2 is NEO's, S1 ours; the storage killed first misses the overwrite and
# catches up from the other: with "S2" first, NEO's storage replicates from
# ours, with "S1" first ours from NEO's.
@pytest.mark.parametrize("first", ["S2", "S1"])
@pytest.mark.parametrize("master", ["neozodb", "NEO"])
def test_catch_up_then_lose_the_source(tmp_path, master, first):
    """The issue's data-loss steps: kill one storage, overwrite objects,
    restart it, wait until every cell is up to date, kill the other, read
    everything back (from the storage that caught up alone)."""
    neo = ("S2",) + (("M1",) if master == "NEO" else ())
    c = mixed_cluster(tmp_path, neo)
    other = "S1" if first == "S2" else "S2"
    try:
        _write(c, 1)
        c.nodes[first].kill()
        wait_until(lambda: "O" in c.cells()[first], 30, "%s's cells out of date" % first)
        _write(c, 2, OBJECTS + 20)  # overwrites and new objects
        _restart(c, first)
        wait_until(c.all_up_to_date, 60, "%s to catch up" % first)
        c.nodes[other].kill()
        wait_until(lambda: "O" in c.cells()[other], 30, "%s's cells out of date" % other)
        assert _read(c) == {"o%d" % i: 2 for i in range(OBJECTS + 20)}
    finally:
        c.kill()


@pytest.mark.timeout(480)
@pytest.mark.parametrize("admin", ["neozodb", "NEO"])
@pytest.mark.parametrize("client", ["neozodb", "NEO"])
@pytest.mark.parametrize("victim", ["S1", "S2", "M1"])
@pytest.mark.parametrize("master", ["neozodb", "NEO"])
def test_sigkill_under_load(tmp_path, master, victim, client, admin):
    """Two writer processes (either client) commit while a node is
    SIGKILLed and restarted (S2 is NEO's, S1 ours), the admin (which the
    test asks about the cluster) of either kind: every acknowledged commit
    is there, nothing else."""
    from neopeer import neo_env, neo_writer_script

    from writers import WRITER, Writers
    neo = ("S2",) + (("M1",) if master == "NEO" else ()) + (("A1",) if admin == "NEO" else ())
    c = mixed_cluster(tmp_path, neo)
    try:
        if client == "NEO":
            writers = Writers(c, tmp_path, retry=True, script=neo_writer_script(),
                              env=neo_env())
        else:
            writers = Writers(c, tmp_path, retry=True, script=WRITER)
        try:
            # generous bounds: on a loaded two-core machine a master's restart
            # and its clients' reconnection can take most of a minute
            wait_until(writers.more(20), 120, "writers to commit")
            c.nodes[victim].signal(signal.SIGKILL)
            c.nodes[victim].wait(10)
            if victim != "M1":
                wait_until(writers.more(20), 120, "commits without %s" % victim)
            _restart(c, victim)
            if victim == "M1":
                c.wait_state("RUNNING", 120)
            wait_until(c.all_up_to_date, 120, "every cell up to date")
            wait_until(writers.more(20), 120, "commits after the restart")
        finally:
            writers.stop()
        writers.check()
        # the replicas agree: read everything from each storage alone
        for alone in ("S1", "S2"):
            down = "S2" if alone == "S1" else "S1"
            c.nodes[down].kill()
            wait_until(lambda d=down: "U" not in c.cells()[d], 60, "%s down" % down)
            writers.check()
            _restart(c, down)
            wait_until(c.all_up_to_date, 120, "%s back" % down)
    finally:
        c.kill()


@pytest.mark.parametrize("added", ["neozodb", "NEO"])
@pytest.mark.parametrize("master", ["neozodb", "NEO"])
def test_add_tweak_and_drop_across(tmp_path, master, added):
    """A third storage of either kind joins (add, tweak), takes cells from
    both kinds, then the first storage is dropped: all data still reads."""
    neo = ["S2"] + (["M1"] if master == "NEO" else []) + (["S3"] if added == "NEO" else [])
    c = mixed_cluster(tmp_path, neo)
    try:
        _write(c, 1)
        c.storage(3).start()
        wait_until(lambda: c.storage_state("S3") is not None, 30, "S3 to register")
        c.neoctl("add", "S3")
        c.neoctl("tweak")
        wait_until(lambda: "S3" in c.cells() and c.all_up_to_date()
                   and "F" not in "".join(c.cells().values()), 60, "S3 to take its cells")
        assert c.cells()["S3"].count("U") >= 3
        _write(c, 2)
        c.neoctl("tweak", "S1")  # drain S1

        def drained():
            # NEO's master leaves the drained node's cells in place (its
            # tweak does not discard them): enough that the others have all
            cells = c.cells()
            return c.all_up_to_date() and all(
                cells["S2"][p] + cells["S3"][p] == "UU" for p in range(c.partitions))
        wait_until(drained, 60, "S1 drained")
        # NEO's master drops only a stopped node
        c.neoctl("kill", "S1")
        wait_until(lambda: not c.nodes["S1"].running, 30, "S1 to stop")
        c.neoctl("drop", "S1")
        wait_until(lambda: "S1" not in c.cells(), 30, "S1 dropped")
        assert _read(c) == {"o%d" % i: 2 for i in range(OBJECTS)}
        # and each remaining storage alone has everything (replicas 1)
        for alone, down in (("S2", "S3"), ("S3", "S2")):
            c.nodes[down].kill()
            wait_until(lambda d=down: "U" not in c.cells()[d], 30, "%s down" % down)
            assert _read(c) == {"o%d" % i: 2 for i in range(OBJECTS)}, alone
            _restart(c, down)
            wait_until(c.all_up_to_date, 60, "%s back" % down)
    finally:
        c.kill()


# Who runs what: masters M1 M2, storages S1 S2, admin A1 (the rest ours).
MATRIX = [
    ("M1",), ("M2",), ("M1", "M2"), ("S1",), ("M1", "S1"), ("M2", "S2", "A1"),
    ("M1", "M2", "S1", "A1"), ("A1",), ("S1", "S2"), ("M2", "S1", "S2", "A1"),
]


@pytest.mark.parametrize("neo", MATRIX, ids=["+".join(m) for m in MATRIX])
def test_both_clients_on_every_mix(tmp_path, neo):
    """Either client commits and reads what the other committed, whoever
    runs the masters, the storages and the admin."""
    from neopeer import neo_client_roundtrip
    c = mixed_cluster(tmp_path, neo, masters=2)
    try:
        db = ZODB.DB(Storage(c.masters, c.name))
        # long enough to be stored compressed: ours by ISA-L, NEO's by
        # zlib, each read by the other (neozodb/deflate.py)
        ours, theirs = "from neozodb, " * 200, "from NEO, " * 200
        try:
            with db.transaction() as conn:
                conn.root()["ours"] = ours
            assert neo_client_roundtrip(c, theirs=theirs) == {"ours": ours, "theirs": theirs}
            with db.transaction() as conn:
                assert conn.root()["theirs"] == theirs
                conn.root()["ours"] = "again"
            assert neo_client_roundtrip(c)["ours"] == "again"
        finally:
            db.close()
        # both copies hold everything: each storage alone serves it
        c.nodes["S1"].kill()
        wait_until(lambda: "U" not in c.cells()["S1"], 30, "S1 down")
        assert neo_client_roundtrip(c) == {"ours": "again", "theirs": theirs}
    finally:
        c.kill()
