"""Bulk copies (feature bulk-copy, client/bulk.py): a copy into a cluster
commits many transactions of its source per two-phase commit, and the
cluster holds exactly what the source has, transaction by transaction;
other clients see each transaction of a batch as its own commit; where
the partitions are not all on the same storages the copy goes one
transaction at a time; and a copy whose whole cluster is SIGKILLed at any
moment leaves the destination with a prefix of the source, from which
``neomigrate --incremental`` goes on."""
from __future__ import annotations

import io
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
from pickle import Unpickler

import pytest
import transaction
import ZODB
from test_crash import all_up_to_date, kill_all, pause
from test_migrate import neomigrate, obj_rows
from ZODB.FileStorage import FileStorage
from ZODB.POSException import POSKeyError
from ZODB.utils import p64, u64, z64

from fsdata import commit, in_cluster, made, make_filestorage, transactions
from neozodb.cli.cluster import LocalCluster, wait_until
from neozodb.client import Storage
from neozodb.client import bulk as client_bulk
from neozodb.client.copying import copy
from seeds import replay_seed

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def source_path(tmp_path_factory):
    """A FileStorage with a bit of everything (tests/fsdata.py): stores,
    undos (back-pointers, undone creations), deletions, BTree merges,
    extension data, and a transaction storing an object twice."""
    path = str(tmp_path_factory.mktemp("bulk") / "source.fs")
    make_filestorage(path, transactions=600, objects=80)
    return path


def _source(path):
    return FileStorage(path, read_only=True)


@pytest.mark.parametrize("layout", [(1, 0), (2, 1), (2, 0)], ids=["1S-r0", "2S-r1", "2S-r0"])
def test_bulk_copy_equals_the_source(tmp_path, source_path, layout):
    """Small batches (17 transactions), so that many are in flight.  With
    2 storages and no replicas, the partitions are on different storages:
    no batch, each transaction by itself."""
    storages, replicas = layout
    cluster = LocalCluster(str(tmp_path / "cluster"), name="test", storages=storages,
                           replicas=replicas, partitions=6).start_or_kill()
    source = _source(source_path)
    storage = Storage(**cluster.client_kwargs())
    try:
        seen = []
        result = copy(source, storage, done=lambda tid, records: seen.append(tid), batch=17)
        expected = transactions(source.iterator())
        assert seen == [t[0] for t in expected]  # reported in order, each once
        assert result.transactions == len(expected) > 600
        if replicas == storages - 1:
            assert result.batches == -(-len(expected) // 17)
        else:
            assert result.batches == 0
        assert storage.lastTransaction() == expected[-1][0]
        assert transactions(storage.iterator()) == expected
        if storages == 2 and replicas:
            wait_until(lambda: obj_rows(cluster, 1) == obj_rows(cluster, 2), 30,
                       "the same revisions on both storages")
        # the application sees the source's state, and goes on committing
        db = ZODB.DB(storage)
        tm = transaction.TransactionManager()
        root = db.open(tm).root()
        assert dict(root["tree"]) == dict(ZODB.DB(_source(source_path)).open(
            transaction.TransactionManager()).root()["tree"])
        root["mapping"]["after"] = 1
        tm.commit()
    finally:
        storage.close()
        source.close()
        cluster.kill()


def test_batches_the_storages_refuse_are_copied_one_by_one(tmp_path, source_path, monkeypatch):
    """A batch the client sent because its table showed the partitions on
    the same storages, UP_TO_DATE, while the storages' tables no longer do
    (a storage lost meanwhile): each storage refuses it (NOT_READY), and its
    transactions are copied one by one, with the TIDs the master had given
    the batch.  Made certain here with 2 storages and no replicas, the
    client believing every partition is on both: every batch is refused.
    Until session 24 the first of them was refused by the master (the
    batch's TIDs stayed taken), and its last by the storages (they
    remembered the batch's TTID, the last transaction's TID, as aborted)."""
    from neozodb.pt import PartitionTable
    cluster = LocalCluster(str(tmp_path / "cluster"), name="test", storages=2, replicas=0,
                           partitions=6).start_or_kill()
    source = _source(source_path)
    storage = Storage(**cluster.client_kwargs())
    monkeypatch.setattr(PartitionTable, "same_cells", lambda self, offsets: sorted(self.nids()))
    try:
        seen = []
        result = copy(source, storage, done=lambda tid, records: seen.append(tid), batch=17)
        expected = transactions(source.iterator())
        assert seen == [t[0] for t in expected]
        assert result.transactions == len(expected) and result.batches == 0
        assert transactions(storage.iterator()) == expected
    finally:
        storage.close()
        source.close()
        cluster.kill()


def test_copy_goes_on_without_a_lost_storage_and_with_it_back(cluster, source_path,
                                                               monkeypatch, caplog):
    """2 storages, replicas 1: S2 is killed while it votes a batch (stopped
    before the batch leaves: it never answers), which goes on without it,
    as any commit (FailedVote); the copy goes on one transaction at a time
    while S2's cells are not UP_TO_DATE, and in batches again once S2 is
    back and caught up."""
    source = _source(source_path)
    storage = Storage(**cluster.client_kwargs())
    pt = storage.app.pt
    uniform = lambda: pt.same_cells(range(pt.num_partitions)) is not None  # noqa: E731
    copied = []
    send = client_bulk.BulkCopier.send

    def send_then_kill_s2(self, batch):
        if len(copied) != 60:
            return send(self, batch)
        s2 = cluster.nodes["S2"]
        s2.signal(signal.SIGSTOP)
        try:
            sent = send(self, batch)
            # killed only once S1 voted (S2, stopped, cannot answer first):
            # S1 told of S2's loss before its vote would refuse the batch
            # (cells not all UP_TO_DATE), copied then one transaction at a
            # time, and FailedVote would not be used
            sent.votes.put(sent.votes.get(timeout=60))
            return sent
        finally:
            s2.kill()

    monkeypatch.setattr(client_bulk.BulkCopier, "send", send_then_kill_s2)

    def done(tid, records):
        copied.append(tid)
        if len(copied) == 300:
            wait_until(lambda: not uniform(), 30, "S2's cells out of date in the client's table")
            cluster.nodes["S2"].start()
            wait_until(uniform, 60, "S2 back and caught up")
    try:
        result = copy(source, storage, done=done, batch=20)
        expected = transactions(source.iterator())
        assert copied == [t[0] for t in expected]
        # 3 batches before the loss and the one voted without S2, none
        # while S2 is out, batches again after
        assert 4 + (len(expected) - 320) // 20 <= result.batches < len(expected) // 20
        assert transactions(storage.iterator()) == expected
        assert any("goes on without S2" in r.getMessage() for r in caplog.records)
        wait_until(lambda: obj_rows(cluster, 1) == obj_rows(cluster, 2), 60,
                   "the same revisions on both storages")
    finally:
        storage.close()
        source.close()


class Failing:
    """A source whose iteration fails after ``count`` transactions."""

    def __init__(self, source, count: int) -> None:
        self.source = source
        self.count = count

    def iterator(self, start=None):
        for i, txn in enumerate(self.source.iterator(start)):
            if i == self.count:
                raise OSError("source unreadable")
            yield txn


def test_failed_copy_reports_what_it_committed_and_holds_no_lock(one_storage, source_path):
    """The source fails with a batch voted and the one before it being
    finished: that one is waited for and reported, the voted one dropped
    (its locks with it: an ordinary commit of its objects goes through at
    once), and the destination holds exactly what was reported."""
    source = _source(source_path)
    storage = Storage(**one_storage.client_kwargs())
    try:
        seen = []
        with pytest.raises(OSError, match="source unreadable"):
            copy(Failing(source, 50), storage, done=lambda tid, records: seen.append(tid),
                 batch=20)
        expected = transactions(source.iterator())
        assert seen == [t[0] for t in expected[:20]]
        assert transactions(storage.iterator()) == expected[:20]
        # every object the dropped batch wrote, in one ordinary commit
        stores = []
        for oid in {record[0] for t in expected[20:40] for record in t[5]}:
            try:
                serial = storage.load(oid)[1]
            except POSKeyError:
                serial = z64
            stores.append((oid, serial, b"after"))
        committed = threading.Event()

        def commit_over():
            commit(storage, stores)
            committed.set()
        thread = threading.Thread(target=commit_over, daemon=True)
        thread.start()
        assert committed.wait(10), "the voted batch kept its locks"
    finally:
        storage.close()
        source.close()


def test_a_big_transaction_goes_alone(one_storage, tmp_path):
    """A transaction of more than BATCH_BYTES of records is copied by
    itself, between the batches before and after it."""
    path = str(tmp_path / "source.fs")
    fs = FileStorage(path, create=True)
    oids = [p64(i) for i in range(1, 4)]
    serials = dict.fromkeys(oids, z64)
    for i in range(21):
        oid = oids[i % 3]
        data = os.urandom(client_bulk.BATCH_BYTES + 1) if i == 10 else b"small %d" % i
        serials[oid] = commit(fs, [(oid, serials[oid], data)])
    fs.close()
    source = FileStorage(path, read_only=True)
    storage = Storage(**one_storage.client_kwargs())
    try:
        result = copy(source, storage, batch=4)
        assert (result.transactions, result.batches) == (21, 6)  # 4 4 2, alone, 4 4 2
        assert transactions(storage.iterator()) == transactions(source.iterator())
    finally:
        storage.close()
        source.close()


def _committed(path, values) -> list[bytes]:
    """Commit each of ``values`` as the root's "n", in a transaction of its
    own, into the FileStorage at ``path``; their TIDs."""
    db = ZODB.DB(FileStorage(path))
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        tids = []
        for value in values:
            conn.root()["n"] = value
            tm.commit()
            tids.append(conn.root()._p_serial)
        return tids
    finally:
        db.close()


def test_other_clients_see_each_transaction_of_a_batch(cluster, tmp_path):
    """A client that had the root in its cache when a batch changed it 5
    times reads each of the 5 revisions before the next one: the master
    tells it of each transaction of the batch, not only of the last (its
    cache would else keep the old revision valid up to there)."""
    path = str(tmp_path / "source.fs")
    (first,) = _committed(path, [0])
    copier, reader = Storage(**cluster.client_kwargs()), Storage(**cluster.client_kwargs())
    try:
        source = FileStorage(path, read_only=True)
        copy(source, copier)
        source.close()
        reader.app.sync()  # every invalidation before this barrier was processed
        assert reader.load(z64)[1] == first  # in its cache from now on
        tids = _committed(path, [1, 2, 3, 4, 5])
        source = FileStorage(path, read_only=True)
        result = copy(source, copier, start=tids[0])
        source.close()
        assert (result.transactions, result.batches) == (5, 1)
        reader.app.sync()  # every invalidation before this barrier was processed
        for before, (start, end) in zip([first, *tids], zip([first, *tids], [*tids, None],
                                                             strict=True), strict=True):
            later = p64(u64(before) + 1)
            data, serial, next_serial = reader.loadBefore(z64, later)
            assert (serial, next_serial) == (start, end)
            assert _value(data) == [first, *tids].index(start)
        assert _value(reader.load(z64)[0]) == 5
    finally:
        copier.close()
        reader.close()


def _value(pickle: bytes) -> int:
    """The root's "n" in one of its records."""
    unpickler = Unpickler(io.BytesIO(pickle))
    unpickler.load()  # the class
    return unpickler.load()["data"]["n"]


def _trans_rows(cluster) -> int:
    """Transactions committed on storage 1, as its database file says."""
    path = os.path.join(cluster.directory, "storage1.sqlite")
    try:
        conn = sqlite3.connect("file:%s?mode=ro" % path, uri=True, timeout=1)
        try:
            return conn.execute("SELECT COUNT(*) FROM trans").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


@pytest.mark.parametrize("layout", [(1, 0), (2, 1)], ids=["1S-r0", "2S-r1"])
def test_killed_copy_leaves_a_prefix_and_goes_on(tmp_path, layout):
    """``neomigrate --batch 20`` into a cluster whose every node is
    SIGKILLed at a random moment of the copy, 3 times: after each restart
    the destination holds the source's first transactions, whole, with
    none missing in between (a batch is committed whole, or from its first
    transaction on: storage/bulk.py), and ``--incremental`` goes on."""
    rng = random.Random(replay_seed("NEOZODB_BULK_CRASH_SEED", "bulk copy crash"))
    path = str(tmp_path / "source.fs")
    expected = made(path, 3000, 200)
    storages, replicas = layout
    cluster = LocalCluster(str(tmp_path / "cluster"), name="test", storages=storages,
                           replicas=replicas, partitions=6).start_or_kill()
    args = ["-q", "-c", cluster.name, "--incremental", "--batch", "20", path, cluster.masters]
    try:
        copied = 0
        for r in range(3):
            proc = subprocess.Popen([sys.executable, "-m", "neozodb.cli.migrate", *args],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_until(lambda p=proc, n=copied: _trans_rows(cluster) > n + 20
                           or p.poll() is not None, 120, "round %d of the copy under way" % r)
                pause(rng.uniform(0, 0.03))
                kill_all(cluster, rng)
            finally:
                proc.kill()
                proc.wait()
            for node in cluster.nodes.values():
                node.start()
            cluster.wait_state("RUNNING", 60)
            got = in_cluster(cluster)
            assert got == expected[:len(got)], "round %d: not a prefix of the source" % r
            assert len(got) >= copied
            copied = len(got)
        done = neomigrate(*args)
        assert done.returncode == 0, done.stderr
        assert in_cluster(cluster) == expected
        if storages == 2:
            wait_until(lambda: all_up_to_date(cluster)
                       and obj_rows(cluster, 1) == obj_rows(cluster, 2), 60,
                       "the same revisions on both storages")
    finally:
        cluster.kill()
