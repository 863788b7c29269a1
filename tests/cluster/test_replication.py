"""Storage failures with replicas: commits go on without a dead storage, and
replication brings it back up to date, resuming where it stopped."""
from __future__ import annotations

import os
import re
import sqlite3

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping

from neozodb.cli.cluster import wait_until
from neozodb.client import Storage
from neozodb.protocol import NodeStates
from replicas import raw_contents
from writers import Writers

pytestmark = pytest.mark.timeout(240)


def all_up_to_date(cluster, names) -> bool:
    lines = cluster.pt_lines()[1:]
    return len(lines) == len(names) and all(
        line.split()[0] in names and line.split()[1] == "R" and set(line.split()[2]) <= {"U", "."}
        for line in lines)


def replicated_objects(node) -> int:
    """Objects this run of a storage fetched, from its log."""
    with open(node.logfile, "rb") as f:
        f.seek(node.log_offset)
        text = f.read().decode("utf-8", "replace")
    return sum(int(n) for n in re.findall(r"replicated from \S+ up to \S+ \((\d+) objects", text))


def replication_messages(node) -> int:
    """AddObject(s) messages this run of a storage received, from its log."""
    with open(node.logfile, "rb") as f:
        f.seek(node.log_offset)
        text = f.read().decode("utf-8", "replace")
    return sum(int(n) for n in re.findall(r"replicated from .* s, (\d+) messages\)", text))


def test_storage_killed_under_write_load_catches_up(cluster, tmp_path):
    writers = Writers(cluster, tmp_path)
    try:
        wait_until(lambda: all(c >= 20 for c in writers.counts()), 60, "first commits")
        cluster.nodes["S2"].kill()
        wait_until(lambda: cluster.storage_state("S2") is NodeStates.DOWN, 30, "S2 down")
        assert cluster.cluster_state() == "RUNNING"
        wait_until(writers.more(30), 60, "commits without S2")
        cluster.nodes["S2"].start()
        wait_until(lambda: all_up_to_date(cluster, {"S1", "S2"}), 60, "S2 up to date")
        wait_until(writers.more(10), 60, "commits after S2 returned")
    finally:
        counts = writers.stop()
    writers.check()
    cluster.stop()
    s1 = raw_contents(os.path.join(cluster.directory, "storage1.sqlite"))
    s2 = raw_contents(os.path.join(cluster.directory, "storage2.sqlite"))
    assert sum(len(t) for t, _ in s1.values()) > sum(counts)
    assert s1 == s2


def test_interrupted_replication_resumes(cluster):
    s2 = cluster.nodes["S2"]
    s2.kill()
    wait_until(lambda: cluster.storage_state("S2") is NodeStates.DOWN, 30, "S2 down")
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    root = db.open().root()
    count = 0
    for _ in range(30):
        for _ in range(100):
            root[count] = PersistentMapping(data=os.urandom(1000))
            count += 1
        transaction.commit()
    db.close()
    total = count + 31  # one record per mapping, 31 revisions of the root
    # slow enough to be interrupted in the middle
    s2.argv += ["--replication-rate", "300K"]
    s2.start()
    wait_until(lambda: replicated_objects(s2) >= count // 3, 60, "part of the replication")
    s2.kill()
    first = replicated_objects(s2)
    assert first < total, "replication was not interrupted"
    del s2.argv[-2:]
    s2.start()
    wait_until(lambda: all_up_to_date(cluster, {"S1", "S2"}), 60, "S2 up to date")
    second = replicated_objects(s2)
    # the second run only fetched what the first one had not
    assert 0 < second <= total - first
    # two neozodb storages: the objects came in AddObjects batches ("repl-batch")
    assert 0 < replication_messages(s2) <= second // 10
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    try:
        root = db.open().root()
        assert len(root) == count
    finally:
        db.close()
    cluster.stop()
    assert raw_contents(os.path.join(cluster.directory, "storage1.sqlite")) == \
        raw_contents(os.path.join(cluster.directory, "storage2.sqlite"))


def neoctl(cluster, *words):
    """run_command's (lines, value), or the refusal's message."""
    return cluster.neoctl(*words, refusal=True)


def cells(cluster) -> dict[str, str]:
    return {line.split()[0]: line.split()[2] for line in cluster.pt_lines()[1:]}


def test_grow_then_drain_and_drop(cluster):
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    root = db.open().root()
    for i in range(300):
        root[i] = PersistentMapping(n=i)
        if i % 50 == 49:
            transaction.commit()
    transaction.commit()
    db.close()
    cluster.storage(3).start()
    wait_until(lambda: cluster.storage_state("S3") is NodeStates.PENDING, 30, "S3 pending")
    assert neoctl(cluster, "add", "S1") == "S1 is not pending"
    assert neoctl(cluster, "add", "S3")[0] == ["Nodes added: S3"]
    lines, _ = neoctl(cluster, "tweak")
    assert "O" in dict(line.split()[::2] for line in lines)["S3"]
    wait_until(lambda: all_up_to_date(cluster, {"S1", "S2", "S3"}), 60, "S3 up to date")
    counts = sorted(c.count("U") for c in cells(cluster).values())
    assert counts == [8, 8, 8]  # 12 partitions x 2 copies over 3 nodes
    assert neoctl(cluster, "tweak", "-n")[1]["changed"] is False  # balanced already

    # drain S1: its cells move to S2 and S3, then it can go
    neoctl(cluster, "tweak", "S1")
    wait_until(lambda: cells(cluster).get("S1", "") in ("", "." * 12)
               and all_up_to_date(cluster, {"S1", "S2", "S3"}), 60, "S1 drained")
    assert cells(cluster)["S2"] == cells(cluster)["S3"] == "U" * 12

    def s1_rows():
        conn = sqlite3.connect(os.path.join(cluster.directory, "storage1.sqlite"))
        try:
            return sum(conn.execute("SELECT COUNT(*) FROM %s" % t).fetchone()[0]
                       for t in ("obj", "trans", "data"))
        finally:
            conn.close()
    # the discarded cells' data is deleted in the background
    wait_until(lambda: s1_rows() == 0, 30, "S1 to delete the data it no longer holds")
    assert neoctl(cluster, "drop", "S1") == ([], {"ok": True})
    wait_until(lambda: not cluster.nodes["S1"].running, 30, "S1 to exit")
    assert set(cells(cluster)) == {"S2", "S3"}
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    try:
        root = db.open().root()
        assert [root[i]["n"] for i in range(300)] == list(range(300))
    finally:
        db.close()
    # S3 now holds the only copy of what S2 loses if dropped, and vice versa
    cluster.nodes["S3"].kill()
    wait_until(lambda: cluster.storage_state("S3") is NodeStates.DOWN, 30, "S3 down")
    assert "only readable copy" in neoctl(cluster, "drop", "S2")
