"""Several masters: one primary is elected, the others follow it as
secondaries, and when the primary dies a secondary takes over while
storages, admin and clients follow it by themselves."""
from __future__ import annotations

import os
import re
import signal

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping

from neozodb.cli.cluster import LocalCluster, wait_until
from neozodb.client import Storage
from neozodb.ctl.neoctl import CtlError
from writers import Writers

pytestmark = pytest.mark.timeout(240)

@pytest.fixture
def masters3(tmp_path):
    c = LocalCluster(str(tmp_path / "cluster"), name="test", storages=2, replicas=1,
                     partitions=12, masters=3)
    try:
        c.start(wait=60)
        yield c
    finally:
        c.kill()


def masters_view(cluster) -> dict[str, str]:
    """Master name -> state, as the admin shows them."""
    return {n["nid"]: n["state"] for n in cluster.neoctl("print", "node", "MASTER")[1]}


def log_of(node) -> str:
    with open(node.logfile, "rb") as f:
        f.seek(node.log_offset)
        return f.read().decode("utf-8", "replace")


def test_one_primary_elected(masters3):
    primary = masters3.primary()
    assert primary in masters3.master_names
    assert masters_view(masters3) == {m: "RUNNING" for m in masters3.master_names}
    secondaries = [m for m in masters3.master_names if m != primary]
    for name in secondaries:
        wait_until(lambda name=name: "secondary of %s" % primary in log_of(masters3.nodes[name]),
                   10, "%s to follow %s" % (name, primary))
    # only the primary ran the cluster
    running = [m for m in masters3.master_names
               if "VERIFYING -> RUNNING" in log_of(masters3.nodes[m])]
    assert running == [primary]


def test_primary_killed_under_write_load(masters3, tmp_path):
    c = masters3
    writers = Writers(c, tmp_path, retry=True)
    try:
        wait_until(lambda: all(n >= 20 for n in writers.counts()), 60, "first commits")
        old = c.primary()
        c.nodes[old].kill()
        new = c.wait_primary(30, other_than=old)
        wait_until(writers.more(20), 60, "commits with the new primary")
        # the old primary comes back as a secondary of the new one
        c.nodes[old].start()
        wait_until(lambda: "secondary of %s" % new in log_of(c.nodes[old]), 30,
                   "%s to follow %s" % (old, new))
        assert c.primary() == new
        wait_until(lambda: masters_view(c).get(old) == "RUNNING", 10, "%s listed" % old)
    finally:
        writers.stop()
    writers.check()  # every acknowledged commit is there, nothing else
    assert "VERIFYING -> RUNNING" not in log_of(c.nodes[old])


def test_secondary_stops_alone_and_sigint_stops_the_cluster(masters3):
    c = masters3
    primary = c.primary()
    secondary, other = [m for m in c.master_names if m != primary]
    c.nodes[secondary].signal(signal.SIGTERM)
    assert c.nodes[secondary].wait(20) == 0
    wait_until(lambda: masters_view(c).get(secondary) == "DOWN", 10, "%s down" % secondary)
    assert c.cluster_state() == "RUNNING"
    # neoctl kill: the primary refuses to stop itself, and the last other
    # master (it would be left without a majority of the masters)
    with pytest.raises(CtlError, match="primary master"):
        c.neoctl("kill", primary)
    with pytest.raises(CtlError, match="majority"):
        c.neoctl("kill", other)
    assert c.cluster_state() == "RUNNING"
    # SIGINT on the primary: STOPPING, and every node exits cleanly
    c.nodes[primary].signal(signal.SIGINT)
    for name, node in c.nodes.items():
        if name != "A1":
            assert node.wait(30) == 0, name
    assert "RUNNING -> STOPPING" in log_of(c.nodes[primary])


def test_silent_primary_does_not_run_twice(tmp_path):
    """The primary is frozen (SIGSTOP): the others give up on it after the
    keep-alive time and elect a new primary; resumed, the old one finds its
    storages gone and ends up a secondary, never running a second cluster."""
    c = LocalCluster(str(tmp_path / "cluster"), name="test", storages=2, replicas=1,
                     partitions=12, masters=3, node_args=["--keepalive", "2"])
    try:
        c.start(wait=60)
        db = ZODB.DB(Storage(c.masters, c.name, keepalive=2))
        root = db.open().root()
        root["x"] = 1
        transaction.commit()
        old = c.primary()
        c.nodes[old].signal(signal.SIGSTOP)
        new = c.wait_primary(30, other_than=old)
        root["x"] = 2
        transaction.commit()
        c.nodes[old].signal(signal.SIGCONT)
        wait_until(lambda: "secondary of %s" % new in log_of(c.nodes[old]), 30,
                   "%s to follow %s" % (old, new))
        assert c.primary() == new
        root["x"] = 3
        transaction.commit()
        db.close()
        db = ZODB.DB(Storage(c.masters, c.name))
        assert db.open().root()["x"] == 3
        db.close()
        assert os.path.exists(c.nodes[old].logfile)
        assert log_of(c.nodes[old]).count("VERIFYING -> RUNNING") == 1  # its first term only
    finally:
        c.kill()


def test_new_primary_starts_from_mirrored_state(masters3):
    """A secondary knows the table, the last TID and OID before it takes
    over: its log says so, and the cluster goes on from there."""
    c = masters3
    # both secondaries follow before the client takes OIDs: one that asks
    # AskLastIDs later learns the last OID *given* (100), not the one used
    wait_until(lambda: sorted(masters_view(c).values()) == ["RUNNING"] * 3, 30,
               "the secondaries to follow")
    db = ZODB.DB(Storage(c.masters, c.name))
    root = db.open().root()
    root["x"] = PersistentMapping(v="before")  # a new object: OID 1
    transaction.commit()
    last = db.lastTransaction()
    ptid = int(c.pt_lines()[0].split()[2].rstrip(","))  # "# ptid: N, replicas: R"
    old = c.primary()
    c.nodes[old].kill()
    new = c.wait_primary(30, other_than=old)
    took = re.search(r"taking over \(table (\d+), last tid (0x[0-9a-f]+), last oid (0x[0-9a-f]+)",
                     log_of(c.nodes[new]))
    assert took is not None
    assert int(took.group(1)) == ptid
    assert int(took.group(2), 16) == int.from_bytes(last, "big")
    assert int(took.group(3), 16) == 1
    root["x"] = "after"
    transaction.commit()
    assert db.lastTransaction() > last
    db.close()
