"""Pack with garbage collection on a real cluster: what goes, what stays,
storages that are down or restarted during a pack, commits going on."""
from __future__ import annotations

import os
import re
import sqlite3
import threading

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping
from test_replication import all_up_to_date
from ZODB.POSException import POSKeyError

from neozodb.cli.cluster import LocalCluster, wait_until
from neozodb.client import Storage
from neozodb.protocol import NodeStates, u64
from neozodb.tid import time_from_tid
from replicas import raw_contents
from writers import Writers

pytestmark = pytest.mark.timeout(240)


def print_pack(cluster) -> tuple[list[str], dict]:
    return cluster.neoctl("print", "pack")


def completed_by(cluster, names) -> bool:
    """Every pack order is completed by (at least) the storages ``names``."""
    orders = print_pack(cluster)[1]["orders"]
    return bool(orders) and all(set(names) <= set(o["completed"]) for o in orders)


def make_garbage(root, key: str, count: int, per_txn: int = 500) -> list[bytes]:
    """root[key]: a mapping of ``count`` mappings, then unlinked: the oids
    of every object that became unreachable."""
    container = root[key] = PersistentMapping()
    transaction.commit()
    for i in range(count):
        container[i] = PersistentMapping(n=i, blob=b"x" * 100)
        if i % per_txn == per_txn - 1:
            transaction.commit()
    transaction.commit()
    oids = [container._p_oid] + [container[i]._p_oid for i in range(count)]
    del root[key]
    transaction.commit()
    return oids


def gone(storage, oid: bytes, serials) -> bool:
    for serial in serials:
        try:
            storage.loadSerial(oid, serial)
            return False
        except POSKeyError:
            pass
    try:
        storage.load(oid)
        return False
    except POSKeyError:
        return True


def test_gc_removes_unreachable_subgraph(cluster):
    storage = Storage(cluster.masters, cluster.name)
    db = ZODB.DB(storage)
    conn = db.open()
    root = conn.root()
    root["keep"] = keep = PersistentMapping(v=0)
    root["a"] = a = PersistentMapping()
    a["b"] = b = PersistentMapping()
    b["c"] = c = PersistentMapping(back=a)        # a cycle
    transaction.commit()
    serials = {}
    for i in range(1, 4):
        keep["v"] = i
        a["n"] = b["n"] = i
        transaction.commit()
        for obj in (keep, a, b, c):
            serials.setdefault(obj._p_oid, []).append(obj._p_serial)
    # unreachable at pack time but changed afterwards: kept, with what the
    # change references
    root["late"] = late = PersistentMapping()
    transaction.commit()
    del root["a"], root["late"]
    transaction.commit()
    # just after that commit (the next one is much later)
    pack_time = time_from_tid(u64(root._p_serial)) + 1e-6
    late["child"] = child = PersistentMapping(x=1)
    transaction.commit()
    db.pack(pack_time)

    fresh = Storage(cluster.masters, cluster.name)
    try:
        for obj in (a, b, c):
            assert gone(fresh, obj._p_oid, serials[obj._p_oid]), obj._p_oid.hex()
            assert gone(storage, obj._p_oid, []), "the packing client still has it"
        # reachable: the current revision stays, the older ones go
        data, serial = fresh.load(keep._p_oid)
        assert serial == keep._p_serial == serials[keep._p_oid][-1]
        for old in serials[keep._p_oid][:-1]:
            with pytest.raises(POSKeyError):
                fresh.loadSerial(keep._p_oid, old)
        assert fresh.load(late._p_oid)[1] == late._p_serial
        assert fresh.load(child._p_oid)
    finally:
        fresh.close()
    lines, status = print_pack(cluster)
    assert len(status["orders"]) == 1
    order = status["orders"][0]
    assert (order["gc"], order["oids"], order["completed"]) == (True, 3, ["S1", "S2"])
    assert re.fullmatch(r"pack 0x[0-9a-f]+: up to 0x[0-9a-f]+ \(.*\), GC of 3 objects,"
                        r" approved; completed by S1 S2", lines[0]), lines
    root = conn.root()
    assert root["keep"]["v"] == 3
    db.close()
    cluster.stop()
    for i in (1, 2):
        path = os.path.join(cluster.directory, "storage%d.sqlite" % i)
        oids = {k[1] for _, objs in raw_contents(path).values() for k in objs}
        assert not oids & {u64(o._p_oid) for o in (a, b, c)}
        with sqlite3.connect(path) as db_:
            # no data row left behind
            assert db_.execute("SELECT COUNT(*) FROM data WHERE id NOT IN"
                               " (SELECT data_id FROM obj WHERE data_id IS NOT NULL)"
                               ).fetchone()[0] == 0
    # a new master learns the orders from the storages, which report again
    cluster.start(wait=60)
    wait_until(lambda: completed_by(cluster, ["S1", "S2"]), 30, "reports after restart")
    assert print_pack(cluster)[1]["orders"] == [order]


def test_storage_down_during_pack_packs_when_back(cluster):
    storage = Storage(cluster.masters, cluster.name)
    db = ZODB.DB(storage)
    root = db.open().root()
    # garbage and history S2 has, then what it misses
    garbage = make_garbage(root, "g1", 300, per_txn=100)
    s2 = cluster.nodes["S2"]
    s2.kill()
    wait_until(lambda: cluster.storage_state("S2") is NodeStates.DOWN, 30, "S2 down")
    garbage += make_garbage(root, "g2", 300, per_txn=100)
    for i in range(5):
        root["counter"] = i
        transaction.commit()
    db.pack()          # waits for S1 only: S2 is not running
    assert gone(storage, garbage[5], [])
    lines, status = print_pack(cluster)
    assert status["orders"][0]["completed"] == ["S1"] and status["waited_for"] == ["S1"]
    db.close()
    s2.start()
    wait_until(lambda: all_up_to_date(cluster, {"S1", "S2"}), 60, "S2 up to date")
    wait_until(lambda: completed_by(cluster, ["S1", "S2"]), 60, "S2 packed")
    cluster.stop()
    s1 = raw_contents(os.path.join(cluster.directory, "storage1.sqlite"))
    s2 = raw_contents(os.path.join(cluster.directory, "storage2.sqlite"))
    assert s1 == s2
    assert not {u64(o) for o in garbage} & {k[1] for _, objs in s1.values() for k in objs}


def pack_progress(path: str) -> list[tuple]:
    db = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    try:
        return db.execute("SELECT partition, done, target, next_oid FROM pack_progress").fetchall()
    except sqlite3.OperationalError:  # busy
        return []
    finally:
        db.close()


def pack_log(node) -> dict[int, int]:
    """Partition -> objects visited, from this run of a storage's log."""
    with open(node.logfile, "rb") as f:
        f.seek(node.log_offset)
        text = f.read().decode("utf-8", "replace")
    return {int(p): int(n) for p, n in re.findall(
        r"partition (\d+) packed up to order \S+ \(\d+ orders, (\d+) objects visited", text)}


def test_restart_mid_pack_resumes(tmp_path):
    # a chunk (1000 revisions), then 3 s of rest
    cluster = LocalCluster(str(tmp_path / "c"), name="resume", storages=2, replicas=1,
                           partitions=2, storage_args=["--pack-rate", "300"])
    try:
        cluster.start(wait=60)
        s1 = cluster.nodes["S1"]
        db = ZODB.DB(Storage(cluster.masters, cluster.name))
        root = db.open().root()
        garbage = make_garbage(root, "g", 2200)  # 2 chunks per partition
        # objects per partition: the garbage, and the root in partition 0
        objects = {p: sum(1 for o in garbage if u64(o) % 2 == p) + (p == 0) for p in (0, 1)}
        done = threading.Event()
        packer = threading.Thread(target=lambda: (db.pack(), done.set()), daemon=True)
        packer.start()
        path = os.path.join(cluster.directory, "storage1.sqlite")

        def half_packed():
            # a partition half packed (committed: a kill cannot undo it)
            return [p for p, _, target, next_oid in pack_progress(path)
                    if target is not None and next_oid > 0]
        (partition, *_) = wait_until(half_packed, 60, "S1 in the middle of a partition")
        assert not done.is_set()
        s1.kill()
        del s1.argv[-2:]
        s1.start()
        # its cells become readable once the pending order is applied
        wait_until(lambda: all_up_to_date(cluster, {"S1", "S2"}), 60, "S1 up to date")
        wait_until(lambda: completed_by(cluster, ["S1", "S2"]), 60, "S1 packed")
        packer.join(60)
        assert done.is_set()
        visited = pack_log(s1)
        # the interrupted partition resumed where it was, not from its start
        assert 0 < visited[partition] < objects[partition], (visited, objects)
        storage = Storage(cluster.masters, cluster.name)
        try:
            assert all(gone(storage, oid, []) for oid in garbage[::97])
        finally:
            storage.close()
        db.close()
        cluster.stop()
        assert raw_contents(path) == raw_contents(
            os.path.join(cluster.directory, "storage2.sqlite"))
    finally:
        cluster.kill()


def pack_while_writers_commit(cluster, tmp_path, db, garbage, timeout: float) -> None:
    """Writers commit all along a pack of ``db``: commits complete while
    the storages apply the order (not after the whole pack), none fails,
    every acknowledged one is readable, and ``garbage`` is gone."""
    writers = Writers(cluster, tmp_path)
    try:
        wait_until(writers.more(5), 60, "first commits")
        done = threading.Event()
        packer = threading.Thread(target=lambda: (db.pack(), done.set()), daemon=True)
        packer.start()
        # the order is committed and being applied...
        wait_until(lambda: print_pack(cluster)[1]["orders"], timeout, "the pack order")
        wait_until(writers.more(10), 60, "commits during the pack")
        # ...and these commits completed before the pack did
        assert not completed_by(cluster, ["S1", "S2"]) and not done.is_set()
        packer.join(timeout)
        assert done.is_set()
        wait_until(writers.more(5), 60, "commits after the pack")
    finally:
        writers.stop()
    writers.check()  # every acknowledged commit is readable: nothing reachable went
    storage = Storage(cluster.masters, cluster.name)
    try:
        assert all(gone(storage, oid, []) for oid in garbage[::max(1, len(garbage) // 60)])
    finally:
        storage.close()


def test_commits_go_on_during_a_pack(tmp_path):
    cluster = LocalCluster(str(tmp_path / "c"), name="busy", storages=2, replicas=1,
                           partitions=12, storage_args=["--pack-rate", "300"])  # > 10 s of pack
    try:
        cluster.start(wait=60)
        db = ZODB.DB(Storage(cluster.masters, cluster.name))
        garbage = make_garbage(db.open().root(), "g", 3000)
        pack_while_writers_commit(cluster, tmp_path, db, garbage, 120)
        db.close()
    finally:
        cluster.kill()


def test_undo_log_after_pack_and_undo_of_packed_away(cluster):
    """After a pack, the undo log shows only what came after the pack
    point (not the pack transaction), and undoing an older transaction
    raises UndoError."""
    from ZODB.POSException import UndoError
    from ZODB.serialize import referencesf
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    try:
        conn = db.open()
        root = conn.root()
        for i in range(3):
            root["v"] = i
            transaction.commit()
        old = db.storage.undoLog(0, 10)
        before_pack = db.lastTransaction()
        root["v"] = "after"
        transaction.commit()
        after = db.lastTransaction()
        # a float time is coarser than a TID: just past before_pack
        db.storage.pack(time_from_tid(u64(before_pack)) + 1e-6, referencesf)
        log = db.storage.undoLog(0, 10)
        assert [d["id"] for d in log] == [after]
        db.undo(old[0]["id"])  # the transaction that set v to 2: packed away
        with pytest.raises(UndoError):
            transaction.commit()
        transaction.abort()
        assert root["v"] == "after"
    finally:
        db.close()


def test_commits_go_on_during_a_pack_of_100000_objects(tmp_path):
    """The scale of the issue, without a rate cap: 100,000 objects, 60,000
    of them unreachable."""
    cluster = LocalCluster(str(tmp_path / "c"), name="big", storages=2, replicas=1,
                           partitions=12)
    try:
        cluster.start(wait=60)
        db = ZODB.DB(Storage(cluster.masters, cluster.name), cache_size=1000)
        conn = db.open()
        root = conn.root()
        keep = root["keep"] = PersistentMapping()
        for i in range(40000):
            keep[i] = PersistentMapping(n=i)
            if i % 5000 == 4999:
                transaction.commit()
                conn.cacheGC()
        garbage = make_garbage(root, "g", 60000, per_txn=5000)
        conn.cacheGC()
        pack_while_writers_commit(cluster, tmp_path, db, garbage, 180)
        storage = Storage(cluster.masters, cluster.name)
        try:
            assert storage.load(keep._p_oid)[0]
        finally:
            storage.close()
        assert {keep[i]["n"] for i in range(0, 40000, 997)} == set(range(0, 40000, 997))
        db.close()
    finally:
        cluster.kill()


def test_deletion_packed_away_while_a_replica_was_down(cluster):
    """An object deleted (deleteObject) and packed away while S2 is down:
    the deletion record is gone from S1 when S2 comes back, so S2 must not
    resume replication where it stopped (its old revision of the object
    would live on, served once S1 is gone); it compares every object of the
    partitions the source packed meanwhile."""
    import time

    from ZODB.Connection import TransactionMetaData
    from ZODB.serialize import referencesf
    db = ZODB.DB(Storage(master_nodes=cluster.masters, name=cluster.name))
    try:
        with db.transaction() as conn:
            conn.root()["doomed"] = PersistentMapping(v=1)
        with db.transaction() as conn:
            oid = conn.root()["doomed"]._p_oid
            del conn.root()["doomed"]
    finally:
        db.close()
    cluster.nodes["S2"].kill()
    wait_until(lambda: cluster.storage_state("S2") not in (None, NodeStates.RUNNING), 30,
               "S2 to be seen down")
    st = Storage(master_nodes=cluster.masters, name=cluster.name)
    try:
        txn = TransactionMetaData()
        st.tpc_begin(txn)
        st.deleteObject(oid, st.load(oid)[1], txn)
        st.tpc_vote(txn)
        st.tpc_finish(txn)
        st.pack(time.time(), referencesf, gc=False)
        with pytest.raises(POSKeyError):
            st.load(oid)
    finally:
        st.close()
    cluster.storage(2).start()
    wait_until(lambda: all_up_to_date(cluster, {"S1", "S2"}), 60, "S2 up to date")
    cluster.nodes["S1"].kill()
    wait_until(lambda: cluster.storage_state("S1") not in (None, NodeStates.RUNNING), 30,
               "S1 to be seen down")
    st = Storage(master_nodes=cluster.masters, name=cluster.name)
    try:
        with pytest.raises(POSKeyError):
            st.load(oid)  # from S2 alone
    finally:
        st.close()
