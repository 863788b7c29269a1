"""Object locks of a storage node (neozodb.storage.transactions), a pure state machine."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neozodb.storage import transactions as storage_transactions
from neozodb.storage.transactions import ABORTED_MEMORY, LockManager, Transaction

pytestmark = pytest.mark.timeout(60)


def tid(n: int) -> bytes:
    return n.to_bytes(8, "big")


OLD, MID, YOUNG = tid(1), tid(2), tid(3)
A, B, C = b"oid-aaaa", b"oid-bbbb", b"oid-cccc"


def store(lm, ttid, oid, serial=b"\0" * 8, data_id=1, data_serial=None):
    """What AskStoreObject does on success: take the lock, remember the object."""
    assert lm.acquire(ttid, oid) is None
    lm.get(ttid).objects[oid] = (serial, data_id, data_serial)


def check(lm, ttid, oid, serial=b"\0" * 8):
    """What AskCheckCurrentSerial does on success."""
    assert lm.acquire(ttid, oid) is None
    lm.get(ttid).checked[oid] = serial


# -- get -------------------------------------------------------------------------------------


def test_get_creates_once():
    lm = LockManager()
    conn = object()
    txn = lm.get(OLD, 5, conn)
    assert isinstance(txn, Transaction)
    assert (txn.ttid, txn.client, txn.conn) == (OLD, 5, conn)
    assert not txn.voted and not txn.locked and txn.tid is None
    again = lm.get(OLD, 6, object())
    assert again is txn
    assert (again.client, again.conn) == (5, conn)  # not overwritten
    assert lm.txns == {OLD: txn}


# -- acquire / release ----------------------------------------------------------------------


def test_acquire_free_then_reentrant_then_held():
    lm = LockManager()
    assert lm.acquire(OLD, A) is None
    assert lm.acquire(OLD, A) is None  # same transaction again
    assert lm.acquire(YOUNG, A) == OLD
    assert lm.acquire(MID, A) == OLD
    assert lm.write_locks == {A: OLD}
    assert lm.acquire(YOUNG, B) is None
    assert lm.acquire(OLD, B) == YOUNG
    assert lm.write_locks == {A: OLD, B: YOUNG}
    assert lm.txns == {}  # acquire does not register transactions


def test_release():
    lm = LockManager()
    lm.acquire(OLD, A)
    lm.release(YOUNG, A)  # not the holder: no effect
    assert lm.write_locks == {A: OLD}
    assert lm.acquire(YOUNG, A) == OLD
    lm.release(OLD, A)
    assert lm.write_locks == {}
    assert lm.acquire(YOUNG, A) is None
    assert lm.write_locks == {A: YOUNG}
    lm.release(OLD, B)  # nothing to release: no error
    lm.release(YOUNG, A)
    lm.release(YOUNG, A)
    assert lm.write_locks == {}


# -- lock -------------------------------------------------------------------------------------


def test_lock_sets_tid_and_read_locks_stored_objects():
    lm = LockManager()
    store(lm, OLD, A, serial=tid(10), data_id=7)
    store(lm, OLD, B, data_id=None)  # a deletion is an object too
    check(lm, OLD, C)
    store(lm, YOUNG, b"other")
    txn = lm.lock(OLD, tid(99))
    assert txn is lm.txns[OLD]
    assert txn.tid == tid(99)
    assert txn.locked
    assert lm.read_locks == {A: OLD, B: OLD}  # checked-only C is not read-locked
    assert lm.write_locks == {A: OLD, B: OLD, C: OLD, b"other": YOUNG}
    assert not lm.txns[YOUNG].locked


def test_lock_unknown_transaction():
    lm = LockManager()
    lm.acquire(OLD, A)
    assert lm.lock(OLD, tid(99)) is None
    assert lm.read_locks == {}
    assert lm.txns == {}


def test_a_locked_holder_gives_way_to_stores_based_on_its_revision():
    """Once a transaction is locked (it will commit), the next one may
    take its objects' write locks, and must base its changes on it: the
    committing transaction's TID is the current serial until its unlock,
    which leaves the later one's locks alone."""
    lm = LockManager()
    store(lm, OLD, A)
    check(lm, OLD, C)
    assert lm.current(A) is None
    assert lm.acquire(YOUNG, A, past_locked=True) == OLD  # not locked yet
    lm.lock(OLD, tid(50))
    assert lm.current(A) == tid(50)
    assert lm.current(C) is None  # only checked: nothing committed
    assert lm.acquire(MID, A) == OLD  # without past_locked, as before
    lm.get(YOUNG)
    assert lm.acquire(YOUNG, A, past_locked=True) is None
    assert lm.acquire(YOUNG, C, past_locked=True) is None
    lm.get(YOUNG).objects[A] = (tid(50), 1, None)
    assert lm.write_locks == {A: YOUNG, C: YOUNG}
    lm.lock(YOUNG, tid(60))
    assert lm.read_locks == {A: YOUNG}
    assert lm.current(A) == tid(60)
    lm.finish(OLD)  # its unlock
    assert lm.write_locks == {A: YOUNG, C: YOUNG}
    assert lm.read_locks == {A: YOUNG}
    lm.finish(YOUNG)
    assert lm.write_locks == lm.read_locks == {}
    assert lm.current(A) is None


def test_the_read_lock_stays_with_the_last_revision_being_committed():
    """A transaction locked after another one with a later TID (never
    done by the master for one object, but the rule holds anyway): the
    read lock and the current serial stay the later TID's."""
    lm = LockManager()
    store(lm, OLD, A)
    lm.lock(OLD, tid(80))
    assert lm.acquire(YOUNG, A, past_locked=True) is None
    lm.get(YOUNG).objects[A] = (tid(80), 1, None)
    lm.lock(YOUNG, tid(75))
    assert lm.read_locks == {A: OLD}
    assert lm.current(A) == tid(80)
    lm.finish(YOUNG)
    assert lm.read_locks == {A: OLD}


# -- finish / abort ---------------------------------------------------------------------------


def test_finish_drops_only_its_own_locks():
    lm = LockManager()
    store(lm, OLD, A)
    check(lm, OLD, B)
    store(lm, YOUNG, C)
    lm.lock(OLD, tid(50))
    lm.lock(YOUNG, tid(51))
    assert lm.read_locks == {A: OLD, C: YOUNG}
    txn = lm.finish(OLD)
    assert txn is not None and txn.ttid == OLD
    assert OLD not in lm.txns
    assert lm.write_locks == {C: YOUNG}
    assert lm.read_locks == {C: YOUNG}
    assert lm.finish(OLD) is None
    assert lm.write_locks == {C: YOUNG}


def test_finish_leaves_locks_of_others_on_its_objects():
    lm = LockManager()
    # OLD stored A, then gave the lock away (AskRelockObject) and YOUNG took it
    store(lm, OLD, A)
    lm.release(OLD, A)
    store(lm, YOUNG, A)
    lm.lock(YOUNG, tid(60))
    lm.get(OLD).checked[B] = b"\0" * 8  # recorded, but B is locked by YOUNG
    lm.acquire(YOUNG, B)
    assert lm.finish(OLD).ttid == OLD
    assert lm.write_locks == {A: YOUNG, B: YOUNG}
    assert lm.read_locks == {A: YOUNG}


def test_finish_unregistered_transaction_is_a_noop():
    lm = LockManager()
    lm.acquire(OLD, A)
    assert lm.finish(OLD) is None
    assert lm.write_locks == {A: OLD}  # never recorded as its object: not known to be its own


def test_abort_remembers_and_drops_locks():
    lm = LockManager()
    store(lm, MID, A)
    check(lm, MID, B)
    store(lm, YOUNG, C)
    txn = lm.abort(MID)
    assert txn is not None and txn.ttid == MID
    assert MID in lm.aborted
    assert MID not in lm.txns
    assert lm.write_locks == {C: YOUNG}
    assert lm.acquire(OLD, A) is None
    assert lm.acquire(OLD, B) is None


def test_abort_unknown_transaction_is_remembered():
    lm = LockManager()
    assert lm.abort(OLD) is None
    assert OLD in lm.aborted
    assert YOUNG not in lm.aborted
    assert lm.txns == {}


def test_finish_does_not_mark_aborted():
    lm = LockManager()
    lm.get(OLD)
    lm.finish(OLD)
    assert OLD not in lm.aborted


def test_aborted_memory_is_bounded():
    lm = LockManager()
    for i in range(ABORTED_MEMORY + 1):
        lm.abort(tid(i))
    assert len(lm.aborted) == ABORTED_MEMORY
    assert tid(0) not in lm.aborted  # the oldest is forgotten
    assert tid(1) in lm.aborted
    assert tid(ABORTED_MEMORY) in lm.aborted
    lm.abort(tid(ABORTED_MEMORY + 1))
    assert len(lm.aborted) == ABORTED_MEMORY
    assert tid(1) not in lm.aborted
    assert tid(2) in lm.aborted
    assert list(lm.aborted)[0] == tid(2)
    assert list(lm.aborted)[-1] == tid(ABORTED_MEMORY + 1)


def test_aborted_memory_is_bounded_small(monkeypatch):
    monkeypatch.setattr(storage_transactions, "ABORTED_MEMORY", 3)
    lm = LockManager()
    for i in range(5):
        lm.abort(tid(i))
    assert list(lm.aborted) == [tid(2), tid(3), tid(4)]


# -- deadlock avoidance -------------------------------------------------------------------------


def test_deadlock_victim_is_younger_unvoted_holder_once_per_oid():
    lm = LockManager()
    young = lm.get(YOUNG, 7)
    store(lm, YOUNG, A)
    store(lm, YOUNG, B)
    assert lm.acquire(OLD, A) == YOUNG
    assert lm.deadlock_victim(OLD, A, YOUNG) is young
    assert young.deadlock_notified == {A}
    assert lm.deadlock_victim(OLD, A, YOUNG) is None  # already asked for A
    assert lm.deadlock_victim(MID, A, YOUNG) is None  # whoever asks
    assert lm.deadlock_victim(OLD, B, YOUNG) is young  # B is another oid
    assert young.deadlock_notified == {A, B}


def test_deadlock_notice_is_rearmed_by_a_new_acquisition():
    lm = LockManager()
    young = lm.get(YOUNG, 7)
    store(lm, YOUNG, A)
    store(lm, YOUNG, B)
    assert lm.deadlock_victim(OLD, A, YOUNG) is young
    assert lm.deadlock_victim(OLD, B, YOUNG) is young
    assert lm.acquire(OLD, A) == YOUNG  # a failed attempt does not rearm it
    assert lm.deadlock_victim(OLD, A, YOUNG) is None
    # the young one gives A away (relock) and takes it again: a new notice may be needed
    lm.release(YOUNG, A)
    assert lm.acquire(YOUNG, A) is None
    assert young.deadlock_notified == {B}
    assert lm.deadlock_victim(OLD, A, YOUNG) is young
    assert lm.deadlock_victim(OLD, A, YOUNG) is None
    assert lm.deadlock_victim(OLD, B, YOUNG) is None  # B was never given away


def test_deadlock_victim_none_when_holder_is_older():
    lm = LockManager()
    old = lm.get(OLD)
    store(lm, OLD, A)
    assert lm.deadlock_victim(YOUNG, A, OLD) is None
    assert old.deadlock_notified == set()


def test_deadlock_victim_none_when_holder_voted():
    lm = LockManager()
    young = lm.get(YOUNG)
    store(lm, YOUNG, A)
    young.voted = True
    assert lm.deadlock_victim(OLD, A, YOUNG) is None
    assert young.deadlock_notified == set()


def test_deadlock_victim_none_when_holder_locked():
    lm = LockManager()
    young = lm.get(YOUNG)
    store(lm, YOUNG, A)
    lm.lock(YOUNG, tid(100))
    assert lm.deadlock_victim(OLD, A, YOUNG) is None
    assert young.deadlock_notified == set()


def test_deadlock_victim_none_when_holder_unknown():
    lm = LockManager()
    lm.acquire(YOUNG, A)  # never registered via get()
    assert lm.deadlock_victim(OLD, A, YOUNG) is None
    lm.get(YOUNG)
    lm.finish(YOUNG)
    assert lm.deadlock_victim(OLD, A, YOUNG) is None


# -- lookups -------------------------------------------------------------------------------------


class AlwaysEqual:
    def __eq__(self, other):
        return True

    __hash__ = object.__hash__


def test_connection_transactions_match_by_identity():
    lm = LockManager()
    c1, c2 = AlwaysEqual(), AlwaysEqual()
    t1 = lm.get(OLD, 1, c1)
    t2 = lm.get(MID, 1, c2)  # same NID, new connection
    t3 = lm.get(YOUNG, 2, c1)
    assert lm.connection_transactions(c1) == [t1, t3]
    assert lm.connection_transactions(c2) == [t2]
    assert lm.connection_transactions(AlwaysEqual()) == []
    assert lm.connection_transactions(None) == []
    lm.finish(OLD)
    assert lm.connection_transactions(c1) == [t3]


def test_client_transactions_match_by_nid():
    lm = LockManager()
    t1 = lm.get(OLD, 1, object())
    t2 = lm.get(MID, 1, object())
    t3 = lm.get(YOUNG, 2, object())
    assert lm.client_transactions(1) == [t1, t2]
    assert lm.client_transactions(2) == [t3]
    assert lm.client_transactions(3) == []
    lm.abort(MID)
    assert lm.client_transactions(1) == [t1]


# -- random sequences -----------------------------------------------------------------------------

TTIDS = [tid(i) for i in range(1, 5)]
OIDS = [A, B, C]
OPS = ["acquire", "check", "release", "finish", "abort"]


@settings(max_examples=300, deadline=None)
@given(registered=st.sets(st.sampled_from(TTIDS), min_size=1), data=st.data())
def test_random_lock_sequences(registered, data):
    lm = LockManager()
    for ttid in registered:
        lm.get(ttid)
    ended = set()  # registered transactions that were finished or aborted
    model = {}  # oid -> holder, maintained independently of LockManager
    for _ in range(data.draw(st.integers(5, 60))):
        op = data.draw(st.sampled_from(OPS))
        oid = data.draw(st.sampled_from(OIDS))
        if op == "release" and oid in model and data.draw(st.booleans()):
            ttid = model[oid]  # the holder lets an older transaction in (relock)
        elif op in ("finish", "abort") and lm.txns and data.draw(st.booleans()):
            ttid = data.draw(st.sampled_from(sorted(lm.txns)))
        else:
            ttid = data.draw(st.sampled_from(TTIDS))
        if op in ("acquire", "check"):
            if ttid in ended:
                continue  # the caller refuses requests of ended transactions
            holder = model.get(oid)
            got = lm.acquire(ttid, oid)
            if holder is None or holder == ttid:
                assert got is None
                model[oid] = ttid
                if ttid in lm.txns:  # record it, as AskStoreObject/AskCheckCurrentSerial do
                    if op == "acquire":
                        lm.txns[ttid].objects[oid] = (b"\0" * 8, None, None)
                    else:
                        lm.txns[ttid].checked[oid] = b"\0" * 8
            else:
                assert got == holder
        elif op == "release":
            lm.release(ttid, oid)
            if model.get(oid) == ttid:
                del model[oid]
        else:
            live = ttid in lm.txns
            txn = lm.finish(ttid) if op == "finish" else lm.abort(ttid)
            assert (txn is not None) == live
            assert ttid not in lm.txns
            if op == "abort":
                assert ttid in lm.aborted
            if live:
                assert txn.ttid == ttid
                ended.add(ttid)
                # a registered transaction records all it acquires: all its locks go
                model = {o: h for o, h in model.items() if h != ttid}
        assert lm.write_locks == model
        for oid, holder in lm.write_locks.items():
            assert holder in lm.txns or holder not in registered, (oid, holder)
    assert set(lm.txns) == registered - ended


def test_bulk_copy_locks():
    """A bulk copy (storage/bulk.py) takes all its locks or none, and once
    locked, a store past it is based on each object's own last revision
    in the batch, not on the batch's last TID."""
    lm = LockManager()
    store(lm, OLD, A)
    assert lm.acquire_all(YOUNG, [B, A]) == OLD
    assert lm.write_locks == {A: OLD}  # none taken
    assert lm.acquire_all(YOUNG, [B, C]) is None
    assert lm.write_locks == {A: OLD, B: YOUNG, C: YOUNG}
    bulk = lm.get(YOUNG)
    bulk.subs, bulk.serials = [10, 11, 12], {B: tid(10), C: tid(12)}
    bulk.objects = dict.fromkeys(bulk.serials, (b"\0" * 8, None, None))
    assert bulk.low is None and bulk.tids() == []
    lm.lock(YOUNG, tid(12))
    assert bulk.low == tid(10) and bulk.tids() == [10, 11, 12]
    assert lm.current(B) == tid(10)
    assert lm.current(C) == tid(12)
    # the next batch takes them past the locked one, and keeps them after
    # its unlock
    late = tid(20)
    assert lm.acquire_all(late, [B, C]) is None
    assert lm.write_locks[B] == lm.write_locks[C] == late
    lm.finish(YOUNG)
    assert lm.current(B) is None and lm.write_locks[B] == late
    assert lm.acquire_all(MID, [C]) == late
