"""Crash safety: every node SIGKILLed (or the master alone) while client
processes commit.  After the restart, every acknowledged transaction is
there exactly once, and no other transaction is there in part: checked
object by object, revision by revision, and on both replicas.  The moments
of the kills come from a seed, printed; NEOZODB_CRASH_SEED=<seed> replays
them (as far as the timing of processes allows)."""
from __future__ import annotations

import os
import random
import signal
import threading

import pytest
import ZODB
from ZODB.Connection import TransactionMetaData
from ZODB.utils import z64

from neozodb.cli.cluster import LocalCluster, wait_until
from neozodb.client import Storage
from neozodb.protocol import NodeStates, u64
from seeds import replay_seed
from writers import LoggingWriter, create_writer_objects, wait_acknowledged

pytestmark = pytest.mark.timeout(180)

OBJECTS = 5  # objects every transaction of a writer sets, besides its counter
WRITERS = ("w0", "w1")


def logging_writers(cluster, directory) -> list[LoggingWriter]:
    """The writers (tests/writers.py's LOGGING_WRITER), their objects
    created; they stop once their ``stop_file`` exists."""
    create_writer_objects(cluster, WRITERS, OBJECTS)
    return [LoggingWriter(w, str(directory / (w + ".log")), OBJECTS, str(directory / "stop"))
            for w in WRITERS]


def wait_commits(writers, count: int, what: str) -> None:
    """Each writer acknowledges ``count`` more commits."""
    wait_acknowledged(writers, [count] * len(writers), 60, what)


def pause(seconds: float) -> None:
    """A deliberate delay: the random moments of the kills are the point of
    this test, it waits for no condition."""
    threading.Event().wait(seconds)


def kill_all(cluster, rng: random.Random | None = None) -> None:
    """SIGKILL every node, then reap them.  With ``rng``: at a random
    moment of the next few commits, in a random order, and in some rounds
    a few milliseconds apart, so that the master may see a storage die (and
    outdate its cells, or complete commits without it) before it dies too."""
    nodes = list(cluster.nodes.values())
    gap = 0
    if rng is not None:
        pause(rng.uniform(0, 0.03))
        gap = rng.choice((0, 0, 0.002, 0.01))
        rng.shuffle(nodes)
    for node in nodes:
        node.signal(signal.SIGKILL)
        if gap:
            pause(gap)
    cluster.kill()


def cells(cluster) -> dict[str, str]:
    return {line.split()[0]: line.split()[2] for line in cluster.pt_lines()[1:]}


def all_up_to_date(cluster) -> bool:
    return all(set(row) <= {"U", "."} for row in cells(cluster).values())


def check_writers(cluster, writers) -> dict[str, dict]:
    """Through a fresh client: the state of each writer is one whole
    transaction n, acknowledged or announced; its history holds every
    acknowledged tid exactly once, and each revision in it is whole.
    Returns {writer: {tid: n}} of the committed transactions."""
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    storage = db.storage
    committed = {}
    try:
        root = db.open().root()
        for writer in writers:
            w = writer.name
            about, acked, _ = writer.read()
            assert acked, "writer %s never committed" % w
            objects = [root["%s.%d" % (w, k)] for k in range(OBJECTS)]
            counter = root[w + ".n"]
            n = counter["n"]
            assert max(acked) <= n <= about, (w, max(acked), n, about)
            assert [obj["v"] for obj in objects] == [(w, n)] * OBJECTS
            # every revision of the counter is a whole transaction, every
            # acknowledged one is there once, with its tid
            history = storage.history(counter._p_oid, size=1 << 20)
            tids = [h["tid"] for h in history]
            assert len(set(tids)) == len(tids)
            revisions = {}
            for tid in tids:
                revisions[tid] = load_value(db, storage.loadSerial(counter._p_oid, tid))["n"]
            ns = [revisions[tid] for tid in sorted(tids)]
            assert ns == sorted(set(ns)) and ns[0] == 0, ns  # n only grows
            for n_acked, tid in acked.items():
                assert revisions.get(tid) == n_acked, (w, n_acked, tid.hex())
            for obj in objects:
                obj_tids = [h["tid"] for h in storage.history(obj._p_oid, size=1 << 20)]
                assert sorted(obj_tids) == sorted(tids), w
                for tid in tids:
                    value = load_value(db, storage.loadSerial(obj._p_oid, tid))["v"]
                    assert value == (w, revisions[tid]), (w, tid.hex(), value)
            committed[w] = revisions
    finally:
        db.close()
    return committed


def load_value(db, pickle: bytes) -> dict:
    """The state of a PersistentMapping from its stored record."""
    from ZODB.serialize import ObjectReader
    return ObjectReader(None, None, db.classFactory).getState(pickle)["data"]


def check_replicas(cluster, committed) -> None:
    """Stop the cluster; then the copies of each partition are identical
    row by row, and each transaction of a writer is there once (by its
    description) with the tid the client saw."""
    from replicas import raw_contents as replica_contents
    grid = cells(cluster)
    cluster.stop()
    contents = {name: replica_contents(os.path.join(cluster.directory, "storage%s.sqlite"
                                                    % name[1:]))
                for name in grid}
    descriptions: dict[bytes, list[int]] = {}
    for p in range(cluster.partitions):
        holders = [name for name, row in grid.items() if row[p] == "U"]
        assert len(holders) == cluster.replicas + 1, (p, grid)
        first = contents[holders[0]][p]
        for other in holders[1:]:
            assert contents[other][p] == first, "partition %d differs on %s" % (p, other)
        for tid, (_, _, description, _, _, _) in first[0].items():
            descriptions.setdefault(description, []).append(tid)
    for w, revisions in committed.items():
        for tid, n in revisions.items():
            if n:  # 0: the setup transaction
                assert descriptions[("%s %d" % (w, n)).encode()] == [int.from_bytes(tid, "big")]
    # no transaction of a writer is there twice, acknowledged or not
    assert all(len(tids) == 1 for description, tids in descriptions.items()
               if description.split(b" ")[0].decode() in WRITERS)


def crash_rounds(cluster, tmp_path, rounds: int) -> list[LoggingWriter]:
    rng = random.Random(replay_seed("NEOZODB_CRASH_SEED", "crash"))
    writers = logging_writers(cluster, tmp_path)
    for r in range(rounds):
        for writer in writers:
            writer.start(cluster)
        try:
            wait_commits(writers, 3, "commits of round %d" % r)
            kill_all(cluster, rng)
        finally:
            for writer in writers:
                writer.kill()
        for node in cluster.nodes.values():
            node.start()
        cluster.wait_state("RUNNING", 60)
    wait_until(lambda: all_up_to_date(cluster), 60, "replication after the last restart")
    return writers


@pytest.mark.parametrize("storages", [2, 3])
def test_whole_cluster_killed_while_committing(tmp_path, storages):
    cluster = LocalCluster(str(tmp_path / "cluster"), name="test", storages=storages,
                           replicas=1, partitions=12)
    try:
        cluster.start(wait=60)
        writers = crash_rounds(cluster, tmp_path, rounds=8 if storages == 2 else 6)
        committed = check_writers(cluster, writers)
        check_replicas(cluster, committed)
    finally:
        cluster.kill()


def test_master_killed_while_committing(cluster, tmp_path):
    rng = random.Random(replay_seed("NEOZODB_CRASH_SEED", "crash"))
    writers = logging_writers(cluster, tmp_path)
    for writer in writers:
        writer.start(cluster)
    try:
        wait_commits(writers, 3, "first commits")
        master = cluster.nodes["M1"]
        for r in range(3):
            pause(rng.uniform(0, 0.03))
            master.kill()
            master.start()
            cluster.wait_state("RUNNING", 60)
            # the writers go on with the new master, retrying what failed
            wait_commits(writers, 5, "commits after restart %d of the master" % r)
    finally:
        open(writers[0].stop_file, "w").close()
        for writer in writers:
            code = writer.proc.wait(60)
            with open(writer.stderr) as f:
                assert code == 0, f.read()
    committed = check_writers(cluster, writers)
    for writer in writers:
        about, acked, errors = writer.read()
        # whatever failed was retried: the last commit was acknowledged
        assert max(acked) == about
        print(writer.name, len(acked), "commits acknowledged,", errors, "failed and retried")
    check_replicas(cluster, committed)


def voted(storage, records: dict) -> TransactionMetaData:
    """A transaction storing {oid: (data, serial)}, voted."""
    txn = TransactionMetaData()
    storage.tpc_begin(txn)
    for oid, (data, serial) in records.items():
        storage.store(oid, serial, data, "", txn)
    storage.tpc_vote(txn)
    return txn


def test_validated_transaction_does_not_hide_missed_commits(cluster):
    """S1 dies with transaction B voted; A commits without S1, then B
    (tid > A's), and the whole cluster dies before S2 makes B's unlock
    durable.  After the restart, verification validates B on both storages:
    S1 gets B's rows in its OUT_OF_DATE cells, newer than A, which it
    missed; replication must bring A all the same."""
    storage = Storage(cluster.masters, cluster.name)
    other = Storage(cluster.masters, cluster.name)
    try:
        oids = [storage.new_oid() for _ in range(cluster.partitions + 1)]
        y, z = oids[0], oids[-1]  # same partition
        assert u64(y) % cluster.partitions == u64(z) % cluster.partitions
        txn = voted(storage, {y: (b"y0", z64), z: (b"z0", z64)})
        first = storage.tpc_finish(txn)
        txn_b = voted(storage, {z: (b"z1", first)})
        ttid_b = storage._commit(txn_b).ttid
        cluster.nodes["S1"].kill()
        wait_until(lambda: cluster.storage_state("S1") is NodeStates.DOWN, 30, "S1 down")
        tid_a = other.tpc_finish(voted(other, {y: (b"y1", first)}))
        tid_b = storage.tpc_finish(txn_b)
        assert tid_a < tid_b
        kill_all(cluster)  # within the second S2 may keep B's unlock pending
    finally:
        storage.close()
        other.close()
    master = cluster.nodes["M1"]
    for node in cluster.nodes.values():
        node.start()
    cluster.wait_state("RUNNING", 60)
    wait_until(lambda: all_up_to_date(cluster), 60, "S1 up to date")
    with open(master.logfile, "rb") as f:
        f.seek(master.log_offset)
        assert b"validating transaction " + ttid_b.hex().encode() in f.read()
    check_replicas(cluster, {})
    from replicas import raw_contents as replica_contents
    s1 = replica_contents(os.path.join(cluster.directory, "storage1.sqlite"))
    a = u64(tid_a)
    assert (a, u64(y)) in s1[u64(y) % cluster.partitions][1], "S1 lacks A's object"
    assert a in s1[a % cluster.partitions][0], "S1 lacks A's metadata"
