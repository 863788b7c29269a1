"""The pipelined copy into a cluster (client/copying.py; neomigrate,
copyTransactionsFrom, zodbconvert): each transaction's finish overlaps the
copy of the next ones, which often restore the very objects still being
finished; and a copy that fails stops with the destination holding exactly
the transactions reported copied, from which it can go on.  These are
the copies of one transaction at a time (``batch=0``); tests/cluster/
test_bulk_copy.py has the copies of many transactions per commit."""
from __future__ import annotations

import threading

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping
from ZODB.blob import Blob
from ZODB.FileStorage import FileStorage
from ZODB.POSException import StorageTransactionError

from fsdata import transactions
from neozodb.client import Storage
from neozodb.client.copying import copy
from neozodb.client.storage import COPY_WINDOW

pytestmark = pytest.mark.timeout(240)
COMMITS = 120


@pytest.fixture
def source(tmp_path):
    """A FileStorage whose every transaction changes the same two objects
    (and adds one): each restore waits for the previous transaction's lock."""
    path = str(tmp_path / "source.fs")
    db = ZODB.DB(FileStorage(path, create=True))
    try:
        tm = transaction.TransactionManager()
        root = db.open(tm).root()
        root["a"], root["b"] = PersistentMapping(), PersistentMapping()
        tm.commit()
        for i in range(COMMITS):
            root["a"]["n"] = root["b"]["n"] = i
            root["new%d" % i] = PersistentMapping(i=i)
            tm.get().note("commit %d" % i)
            tm.commit()
    finally:
        db.close()
    fs = FileStorage(path, read_only=True)
    yield fs
    fs.close()


def _copied(destination) -> list:
    return transactions(destination.iterator())


def _commit_over(storage, value) -> None:
    """An ordinary commit of the objects every copied transaction wrote:
    it goes through only if no aborted transaction kept their locks."""
    db = ZODB.DB(storage)
    tm = transaction.TransactionManager()
    root = db.open(tm).root()
    root["a"]["n"] = root["b"]["n"] = value
    tm.commit()
    assert db.open(transaction.TransactionManager()).root()["a"]["n"] == value


@pytest.mark.parametrize("batch", [0, None], ids=["one-by-one", "bulk"])
def test_pipelined_copy_equals_the_source(one_storage, source, batch):
    destination = Storage(**one_storage.client_kwargs())
    try:
        seen = []
        result = copy(source, destination, done=lambda tid, records: seen.append(tid),
                      batch=batch)
        expected = transactions(source.iterator())
        assert result.transactions == len(expected) == COMMITS + 2
        assert seen == [t[0] for t in expected]  # reported in order, each once
        assert result.last == expected[-1][0] == destination.lastTransaction()
        assert _copied(destination) == expected
        _commit_over(destination, -1)
    finally:
        destination.close()


class Recording:
    """The real client, recording when each transaction of the copy is
    voted, sent to finish and its finish answered.  The first vote waits
    until the copy queued two more transactions, so that what the
    finisher does next does not depend on how fast the source is read."""

    def __init__(self, storage) -> None:
        self.storage = storage
        self.index: dict = {}
        self.events: list = []
        self.queued = threading.Event()

    def __getattr__(self, name):
        return getattr(self.storage, name)

    def tpc_begin(self, txn, *args, **kw):
        self.index[txn] = n = len(self.index)
        if n == 3:  # transactions 1 and 2 were handed to the finisher
            self.queued.set()
        return self.storage.tpc_begin(txn, *args, **kw)

    def tpc_vote(self, txn):
        if self.index[txn] == 0:
            assert self.queued.wait(30)
        result = self.storage.tpc_vote(txn)
        self.events.append(("voted", self.index[txn]))
        return result

    def tpc_finish_later(self, txn, f=None):
        finished = self.storage.tpc_finish_later(txn, f)
        self.events.append(("finish sent", self.index[txn]))

        def answered():
            tid = finished()
            self.events.append(("answered", self.index[txn]))
            return tid
        return answered


def _in_flight(events) -> list[int]:
    """How many finishes were sent and not answered, after each event."""
    counts, n = [], 0
    for kind, _ in events:
        n += {"finish sent": 1, "answered": -1}.get(kind, 0)
        counts.append(n)
    return counts


def test_finishes_overlap_the_next_votes(one_storage, source):
    """Each transaction changes the objects the one before changed: its
    stores go through as soon as that one is locked (the storage lets a
    store based on a revision being committed take its lock), so it is
    voted while that one finishes; the master locks them in order
    (feature ordered-copy), and up to COPY_WINDOW finishes wait for their
    answers, read in order."""
    storage = Storage(**one_storage.client_kwargs())
    try:
        assert storage.pipelined_copy() == COPY_WINDOW > 1
        destination = Recording(storage)
        result = copy(source, destination, batch=0)
        events = destination.events
        assert events[:4] == [("voted", 0), ("finish sent", 0), ("voted", 1), ("finish sent", 1)]
        assert 2 <= max(_in_flight(events)) <= COPY_WINDOW
        finishes = [e for e in events if e[0] != "voted"]
        sent = [n for kind, n in finishes if kind == "finish sent"]
        answered = [n for kind, n in finishes if kind == "answered"]
        assert sent == answered == list(range(result.transactions))
        assert _copied(storage) == transactions(source.iterator())
        _commit_over(storage, -1)
    finally:
        storage.close()


def test_one_finish_at_a_time_without_ordered_locks(one_storage, source):
    """With a master that does not lock a copy's transactions in order
    (pipelined 1): the next transaction is voted while the previous one
    finishes, and its finish is sent only once that one is answered."""
    storage = Storage(**one_storage.client_kwargs())
    try:
        destination = Recording(storage)
        copy(source, destination, pipelined=1, batch=0)
        assert destination.events[:7] == [
            ("voted", 0), ("finish sent", 0), ("voted", 1), ("answered", 0),
            ("finish sent", 1), ("voted", 2), ("answered", 1)]
        assert max(_in_flight(destination.events)) == 1
        assert _copied(storage) == transactions(source.iterator())
    finally:
        storage.close()


class FailingFinish:
    """The real client, whose finish of one transaction fails (as when the
    master lost it: not committed).  Nothing is sent for it; it is aborted,
    and the master forgets the transactions of the copy begun after it,
    which the copy voted and asked to finish meanwhile."""

    def __init__(self, storage, fail_at: int) -> None:
        self.storage = storage
        self.finishes = 0
        self.fail_at = fail_at

    def __getattr__(self, name):
        return getattr(self.storage, name)

    def tpc_finish_later(self, txn, f=None):
        self.finishes += 1
        if self.finishes != self.fail_at:
            return self.storage.tpc_finish_later(txn, f)
        self.storage.tpc_abort(txn)

        def finished():
            raise StorageTransactionError("tpc_finish failed: master lost")
        return finished


def test_failed_copy_stops_where_reported_and_goes_on(one_storage, source):
    storage = Storage(**one_storage.client_kwargs())
    try:
        destination = FailingFinish(storage, fail_at=30)
        seen = []
        with pytest.raises(StorageTransactionError, match="master lost"):
            copy(source, destination, done=lambda tid, records: seen.append(tid), batch=0)
        expected = transactions(source.iterator())
        # the 29 finished before the failure, nothing after it (those
        # voted meanwhile were forgotten by the master)
        assert 30 <= destination.finishes < 30 + COPY_WINDOW
        assert len(seen) == 29
        assert storage.lastTransaction() == seen[-1] == expected[28][0]
        assert _copied(storage) == expected[:29]
        _commit_over(storage, -1)
    finally:
        storage.close()


def test_failed_vote_aborts_it_and_finishes_those_before(one_storage, source):
    """A transaction that fails before its finish: the ones voted before it
    are still finished, it and nothing after it is there."""
    storage = Storage(**one_storage.client_kwargs())
    try:
        calls = {"votes": 0}
        real_vote = storage.tpc_vote

        def tpc_vote(txn):
            calls["votes"] += 1
            if calls["votes"] == 40:
                raise StorageTransactionError("vote failed: storage lost")
            return real_vote(txn)

        storage.tpc_vote = tpc_vote
        seen = []
        with pytest.raises(StorageTransactionError, match="storage lost"):
            copy(source, storage, done=lambda tid, records: seen.append(tid), batch=0)
        expected = transactions(source.iterator())
        assert len(seen) == 39
        assert _copied(storage) == expected[:39]
        del storage.tpc_vote
        _commit_over(storage, -1)
    finally:
        storage.close()


def test_blob_of_a_later_transaction_before_the_earlier_vote(cluster, tmp_path):
    """The copy restores a transaction's blob (uploading its content) while
    the previous transaction, which changed the same object, is not voted
    yet: the later transaction's stores must not reach the storage first
    (its locks would hold the earlier vote for good; found as a 30 s stall
    in ZODB's blob recovery test, ended by the master aborting the copy).
    Two storages: with one, stores wait in a buffer for the early vote."""
    path, blobs = str(tmp_path / "source.fs"), str(tmp_path / "source.blobs")
    db = ZODB.DB(FileStorage(path, create=True, blob_dir=blobs))
    try:
        tm = transaction.TransactionManager()
        root = db.open(tm).root()
        for i in range(3):
            root["plain%d" % i] = i  # no blob: its stores wait for its vote
            tm.commit()
            root["blob%d" % i] = Blob(b"content %d" % i)  # records: the root, then the blob
            tm.commit()
    finally:
        db.close()
    source = FileStorage(path, read_only=True, blob_dir=blobs)
    storage = Storage(blob_dir=str(tmp_path / "cache"), **cluster.client_kwargs())
    try:
        real_vote, real_restore_blob = storage.tpc_vote, storage.restoreBlob
        counts = {"votes": 0, "blobs": 0}
        restored = threading.Condition()

        def restoreBlob(*args):
            real_restore_blob(*args)
            # as when the answers come back quickly: the root, stored with
            # a base the storage does not have yet (the previous copied
            # transaction is not voted), is stored again with the right
            # one, taking the root's lock
            storage._commit(args[-1])._process(block=True)
            with restored:
                counts["blobs"] += 1
                restored.notify_all()

        def tpc_vote(txn):
            # votes: the root's creation, then plain0, blob0, plain1...:
            # plain<i> is voted once blob<i> is restored
            vote = counts["votes"]
            counts["votes"] += 1
            if vote % 2:
                with restored:
                    assert restored.wait_for(lambda: counts["blobs"] > vote // 2, 30), \
                        "the next transaction's blob was not restored"
            return real_vote(txn)

        storage.restoreBlob, storage.tpc_vote = restoreBlob, tpc_vote
        result = copy(source, storage, batch=0)
        del storage.restoreBlob, storage.tpc_vote
        expected = transactions(source.iterator())
        assert result.transactions == len(expected) == 7
        assert _copied(storage) == expected
        db = ZODB.DB(storage)
        root = db.open(transaction.TransactionManager()).root()
        for i in range(3):
            with root["blob%d" % i].open() as f:
                assert f.read() == b"content %d" % i
    finally:
        storage.close()
        source.close()
