"""Clusters mixing NEO's nodes and neozodb's: replication in both
directions, crashes under load, tweak and drop across implementations, a
master of one kind taking over from the other."""
from __future__ import annotations

import signal

import pytest
import ZODB
from neopeer import MixedCluster
from persistent.mapping import PersistentMapping

from neozodb.cli.cluster import wait_until
from neozodb.client import Storage

pytestmark = pytest.mark.timeout(240)

OBJECTS = 60


def _cluster(tmp_path, neo, **kw) -> MixedCluster:
    kw.setdefault("storages", 2)
    kw.setdefault("replicas", 1)
    kw.setdefault("partitions", 6)
    c = MixedCluster(str(tmp_path / "c"), neo=neo, name="mix", **kw)
    try:
        c.start(wait=60)
    except BaseException:
        c.kill()
        raise
    return c


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
    c = _cluster(tmp_path, neo)
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


@pytest.mark.parametrize("victim", ["S1", "S2", "M1"])
@pytest.mark.parametrize("master", ["neozodb", "NEO"])
def test_sigkill_under_load(tmp_path, master, victim):
    """Two writer processes commit while a node is SIGKILLed and restarted
    (S2 is NEO's, S1 ours): every acknowledged commit is there, nothing else."""
    from writers import Writers
    neo = ("S2",) + (("M1",) if master == "NEO" else ())
    c = _cluster(tmp_path, neo)
    try:
        writers = Writers(c, tmp_path, retry=True)
        try:
            wait_until(writers.more(20), 60, "writers to commit")
            c.nodes[victim].signal(signal.SIGKILL)
            c.nodes[victim].wait(10)
            if victim != "M1":
                wait_until(writers.more(20), 60, "commits without %s" % victim)
            _restart(c, victim)
            if victim == "M1":
                c.wait_state("RUNNING", 60)
            wait_until(c.all_up_to_date, 60, "every cell up to date")
            wait_until(writers.more(20), 60, "commits after the restart")
        finally:
            writers.stop()
        writers.check()
        # the replicas agree: read everything from each storage alone
        for alone in ("S1", "S2"):
            down = "S2" if alone == "S1" else "S1"
            c.nodes[down].kill()
            wait_until(lambda d=down: "U" not in c.cells()[d], 30, "%s down" % down)
            writers.check()
            _restart(c, down)
            wait_until(c.all_up_to_date, 60, "%s back" % down)
    finally:
        c.kill()
