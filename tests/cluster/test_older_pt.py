"""neoctl print pt_history / recover_pt: a cluster whose latest partition
table needs a storage lost for good starts again from an older table that
the storages present can serve, truncated after the TID up to which it is
complete."""
from __future__ import annotations

import os

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping

from neozodb.cli.cluster import LocalCluster, wait_until
from neozodb.client import Storage
from neozodb.protocol import NodeStates, u64
from neozodb.tid import neo_tid_time
from replicas import config_value, raw_contents

pytestmark = pytest.mark.timeout(300)


def neoctl(cluster, *words):
    """run_command's (lines, value), or the refusal's message."""
    return cluster.neoctl(*words, refusal=True)


def logged(node, text: str) -> bool:
    with open(node.logfile, "rb") as f:
        f.seek(node.log_offset)
        return text.encode() in f.read()


def commit(db, first: int, count: int) -> list[tuple[int, dict]]:
    """``count`` transactions, each changing the root and adding an object
    (new oids: every partition gets some); (tid, root state) after each."""
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    root = conn.root()
    done = []
    for i in range(first, first + count):
        root["n"] = i
        root["k%d" % i] = PersistentMapping(i=i)
        tm.commit()
        done.append((u64(db.lastTransaction()), {k: root[k] if k == "n" else dict(root[k])
                                                 for k in root}))
    conn.close()
    return done


def state(db) -> dict:
    root = db.open().root()
    return {k: root[k] if k == "n" else dict(root[k]) for k in root}


def max_tid(path: str) -> int:
    return max(tid for trans, objs in raw_contents(path).values()
               for tid in [*trans, *(t for t, _ in objs)])


@pytest.fixture
def three(tmp_path):
    c = LocalCluster(str(tmp_path / "c"), name="older", storages=3, replicas=1, partitions=6)
    try:
        c.start(wait=60)
        yield c
    finally:
        c.kill()


def test_recover_older_table_after_losing_a_storage(three):
    cluster = three
    # which storages hold each partition (3 storages, 2 copies each)
    owners = {p: {s for s, letters in cluster.cells().items() if letters[p] == "U"}
              for p in range(6)}
    only_s1_s3 = [p for p, o in owners.items() if o == {"S1", "S3"}]
    assert only_s1_s3, owners

    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    try:
        before = commit(db, 0, 8)
        # S1 dies: its cells get OUT_OF_DATE, commits go on on S2 and S3
        cluster.nodes["S1"].kill()
        wait_until(lambda: cluster.storage_state("S1") is NodeStates.DOWN, 30, "S1 down")
        after = commit(db, 8, 6)
    finally:
        db.close()
    assert cluster.neoctl("print", "cluster")[0] == ["RUNNING"]
    # S3 is lost for good: S1's partitions shared with S3 have no copy left
    cluster.nodes["S3"].kill()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(cluster.database(3) + suffix):
            os.remove(cluster.database(3) + suffix)
    wait_until(lambda: cluster.cluster_state() == "RECOVERING", 30, "recovering")
    cluster.nodes["S1"].start()
    master = cluster.nodes["M1"]
    wait_until(lambda: logged(master, "is not operational with the storages present (S1 S2)"),
               60, "the master to say it is stuck")
    assert cluster.cluster_state() == "RECOVERING"
    # the table S2 has: S3's cells were outdated where S2 had a copy
    latest = cluster.neoctl("print", "ids")[1]["last_ptid"]
    assert logged(master, "partition table %d is not operational with the storages present"
                  " (S1 S2): no readable copy of partitions %s, which only S3 holds; waiting"
                  " for it. If it is lost for good: `neoctl print pt_history` lists older"
                  " tables, `neoctl recover_pt PTID` starts from one"
                  % (latest, " ".join(map(str, only_s1_s3))))

    # S1 holds every transaction committed before it died, up to its last one
    bound = max_tid(cluster.database(1))
    committed = dict(before)
    assert bound in committed and bound < after[0][0]
    lines, value = neoctl(cluster, "print", "pt_history")
    assert lines == [
        "ptid %d (latest): not operational, no readable copy of partitions %s (copies on S2)"
        % (latest, " ".join(map(str, only_s1_s3))),
        "ptid 1: operational with S1 S2, truncating after %#x (%s)"
        % (bound, neo_tid_time(bound))]
    assert value == {"latest": latest, "tables": [
        {"ptid": latest, "operational": False, "truncate_tid": None, "storages": ["S2"],
         "unreadable": only_s1_s3, "packed_tid": None},
        {"ptid": 1, "operational": True, "truncate_tid": bound, "storages": ["S1", "S2"],
         "unreadable": [], "packed_tid": None}]}

    # refusals: unknown table, a table that is not operational, no table id
    assert neoctl(cluster, "recover_pt", "99") == (
        "no storage present remembers partition table 99 (see `neoctl print pt_history`)")
    assert neoctl(cluster, "recover_pt", str(latest)) == (
        "partition table %d is not operational with the storages present: no readable copy"
        " of partitions %s" % (latest, " ".join(map(str, only_s1_s3))))
    assert neoctl(cluster, "recover_pt", "x") == \
        "invalid partition table id 'x': expected 1, 2, ..."
    assert neoctl(cluster, "recover_pt") == "usage: recover_pt PTID"
    assert cluster.cluster_state() == "RECOVERING"

    lines, value = neoctl(cluster, "recover_pt", "1")
    new_ptid = latest + 1
    assert lines == ["partition table %d made from table 1 over S1 S2; truncating after %#x (%s)"
                     % (new_ptid, bound, neo_tid_time(bound))]
    cluster.wait_state("RUNNING", 60)
    assert cluster.neoctl("print", "ids")[1]["last_tid"] == bound
    # every partition has its copies on S1 and S2, complete: S3 is gone
    cells = cluster.cells()
    assert cells["S3"] == "......"  # known, down, without cells: drop it
    assert cluster.neoctl("drop", "S3") == ([], {"ok": True})
    cells = cluster.cells()
    assert sorted(cells) == ["S1", "S2"]
    for p, o in owners.items():
        assert {s for s in cells if cells[s][p] == "U"} == (o - {"S3"}), (p, cells)
    assert cluster.neoctl("print", "pt")[0][0] == "# ptid: %d, replicas: 1" % new_ptid
    assert neoctl(cluster, "recover_pt", "1") == "cluster is RUNNING, not RECOVERING"

    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    try:
        assert u64(db.lastTransaction()) == bound
        assert state(db) == committed[bound]
        more = commit(db, 100, 1)  # and commits go on
        assert more[0][0] > after[-1][0]
    finally:
        db.close()
    cluster.stop()
    s1, s2 = raw_contents(cluster.database(1)), raw_contents(cluster.database(2))
    for path in (cluster.database(1), cluster.database(2)):
        assert config_value(path, "truncate_tid") is None
    for p, o in owners.items():
        if o == {"S1", "S2"}:
            assert s1[p] == s2[p]  # the copies are identical
        held = s1[p] if "S1" in o else s2[p]
        tids = set(held[0]) | {t for t, _ in held[1]}
        assert not tids & {t for t, _ in after}  # nothing of what S1 missed


def test_recover_pt_refused_when_operational(cluster):
    """Running, then RECOVERING with a table the storages present serve:
    recover_pt is refused, `print pt_history` still answers."""
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    try:
        commit(db, 0, 3)
        db.pack()  # returns once every storage applied it
        commit(db, 3, 1)
        last = u64(db.lastTransaction())
    finally:
        db.close()
    assert neoctl(cluster, "recover_pt", "1") == "cluster is RUNNING, not RECOVERING"
    out = cluster.run_neoctl("recover_pt", "1")  # the command: one line, status 1
    assert (out.returncode, out.stdout, out.stderr) == (
        1, "", "cluster is RUNNING, not RECOVERING\n")
    lines, value = neoctl(cluster, "print", "pt_history")
    assert lines == ["ptid 1 (latest): operational with S1 S2, truncating after %#x (%s)"
                     % (last, neo_tid_time(last))]
    (order,) = cluster.neoctl("print", "pack")[1]["orders"]
    assert value["tables"][0]["packed_tid"] == order["pack_tid"] < last
    # a new master with S1 only: it waits for S2, which holds readable cells
    # (the master goes first: it would outdate S2's cells)
    master = cluster.nodes["M1"]
    master.kill()
    cluster.nodes["S2"].kill()
    master.start()
    wait_until(lambda: cluster.cluster_state() == "RECOVERING"
               and cluster.storage_state("S1") is NodeStates.PENDING, 60, "S1 pending")
    assert neoctl(cluster, "recover_pt", "1") == (
        "partition table 1 is operational with the storages present: `neoctl start` starts"
        " the cluster from it")
    assert not logged(master, "is not operational")
    assert neoctl(cluster, "start") == ([], {"ok": True})
    cluster.wait_state("RUNNING", 60)


def test_moved_cells_are_not_offered_again(tmp_path):
    """S1 alone, then S2 added and given half the partitions by tweak: S1
    drops its copies of them.  S2 lost for good: table 1, where S1 had
    every partition, is not operational any more (S1 holds half of them),
    so nothing is offered; the table of before S1 dropped them neither."""
    cluster = LocalCluster(str(tmp_path / "c"), name="moved", storages=1, replicas=0,
                           partitions=4)
    try:
        cluster.start(wait=60)
        db = ZODB.DB(Storage(cluster.masters, cluster.name))
        try:
            commit(db, 0, 4)
            cluster.storage(2).start()
            wait_until(lambda: cluster.storage_state("S2") is NodeStates.PENDING, 30,
                       "S2 pending")
            cluster.neoctl("add", "S2")
            cluster.neoctl("tweak")
            wait_until(lambda: cluster.cells() in ({"S1": "U.U.", "S2": ".U.U"},
                                                   {"S1": ".U.U", "S2": "U.U."}), 60,
                       "the tweak to be done")
            commit(db, 4, 2)
        finally:
            db.close()
        moved = [p for p, letter in enumerate(cluster.cells()["S2"]) if letter == "U"]
        cluster.nodes["S2"].kill()
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(cluster.database(2) + suffix):
                os.remove(cluster.database(2) + suffix)
        wait_until(lambda: cluster.cluster_state() == "RECOVERING", 30, "recovering")
        # ("no partition table yet" until S1 answered the new recovery)
        lines, value = wait_until(lambda: (lambda r: isinstance(r, tuple) and r)(
            neoctl(cluster, "print", "pt_history")), 30, "the table from S1")
        assert [t["operational"] for t in value["tables"]] == [False] * len(value["tables"])
        assert value["tables"][-1]["ptid"] == 1
        for table in value["tables"]:
            assert table["unreadable"] == moved and table["storages"] == ["S1"], table
        assert neoctl(cluster, "recover_pt", "1") == (
            "partition table 1 is not operational with the storages present: no readable copy"
            " of partitions %s" % " ".join(map(str, moved)))
    finally:
        cluster.kill()
