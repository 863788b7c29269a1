"""`neoctl check`: replicas compared, a tampered copy found, marked
CORRUPTED, rebuilt from the good copies; a second check finds nothing."""
from __future__ import annotations

import json
import os
import sqlite3

import pytest
import transaction
import ZODB

from neozodb.cli.cluster import LocalCluster, wait_until
from neozodb.client import Storage
from neozodb.protocol import NodeStates

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def cluster3(tmp_path):
    c = LocalCluster(str(tmp_path / "cluster"), name="check", storages=3, replicas=2,
                     partitions=6)
    try:
        c.start(wait=60)
        yield c
    finally:
        c.kill()


def neoctl(cluster, *args):
    return cluster.run_neoctl(*args, timeout=120)


def up_to_date(cluster):
    return all(line.split()[2] == "U" * 6 for line in cluster.pt_lines()[1:])


def test_check_finds_and_repairs_a_tampered_copy(cluster3):
    db = ZODB.DB(Storage(cluster3.masters, cluster3.name))
    root = db.open().root()
    for i in range(40):
        root[i] = "value %d" % i
        transaction.get().note("commit %d" % i)
        transaction.commit()
    db.close()
    s2 = cluster3.nodes["S2"]
    s2.kill()
    wait_until(lambda: cluster3.storage_state("S2") is NodeStates.DOWN, 30, "S2 down")
    path = os.path.join(cluster3.directory, "storage2.sqlite")
    with sqlite3.connect(path) as conn:
        # a transaction's metadata in partition 1, an object revision in another
        tid = conn.execute("SELECT MIN(tid) FROM trans WHERE partition=1").fetchone()[0]
        conn.execute("UPDATE trans SET description=? WHERE partition=1 AND tid=?",
                     (b"tampered", tid))
        oid, serial, part = conn.execute(
            "SELECT oid, tid, partition FROM obj WHERE partition<>1 ORDER BY tid LIMIT 1").fetchone()
        conn.execute("DELETE FROM obj WHERE oid=? AND tid=?", (oid, serial))
    conn.close()
    s2.start()
    wait_until(lambda: up_to_date(cluster3), 60, "S2 back up to date")

    out = neoctl(cluster3, "check")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "partition 1: S2 differed from S1 S3; S2 repaired" in lines
    assert "partition %d: S2 differed from S1 S3; S2 repaired" % part in lines
    assert lines[-1] == "6 partitions checked, 2 corrupted copies found, 2 repaired"
    assert "partitions checked" in out.stderr  # progress
    assert up_to_date(cluster3)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT description FROM trans WHERE tid=?",
                            (tid,)).fetchone()[0] != b"tampered"
        assert conn.execute("SELECT 1 FROM obj WHERE oid=? AND tid=?",
                            (oid, serial)).fetchone() is not None
    conn.close()

    out = neoctl(cluster3, "--json", "check")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["done"] and status["checked"] == 6 and status["repairs"] == {}
    assert all(r.startswith("ok: ") for r in status["results"].values())

    # the reference named on the command line decides, even against a majority
    out = neoctl(cluster3, "check", "0:S1", "1:S2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "2 partitions checked, 0 corrupted copies found, 0 repaired"
    out = neoctl(cluster3, "print", "check")
    assert out.returncode == 0 and out.stdout.startswith("partition 0: ok: S1 S2 S3 agree")

    db = ZODB.DB(Storage(cluster3.masters, cluster3.name))
    try:
        root = db.open().root()
        assert [root[i] for i in range(40)] == ["value %d" % i for i in range(40)]
    finally:
        db.close()


def test_check_refusals(cluster3):
    out = neoctl(cluster3, "check", "99")
    assert out.returncode == 1 and "invalid partition 99" in out.stderr
    out = neoctl(cluster3, "check", "0:S9")
    assert out.returncode == 1 and "unknown node S9" in out.stderr
