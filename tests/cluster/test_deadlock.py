"""Deadlock avoidance end to end (NotifyDeadlock, AskRelockObject, the
client's relock): two real clients store the same two objects in opposite
orders, each object on its own storage (2 storages, replicas 0), so that
each transaction holds the lock the other waits for, on different
storages.  The older transaction must win (the younger one gives its lock
back and takes it again), and both commit: the objects are
``BTrees.Length`` counters, whose conflicts resolve.  Then the same with
one object on two replicas and early lazy votes (feature
early-lazy-vote), where the younger transaction's vote on one storage
must be undone to give its lock back."""
from __future__ import annotations

import contextlib
import threading

import pytest
import transaction
import ZODB
from BTrees.Length import Length
from ZODB.Connection import TransactionMetaData
from ZODB.serialize import ObjectWriter

from conftest import _running
from neozodb.client import Storage
from neozodb.client.voting import EARLY_LAZY_BACKOFF
from neozodb.protocol import Packets
from replicas import orphan_data_rows, pending_rows, raw_contents

pytestmark = pytest.mark.timeout(120)
TIMEOUT = 20


@pytest.fixture
def two_storages(tmp_path):
    """2 storages, replicas 0: each partition on one storage only."""
    yield from _running(tmp_path, 2, 0, 4)


def _pickle(value: int) -> bytes:
    """The record of a Length holding ``value``, as ZODB stores it."""
    return ObjectWriter().serialize(Length(value))


def settled(storage, nid):
    """A barrier: a request on the same connection, answered after what
    was sent before it was handled there."""
    storage.app.storage_conn(nid).call(Packets.Ping, timeout=TIMEOUT)


@contextlib.contextmanager
def fresh_root(cluster):
    """The root of a new client's view of the database."""
    db = ZODB.DB(Storage(**cluster.client_kwargs()))
    try:
        yield db.open(transaction.TransactionManager()).root()
    finally:
        db.close()


def commit(outcome: dict, name: str, storage, txn) -> None:
    """Vote and finish ``txn`` (in a thread): outcome[name] is ("voted",
    its TID) or ("failed", the error)."""
    try:
        storage.tpc_vote(txn)
        outcome[name] = ("voted", storage.tpc_finish(txn))
    except Exception as e:
        outcome[name] = ("failed", e)
        storage.tpc_abort(txn)


def test_opposite_orders_on_two_storages(two_storages):
    cluster = two_storages
    db = ZODB.DB(Storage(**cluster.client_kwargs()))
    app = db.storage.app
    try:
        tm = transaction.TransactionManager()
        root = db.open(tm).root()
        for i in range(16):
            root["n%d" % i] = Length(100)
        tm.commit()
        by_storage: dict = {}
        for i in range(16):
            obj = root["n%d" % i]
            (nid,) = app.writable_cells(obj._p_oid)
            by_storage.setdefault(nid, obj)
        assert len(by_storage) == 2, "both storages should hold one of 16 objects"
        (nid_a, a), (nid_b, b) = sorted(by_storage.items())
        oid_a, oid_b, serial_a, serial_b = a._p_oid, b._p_oid, a._p_serial, b._p_serial
    finally:
        db.close()

    s1, s2 = Storage(**cluster.client_kwargs()), Storage(**cluster.client_kwargs())
    try:
        one, ten = _pickle(101), _pickle(110)  # +1 (T1) and +10 (T2) on each object
        t1, t2 = TransactionMetaData(), TransactionMetaData()
        # each TTID read before going on (tpc_begin does not wait for it):
        # T1 gets the older one, and the stores leave as they are made
        s1.tpc_begin(t1)
        s1._commit(t1).known_ttid()
        s2.tpc_begin(t2)
        s2._commit(t2).known_ttid()

        s1.store(oid_a, serial_a, one, "", t1)  # T1 holds A (on its storage)
        settled(s1, nid_a)
        s2.store(oid_b, serial_b, ten, "", t2)  # T2 holds B (on the other)
        settled(s2, nid_b)
        s1.store(oid_b, serial_b, one, "", t1)  # T1 waits for T2 (younger): T2 is told
        settled(s1, nid_b)
        s2.store(oid_a, serial_a, ten, "", t2)  # T2 waits for T1 (older)
        settled(s2, nid_a)
        outcome: dict = {}
        threads = [threading.Thread(target=commit, args=(outcome, *args), daemon=True)
                   for args in (("T2", s2, t2), ("T1", s1, t1))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        assert outcome.get("T1", ("?",))[0] == "voted", outcome
        assert outcome.get("T2", ("?",))[0] == "voted", outcome
        assert outcome["T1"][1] < outcome["T2"][1]  # the older committed first
        assert s2.app.relocks >= 1 and s1.app.relocks == 0  # the younger gave B back
    finally:
        s1.close()
        s2.close()
    with fresh_root(cluster) as root:
        values = {obj._p_oid: obj() for obj in (root[k] for k in root)}
        assert values[oid_a] == values[oid_b] == 111  # both increments, resolved


def test_early_lazy_vote_given_back(cluster):
    """2 storages, replicas 1: X on both.  T1 (older) holds X on S1, T2
    holds it on S2 and has voted there (early lazy vote, sent with its
    stores), while its store on S1 waits for T1.  T1's store on S2 then
    waits for T2: S2 must ask T2 for its lock although T2 voted there, T2
    gives it back, which undoes its vote on S2, and votes there again
    later.  Both commit; with the vote keeping the lock, both waited
    forever."""
    with fresh_root(cluster) as root:
        x = root["x"] = Length(100)
        root._p_jar.transaction_manager.commit()
        oid, serial = x._p_oid, x._p_serial
        nids = root._p_jar.db().storage.app.writable_cells(oid)
        assert len(nids) == 2
    s1_nid, s2_nid = nids
    c1, c2 = Storage(**cluster.client_kwargs()), Storage(**cluster.client_kwargs())
    try:
        for client in (c1, c2):  # connected: the stores then wait for the vote
            for nid in nids:
                client.app.storage_conn(nid)
        t1, t2 = TransactionMetaData(), TransactionMetaData()
        c1.tpc_begin(t1)
        c1._commit(t1).known_ttid()
        c2.tpc_begin(t2)
        c2._commit(t2).known_ttid()
        # the stores wait in each connection's buffer for the early vote:
        # let each out where this test wants it first
        c1.store(oid, serial, _pickle(101), "", t1)
        c1.app.storage_conn(s1_nid).flush()
        settled(c1, s1_nid)                          # T1 holds X on S1
        c2.store(oid, serial, _pickle(110), "", t2)
        c2.app.storage_conn(s2_nid).flush()
        settled(c2, s2_nid)                          # T2 holds X on S2
        outcome: dict = {}
        votes_before = sum(c2.app.early_votes)
        assert c1.app.early_lazy_skip == c2.app.early_lazy_skip == 0
        second = threading.Thread(target=commit, args=(outcome, "T2", c2, t2), daemon=True)
        second.start()
        # T2's early vote reached both: accepted on S2, its store waits on S1
        settled(c2, s2_nid)
        settled(c2, s1_nid)
        first = threading.Thread(target=commit, args=(outcome, "T1", c1, t1), daemon=True)
        first.start()
        for thread in (first, second):
            thread.join(TIMEOUT)
        assert outcome.get("T1", ("?",))[0] == "voted", outcome
        assert outcome.get("T2", ("?",))[0] == "voted", outcome
        assert outcome["T1"][1] < outcome["T2"][1]  # the older committed first
        assert c2.app.relocks >= 1 and c1.app.relocks == 0  # T2 gave X back on S2
        assert sum(c2.app.early_votes) == votes_before + 1  # voted early, as the test wants
        # each voted again somewhere (T2 after its relock, T1 where its store
        # waited): their next transactions vote late for a while
        assert c1.app.early_lazy_skip == c2.app.early_lazy_skip == EARLY_LAZY_BACKOFF
    finally:
        c1.close()
        c2.close()
    with fresh_root(cluster) as root:
        assert root["x"]() == 111  # both increments, resolved
    cluster.stop()
    # the undone vote left nothing behind (its rows, T2's first data)
    assert raw_contents(cluster.database(1)) == raw_contents(cluster.database(2))
    for i in (1, 2):
        assert pending_rows(cluster.database(i)) == {"ttrans": 0, "tobj": 0}
        assert orphan_data_rows(cluster.database(i)) == 0


def test_contention_with_early_lazy_votes(cluster):
    """Three clients increment the same counters (2 storages, replicas 1),
    two or three per transaction in random orders: early lazy votes, votes
    undone by relocks, votes again, and the late votes that follow them
    (EARLY_LAZY_BACKOFF) all end in commits, none waits forever, and every
    counter holds every increment committed."""
    import random
    with fresh_root(cluster) as root:
        for k in range(5):
            root["c%d" % k] = Length(0)
        root._p_jar.transaction_manager.commit()
    committed = [[0] * 5 for _ in range(3)]
    errors: list = []

    def client(i: int) -> None:
        rnd = random.Random(i)
        cdb = ZODB.DB(Storage(**cluster.client_kwargs()))
        try:
            ctm = transaction.TransactionManager()
            croot = cdb.open(ctm).root()
            for _ in range(60):
                keys = rnd.sample(range(5), rnd.choice((2, 3)))
                for k in keys:
                    croot["c%d" % k].change(1)
                ctm.commit()
                for k in keys:
                    committed[i][k] += 1
        except Exception as e:
            errors.append(e)
        finally:
            cdb.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a client waits forever"
    assert errors == []
    with fresh_root(cluster) as root:
        assert [root["c%d" % k]() for k in range(5)] == [sum(c[k] for c in committed)
                                                         for k in range(5)]
