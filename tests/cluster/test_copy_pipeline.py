"""The pipelined copy into a cluster (client/copying.py; neomigrate,
copyTransactionsFrom, zodbconvert): each transaction's finish overlaps the
copy of the next ones, which often restore the very objects still being
finished; and a copy that fails stops with the destination holding exactly
the transactions reported copied, from which it can go on."""
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


def test_pipelined_copy_equals_the_source(one_storage, source):
    destination = Storage(**one_storage.client_kwargs())
    try:
        seen = []
        result = copy(source, destination, done=lambda tid, records: seen.append(tid))
        expected = transactions(source.iterator())
        assert result.transactions == len(expected) == COMMITS + 2
        assert seen == [t[0] for t in expected]  # reported in order, each once
        assert result.last == expected[-1][0] == destination.lastTransaction()
        assert _copied(destination) == expected
        _commit_over(destination, -1)
    finally:
        destination.close()


class FailingFinish:
    """The real client, whose finish of one transaction fails (as when the
    master is lost and the transaction was not committed)."""

    def __init__(self, storage, fail_at: int) -> None:
        self.storage = storage
        self.finishes = 0
        self.fail_at = fail_at

    def __getattr__(self, name):
        return getattr(self.storage, name)

    def tpc_finish(self, txn, f=None):
        self.finishes += 1
        if self.finishes == self.fail_at:
            raise StorageTransactionError("tpc_finish failed: master lost")
        return self.storage.tpc_finish(txn, f)


def test_failed_copy_stops_where_reported_and_goes_on(one_storage, source):
    storage = Storage(**one_storage.client_kwargs())
    try:
        destination = FailingFinish(storage, fail_at=30)
        seen = []
        with pytest.raises(StorageTransactionError, match="master lost"):
            copy(source, destination, done=lambda tid, records: seen.append(tid))
        expected = transactions(source.iterator())
        # the 29 finished before the failure, nothing after it (the
        # transactions voted behind it were aborted)
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
            copy(source, storage, done=lambda tid, records: seen.append(tid))
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
        result = copy(source, storage)
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
