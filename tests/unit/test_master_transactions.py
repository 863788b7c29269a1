"""The master's transaction manager (neozodb.master.transactions), a pure state machine."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neozodb.master.transactions import TransactionError, TransactionManager, Txn
from neozodb.tid import tid_from_time

pytestmark = pytest.mark.timeout(60)

T0 = 1_700_000_000.0  # 2023-11-14: a realistic "now"


def commit_all(tm, *txns):
    """Lock every transaction on all its involved storages; return what committable() pops."""
    for txn in txns:
        for nid in txn.involved:
            tm.locked(txn.ttid, nid)
    return tm.committable()


# -- OIDs ----------------------------------------------------------------------------------


def test_new_oids_are_consecutive():
    tm = TransactionManager(12)
    assert tm.new_oids(3) == [1, 2, 3]
    assert tm.new_oids(2) == [4, 5]
    assert tm.last_oid == 5
    assert tm.new_oids(0) == []
    assert tm.last_oid == 5
    assert tm.new_oids(1) == [6]


def test_new_oids_continue_after_reset():
    tm = TransactionManager(12)
    tm.reset(last_tid=0, last_oid=41)
    assert tm.new_oids(2) == [42, 43]


def test_saw_oid_bumps_only_upwards():
    tm = TransactionManager(12)
    tm.new_oids(2)
    tm.saw_oid(10)
    assert tm.last_oid == 10
    assert tm.new_oids(2) == [11, 12]
    tm.saw_oid(5)  # older than what was allocated: no effect
    assert tm.last_oid == 12
    tm.saw_oid(12)
    assert tm.last_oid == 12
    assert tm.new_oids(1) == [13]


# -- TTIDs ---------------------------------------------------------------------------------


def test_first_ttid_comes_from_the_clock():
    tm = TransactionManager(12)
    txn = tm.begin(1, T0)
    assert isinstance(txn, Txn)
    assert txn.ttid == tid_from_time(T0)
    assert txn.client == 1
    assert not txn.imposed and not txn.prepared and txn.tid is None
    assert tm.txns == {txn.ttid: txn}


def test_ttids_strictly_increase_when_the_clock_goes_backwards():
    tm = TransactionManager(12)
    nows = [T0, T0 - 1, T0 - 3600, T0, T0 - 0.000001, T0 + 0.5, T0 - 86400]
    ttids = [tm.begin(1, now).ttid for now in nows]
    assert all(a < b for a, b in zip(ttids, ttids[1:], strict=False)), [hex(t) for t in ttids]
    # a clock stuck in the past falls back to last + 1
    assert ttids[1] == ttids[0] + 1
    assert ttids[2] == ttids[1] + 1
    # a clock that moves ahead again is used as is
    assert ttids[5] == tid_from_time(T0 + 0.5)
    assert ttids[6] == ttids[5] + 1
    assert len(tm.txns) == len(nows)


def test_ttid_in_a_partition():
    # feature begin-partition: the TTID falls in the partition asked, and
    # still after everything handed out, whatever the clock does
    tm = TransactionManager(12)
    ttids = []
    for now, partition in ((T0, 5), (T0, 5), (T0 - 60, 0), (T0 + 1, 11), (T0 + 1, 3)):
        txn = tm.begin(1, now, partition=partition)
        assert txn.ttid % 12 == partition
        ttids.append(txn.ttid)
    assert all(a < b for a, b in zip(ttids, ttids[1:], strict=False))
    assert ttids[0] - tid_from_time(T0) < 12  # at most a partition's step later
    # the final TID keeps the partition, as for any TTID
    txn = tm.txns[ttids[-1]]
    tm.prepare(txn.ttid, T0 + 2, [b"o" * 8], {1})
    assert txn.tid % 12 == 3 and txn.tid > ttids[-1]


def test_ttids_follow_a_clock_that_goes_forward():
    tm = TransactionManager(12)
    a = tm.begin(1, T0).ttid
    b = tm.begin(1, T0 + 10).ttid
    assert a == tid_from_time(T0)
    assert b == tid_from_time(T0 + 10)


def test_ttid_is_greater_than_last_tid_after_reset():
    tm = TransactionManager(12)
    last = tid_from_time(T0 + 3600)  # the database was written by a clock ahead of ours
    tm.reset(last_tid=last, last_oid=7)
    assert tm.last_tid == last and tm.last_oid == 7
    txn = tm.begin(1, T0)
    assert txn.ttid == last + 1
    assert tm.begin(1, T0 + 7200).ttid == tid_from_time(T0 + 7200)


def test_reset_never_lowers_allocation_floor():
    tm = TransactionManager(12)
    ttid = tm.begin(1, T0).ttid
    tm.reset(last_tid=1, last_oid=0)  # e.g. back to recovery with an older last_tid
    assert tm.txns == {} and tm.prepared_count() == 0
    assert tm.last_tid == 1
    assert tm.begin(1, T0 - 60).ttid > ttid


# -- imposed TIDs --------------------------------------------------------------------------


def test_imposed_tid_is_used_as_ttid_and_tid():
    tm = TransactionManager(7)
    wanted = tid_from_time(T0) + 3  # not congruent to anything in particular
    txn = tm.begin(1, T0 + 3600, tid=wanted)
    assert txn.imposed
    assert txn.ttid == wanted
    tm.prepare(wanted, T0 + 7200, [1], {1})
    assert txn.tid == wanted  # not moved to the clock nor to a partition
    assert commit_all(tm, txn) == [txn]
    assert tm.last_tid == wanted


@pytest.mark.parametrize("delta", [0, -1, -1000])
def test_imposed_tid_must_be_greater_than_last_ttid(delta):
    tm = TransactionManager(12)
    ttid = tm.begin(1, T0).ttid
    with pytest.raises(TransactionError):
        tm.begin(2, T0, tid=ttid + delta)
    assert list(tm.txns) == [ttid]  # nothing registered by the failed begin


def test_imposed_tid_must_be_greater_than_prepared_tid():
    tm = TransactionManager(12)
    txn = tm.begin(1, T0)
    tm.prepare(txn.ttid, T0 + 60, [], {1})
    assert txn.tid > txn.ttid
    with pytest.raises(TransactionError):
        tm.begin(2, T0, tid=txn.tid)
    ok = tm.begin(2, T0, tid=txn.tid + 1)
    assert ok.ttid == txn.tid + 1


def test_imposed_tid_must_be_greater_than_last_tid():
    tm = TransactionManager(12)
    last = tid_from_time(T0)
    tm.reset(last_tid=last, last_oid=0)
    with pytest.raises(TransactionError):
        tm.begin(1, T0, tid=last)
    assert tm.begin(1, T0, tid=last + 1).ttid == last + 1


def test_bulk_copy_takes_its_whole_range_of_tids():
    """A bulk copy (feature bulk-copy) begins with the first and last TID
    of its batch: the first must come after the cluster's last, and no
    transaction may get a TID inside the range."""
    tm = TransactionManager(12)
    last = tid_from_time(T0)
    tm.reset(last_tid=last, last_oid=0)
    with pytest.raises(TransactionError):
        tm.begin(1, T0, tid=last + 10, first=last)  # the first is not after the last TID
    with pytest.raises(TransactionError):
        tm.begin(1, T0, tid=last + 10, first=last + 11)  # not in order
    assert tm.txns == {}
    bulk = tm.begin(1, T0, tid=last + 10, first=last + 1)
    assert (bulk.ttid, bulk.first, bulk.imposed) == (last + 10, last + 1, True)
    with pytest.raises(TransactionError):
        tm.begin(1, T0, tid=last + 20, first=last + 10)  # overlaps the batch begun
    other = tm.begin(2, T0)  # from the clock, behind the batch: after its range
    assert other.ttid > last + 10
    tm.prepare(bulk.ttid, T0, [1], {1})
    assert bulk.tid == last + 10
    assert commit_all(tm, bulk) == [bulk]
    assert tm.last_tid == last + 10


def test_imposed_tid_raises_allocation_floor():
    tm = TransactionManager(12)
    imposed = tid_from_time(T0 + 3600)
    tm.begin(1, T0, tid=imposed)
    later = tm.begin(2, T0)  # clock behind the imposed TID
    assert later.ttid == imposed + 1
    with pytest.raises(TransactionError):
        tm.begin(3, T0, tid=imposed + 1)


# An imposed transaction is queued at begin(): a normal transaction begun and
# prepared after it gets a greater TID and must not commit first.
def test_imposed_transaction_commits_in_tid_order():
    tm = TransactionManager(12)
    imposed = tm.begin(1, T0, tid=tid_from_time(T0))
    normal = tm.begin(2, T0 + 1)
    tm.prepare(normal.ttid, T0 + 2, [], {1})
    assert normal.tid > imposed.ttid
    tm.locked(normal.ttid, 1)
    # the imposed transaction, with a smaller TID, is still running: normal must wait
    assert tm.committable() == []
    tm.prepare(imposed.ttid, T0 + 3, [], {1})
    tm.locked(imposed.ttid, 1)
    done = tm.committable()
    assert done == [imposed, normal]
    assert tm.last_tid == normal.tid


def test_imposed_transaction_is_not_prepared_before_prepare():
    tm = TransactionManager(12)
    imposed = tm.begin(1, T0, tid=tid_from_time(T0))
    assert imposed.tid == imposed.ttid  # known from the start
    assert not imposed.prepared
    tm.locked(imposed.ttid, 1)  # before prepare: ignored
    assert imposed.locked == set()
    assert tm.committable() == []
    with pytest.raises(TransactionError):
        tm.abort(tm.prepare(imposed.ttid, T0, [], {1}).ttid)  # finishing now
    assert imposed.prepared
    assert tm.committable() == []
    tm.locked(imposed.ttid, 1)
    assert tm.committable() == [imposed]


def _copy(tm, client=1, count=3, after=0.0):
    """``count`` imposed transactions of one client, begun in order (a
    pipelined copy begins ahead), ``after`` seconds after T0."""
    first = tid_from_time(T0 + after)
    return [tm.begin(client, T0 + after, tid=first + i) for i in range(count)]


def test_a_copy_is_locked_in_order():
    """The locks of an imposed transaction wait while an earlier imposed
    transaction of its client is not locked everywhere (feature
    ordered-copy); other clients' transactions are not held back."""
    tm = TransactionManager(12)
    a, b, c = _copy(tm)
    other = _copy(tm, client=2, count=1, after=1)[0]
    for txn in (a, b, c):
        tm.prepare(txn.ttid, T0, [], {1, 2})
    assert not tm.must_defer(a)
    assert tm.must_defer(b) and tm.must_defer(c)
    tm.prepare(other.ttid, T0, [], {1})
    assert not tm.must_defer(other)  # another client's
    b.deferred = c.deferred = True
    assert tm.undeferred() == []
    tm.locked(a.ttid, 1)
    assert tm.undeferred() == []  # not everywhere yet
    tm.locked(a.ttid, 2)
    assert tm.undeferred() == [b]  # c waits for b
    assert not b.deferred and c.deferred
    tm.locked(b.ttid, 1)
    tm.locked(b.ttid, 2)
    assert tm.undeferred() == [c]
    commit_all(tm, c, other)
    assert tm.committable() == []  # `other` got a TID after them all, done above
    assert tm.last_tid == max(t.tid for t in (a, b, c, other))


def test_an_unprepared_earlier_transaction_of_the_copy_holds_the_locks():
    tm = TransactionManager(12)
    a, b, _ = _copy(tm)
    tm.prepare(b.ttid, T0, [], {1})
    assert tm.must_defer(b)  # a is not even finishing


def test_a_failed_transaction_of_a_copy_dooms_the_later_ones():
    """An imposed transaction that is not committed (lost, aborted):
    every later imposed transaction of its client is forgotten, finishing
    or not, so that none is committed after it; other clients' stay."""
    tm = TransactionManager(12)
    a, b, c = _copy(tm)
    other = _copy(tm, client=2, count=1, after=1)[0]
    tm.prepare(b.ttid, T0, [], {1})
    b.deferred = True
    assert tm.abort(a.ttid) is a
    assert tm.doomed(a) == [b, c]
    assert set(tm.txns) == {other.ttid}
    assert tm.undeferred() == []
    assert tm.doomed(other) == []


def test_a_lost_transaction_holds_the_next_ones_of_the_copy():
    """Refused by every storage (lost), it is 'fully locked' until it
    leaves the queue: the next one must not be locked meanwhile."""
    tm = TransactionManager(12)
    first = tm.begin(3, T0)
    tm.prepare(first.ttid, T0, [], {2})  # not locked: a is not at the head
    a, b = _copy(tm, count=2, after=1)
    tm.prepare(a.ttid, T0, [], {1})
    a.cells = {0: {1}}
    tm.refused(a.ttid, 1)
    assert a.fully_locked and a.lost
    assert tm.committable() == []
    tm.prepare(b.ttid, T0, [], {1})
    assert tm.must_defer(b)
    b.deferred = True
    assert tm.undeferred() == []  # nor released while a waits to leave the queue


@pytest.mark.parametrize("how", ["abort", "client_lost"])
def test_dropping_unprepared_imposed_transaction_unblocks_later_commits(how):
    tm = TransactionManager(12)
    imposed = tm.begin(1, T0, tid=tid_from_time(T0))
    normal = tm.begin(2, T0)
    tm.prepare(normal.ttid, T0, [], {1})
    tm.locked(normal.ttid, 1)
    assert tm.committable() == []
    if how == "abort":
        assert tm.abort(imposed.ttid) is imposed
    else:
        assert tm.client_lost(1) == [imposed]
    assert tm.committable() == [normal]
    assert tm.last_tid == normal.tid
    assert not tm.has_pending()


def test_storage_lost_before_imposed_prepare_is_still_waited_for():
    tm = TransactionManager(12)
    imposed = tm.begin(1, T0, tid=tid_from_time(T0))
    tm.storage_lost(1)
    tm.prepare(imposed.ttid, T0, [], {1})  # the caller still names it
    assert tm.committable() == []
    tm.storage_lost(1)
    assert tm.committable() == [imposed]


# -- prepare -------------------------------------------------------------------------------


@pytest.mark.parametrize("num_partitions", [1, 3, 12, 1000])
def test_prepare_tid_is_above_everything_and_in_ttid_partition(num_partitions):
    tm = TransactionManager(num_partitions)
    allocated = []
    txns = []
    for i, now in enumerate([T0, T0 - 5, T0 + 1, T0 - 10]):
        txn = tm.begin(i, now)
        assert txn.ttid > max(allocated, default=0)
        allocated.append(txn.ttid)
        txns.append(txn)
    # prepare out of begin order, with a clock going backwards
    for txn, now in zip([txns[2], txns[0], txns[3], txns[1]], [T0 + 1, T0, T0 - 100, T0 - 200],
                        strict=True):
        before = max(allocated)
        tm.prepare(txn.ttid, now, [], {1})
        assert txn.prepared
        assert txn.tid > before
        assert txn.tid % num_partitions == txn.ttid % num_partitions
        # the smallest such TID: no more than one partition round beyond the floor
        assert txn.tid <= max(before + 1, tid_from_time(now)) + num_partitions - 1
        allocated.append(txn.tid)
        nxt = tm.begin(9, now)  # and TTIDs keep going up past the TID
        assert nxt.ttid > txn.tid
        allocated.append(nxt.ttid)
        tm.abort(nxt.ttid)


def test_prepare_records_oids_and_involved():
    tm = TransactionManager(12)
    txn = tm.begin(1, T0)
    involved = {1, 2}
    got = tm.prepare(txn.ttid, T0, [5, 6], involved)
    assert got is txn
    assert txn.oids == [5, 6]
    assert txn.involved == {1, 2}
    involved.add(3)  # a copy is kept
    assert txn.involved == {1, 2}
    assert not txn.fully_locked
    assert tm.prepared_count() == 1
    assert tm.has_pending()


def test_prepare_unknown_ttid_raises():
    tm = TransactionManager(12)
    with pytest.raises(TransactionError):
        tm.prepare(12345, T0, [], {1})
    txn = tm.begin(1, T0)
    with pytest.raises(TransactionError):
        tm.prepare(txn.ttid + 1, T0, [], {1})
    assert tm.prepared_count() == 0


def test_prepare_twice_raises():
    tm = TransactionManager(12)
    txn = tm.begin(1, T0)
    tm.prepare(txn.ttid, T0, [], {1})
    tid = txn.tid
    with pytest.raises(TransactionError):
        tm.prepare(txn.ttid, T0 + 10, [], {2})
    assert txn.tid == tid and txn.involved == {1}
    assert tm.prepared_count() == 1


def test_prepare_after_abort_or_commit_raises():
    tm = TransactionManager(12)
    aborted = tm.begin(1, T0)
    tm.abort(aborted.ttid)
    with pytest.raises(TransactionError):
        tm.prepare(aborted.ttid, T0, [], {1})
    done = tm.begin(1, T0)
    tm.prepare(done.ttid, T0, [], {1})
    assert commit_all(tm, done) == [done]
    with pytest.raises(TransactionError):
        tm.prepare(done.ttid, T0, [], {1})


# -- locking and commit order -----------------------------------------------------------------


def test_commits_complete_in_tid_order():
    tm = TransactionManager(12)
    t1 = tm.begin(1, T0)
    t2 = tm.begin(2, T0)
    tm.prepare(t1.ttid, T0, [], {1, 2})
    tm.prepare(t2.ttid, T0, [], {1})
    assert t1.tid < t2.tid
    tm.locked(t2.ttid, 1)
    assert t2.fully_locked
    assert tm.committable() == []  # t2 waits for t1
    assert tm.last_tid == 0
    tm.locked(t1.ttid, 1)
    assert tm.committable() == []  # t1 still waits for storage 2
    tm.locked(t1.ttid, 2)
    assert tm.committable() == [t1, t2]
    assert tm.last_tid == t2.tid
    assert tm.committable() == []
    assert not tm.has_pending()
    assert tm.prepared_count() == 0


def test_commit_order_is_prepare_order_not_begin_order():
    tm = TransactionManager(12)
    old = tm.begin(1, T0)
    young = tm.begin(2, T0)
    tm.prepare(young.ttid, T0, [], {1})
    tm.prepare(old.ttid, T0, [], {1})
    assert young.tid < old.tid
    tm.locked(old.ttid, 1)
    assert tm.committable() == []
    tm.locked(young.ttid, 1)
    assert tm.committable() == [young, old]
    assert tm.last_tid == old.tid


def test_last_tid_follows_each_commit():
    tm = TransactionManager(12)
    tids = []
    for i in range(3):
        txn = tm.begin(1, T0 - i)
        tm.prepare(txn.ttid, T0 - i, [], {1})
        assert commit_all(tm, txn) == [txn]
        assert tm.last_tid == txn.tid
        tids.append(txn.tid)
    assert tids == sorted(set(tids))


def test_uncommitted_transactions_do_not_move_last_tid():
    tm = TransactionManager(12)
    tm.reset(last_tid=100, last_oid=0)
    txn = tm.begin(1, T0)
    tm.prepare(txn.ttid, T0, [], {1, 2})
    tm.locked(txn.ttid, 1)
    assert tm.committable() == []
    assert tm.last_tid == 100


def test_locked_before_prepare_is_ignored():
    tm = TransactionManager(12)
    txn = tm.begin(1, T0)
    tm.locked(txn.ttid, 1)  # not prepared yet: meaningless
    assert txn.locked == set()
    tm.prepare(txn.ttid, T0, [], {1})
    assert tm.committable() == []
    tm.locked(txn.ttid, 1)
    assert tm.committable() == [txn]


def test_locked_unknown_ttid_is_ignored():
    tm = TransactionManager(12)
    tm.locked(999, 1)
    assert tm.txns == {}
    assert tm.committable() == []


def test_lock_by_uninvolved_storage_does_not_complete():
    tm = TransactionManager(12)
    txn = tm.begin(1, T0)
    tm.prepare(txn.ttid, T0, [], {1})
    tm.locked(txn.ttid, 2)
    assert tm.committable() == []
    tm.locked(txn.ttid, 1)
    assert tm.committable() == [txn]


def test_prepare_with_no_storage_is_committable_at_once():
    tm = TransactionManager(12)
    txn = tm.begin(1, T0)
    tm.prepare(txn.ttid, T0, [], set())
    assert tm.committable() == [txn]
    assert tm.last_tid == txn.tid


# -- lost nodes and aborts --------------------------------------------------------------------


def test_storage_lost_lets_commit_complete_without_it():
    tm = TransactionManager(12)
    txn = tm.begin(1, T0)
    tm.prepare(txn.ttid, T0, [], {1, 2})
    tm.locked(txn.ttid, 1)
    assert tm.committable() == []
    tm.storage_lost(2)
    assert txn.involved == {1}
    assert tm.committable() == [txn]
    assert tm.last_tid == txn.tid



def test_a_transaction_no_storage_locked_is_never_committed():
    """Its storages were lost before they locked it (the last one between
    two checks that the cluster is operational, or before the finish): it
    completes as lost, and the last TID stays.  Before: reported
    committed, held by no storage (test_crash.py lost an acknowledged
    commit so, under load)."""
    tm = TransactionManager(12)
    txn = tm.begin(1, T0)
    tm.prepare(txn.ttid, T0, [], {1, 2})
    txn.cells = {0: {1, 2}, 5: {1, 2}}
    tm.storage_lost(1)
    assert tm.committable() == []
    tm.storage_lost(2)
    assert tm.committable() == [txn]
    assert txn.lost and tm.last_tid == 0
    # nobody writable at the finish: the same
    empty = tm.begin(1, T0)
    tm.prepare(empty.ttid, T0, [], set())
    empty.cells = {3: set()}
    assert tm.committable() == [empty]
    assert empty.lost and tm.last_tid == 0


@pytest.mark.parametrize("lockers, lost", [({2}, False), ({1}, True), ({1, 3}, False)])
def test_each_partition_needs_one_storage_that_locked(lockers, lost):
    tm = TransactionManager(12)
    txn = tm.begin(1, T0)
    tm.prepare(txn.ttid, T0, [], {1, 2, 3})
    txn.cells = {0: {1, 2}, 3: {2, 3}}
    for nid in lockers:
        tm.locked(txn.ttid, nid)
    for nid in {1, 2, 3} - lockers:
        tm.storage_lost(nid)
    assert tm.committable() == [txn]
    assert txn.lost is lost
    assert tm.last_tid == (0 if lost else txn.tid)

def test_storage_lost_unblocks_the_queue_head():
    tm = TransactionManager(12)
    t1 = tm.begin(1, T0)
    t2 = tm.begin(1, T0)
    tm.prepare(t1.ttid, T0, [], {1, 2})
    tm.prepare(t2.ttid, T0, [], {1, 3})
    tm.locked(t1.ttid, 1)
    tm.locked(t2.ttid, 1)
    tm.locked(t2.ttid, 3)
    assert tm.committable() == []
    tm.storage_lost(3)  # not the one t1 waits for
    assert tm.committable() == []
    assert t2.involved == {1}
    tm.storage_lost(2)
    assert tm.committable() == [t1, t2]


def test_storage_lost_only_affects_prepared_transactions():
    tm = TransactionManager(12)
    txn = tm.begin(1, T0)
    tm.storage_lost(1)
    tm.prepare(txn.ttid, T0, [], {1})  # the caller still named it: it is waited for
    assert tm.committable() == []
    tm.locked(txn.ttid, 1)
    assert tm.committable() == [txn]


def test_abort_unprepared():
    tm = TransactionManager(12)
    txn = tm.begin(1, T0)
    assert tm.abort(txn.ttid) is txn
    assert tm.txns == {}
    assert not tm.has_pending()
    assert tm.abort(txn.ttid) is None
    assert tm.abort(424242) is None


def test_abort_prepared_raises_and_keeps_it():
    tm = TransactionManager(12)
    txn = tm.begin(1, T0)
    tm.prepare(txn.ttid, T0, [], {1})
    with pytest.raises(TransactionError):
        tm.abort(txn.ttid)
    assert tm.txns == {txn.ttid: txn}
    assert commit_all(tm, txn) == [txn]


def test_client_lost_aborts_only_its_unprepared_transactions():
    tm = TransactionManager(12)
    a1 = tm.begin(1, T0)
    a2 = tm.begin(1, T0)
    b1 = tm.begin(2, T0)
    a3 = tm.begin(1, T0)
    tm.prepare(a2.ttid, T0, [], {1})
    lost = tm.client_lost(1)
    assert sorted(t.ttid for t in lost) == [a1.ttid, a3.ttid]
    assert set(tm.txns) == {a2.ttid, b1.ttid}
    assert tm.client_lost(1) == []
    assert tm.client_lost(3) == []
    # the prepared one of the lost client still commits
    assert commit_all(tm, a2) == [a2]
    assert set(tm.txns) == {b1.ttid}


def test_pending_and_prepared_counts():
    tm = TransactionManager(12)
    assert not tm.has_pending() and tm.prepared_count() == 0
    t1 = tm.begin(1, T0)
    t2 = tm.begin(1, T0)
    assert tm.has_pending() and tm.prepared_count() == 0
    tm.prepare(t1.ttid, T0, [], {1})
    tm.prepare(t2.ttid, T0, [], {1})
    assert tm.prepared_count() == 2
    tm.locked(t1.ttid, 1)
    assert tm.committable() == [t1]
    assert tm.prepared_count() == 1 and tm.has_pending()


# -- random interleavings ----------------------------------------------------------------------

STORAGES = (1, 2, 3)
CLIENTS = (1, 2, 3)
nows = st.floats(min_value=T0 - 5, max_value=T0 + 5, allow_nan=False)
KINDS = ["locked", "prepare", "begin", "committable", "imposed", "lost", "abort", "client_lost"]


@settings(max_examples=300, deadline=None)
@given(num_partitions=st.integers(1, 12), data=st.data())
def test_random_interleavings_commit_in_tid_order(num_partitions, data):
    tm = TransactionManager(num_partitions)
    begun = []  # every ttid ever begun, in order
    allocated = 0  # greatest TTID/TID handed out so far
    queue = []  # model: uncommitted ttids with a TID (prepared, or imposed), in TID order
    client = {}  # ttid -> client
    imposed = set()  # ttids whose TID was imposed at begin
    involved = {}  # ttid -> storages named at prepare
    locked = {}  # ttid -> storages that locked it after prepare
    excused = {}  # ttid -> storages lost while it was prepared
    state = {}  # ttid -> "running" | "prepared" | "committed" | "aborted"
    committed = []  # TIDs in commit order

    def running():
        return [t for t in begun if state[t] == "running"]

    def draw_ttid(candidates):
        """Usually one of candidates; sometimes any begun transaction, or an unknown one."""
        if candidates and data.draw(st.integers(0, 3)):
            return data.draw(st.sampled_from(candidates))
        if begun and data.draw(st.booleans()):
            return data.draw(st.sampled_from(begun))
        return allocated + 12345  # never allocated

    def ready(ttid):
        return state[ttid] == "prepared" and involved[ttid] <= locked[ttid] | excused[ttid]

    before = {}  # ttid -> the greatest TTID/TID handed out before its begin

    def drop(ttid):
        nonlocal allocated
        state[ttid] = "aborted"
        if ttid in queue:
            queue.remove(ttid)
        if ttid in imposed and allocated == ttid:
            allocated = before[ttid]  # nothing since: its TID may be imposed again

    def check_committable():
        expected = []
        for ttid in queue:
            if not ready(ttid):
                break
            expected.append(ttid)
        done = tm.committable()
        assert [t.ttid for t in done] == expected
        for txn in done:
            assert state[txn.ttid] == "prepared"  # committed at most once
            state[txn.ttid] = "committed"
            assert involved[txn.ttid] <= locked[txn.ttid] | excused[txn.ttid]
            assert not committed or txn.tid > committed[-1]
            committed.append(txn.tid)
        del queue[:len(done)]
        assert tm.last_tid == (committed[-1] if committed else 0)

    for _ in range(data.draw(st.integers(5, 50))):
        kind = data.draw(st.sampled_from(KINDS))
        if kind in ("begin", "imposed"):
            c = data.draw(st.sampled_from(CLIENTS))
            now = data.draw(nows)
            if kind == "imposed":
                wanted = allocated + data.draw(st.integers(-2, 1000))
                if wanted <= allocated:
                    with pytest.raises(TransactionError):
                        tm.begin(c, now, tid=wanted)
                    continue
                txn = tm.begin(c, now, tid=wanted)
                assert txn.ttid == txn.tid == wanted
                imposed.add(txn.ttid)
                queue.append(txn.ttid)  # its place in the commit order is known
            else:
                txn = tm.begin(c, now)
            assert txn.ttid > allocated
            before[txn.ttid] = allocated
            allocated = txn.ttid
            begun.append(txn.ttid)
            client[txn.ttid] = c
            state[txn.ttid] = "running"
        elif kind == "prepare":
            ttid = draw_ttid(running())
            inv = data.draw(st.sets(st.sampled_from(STORAGES), min_size=1))
            now = data.draw(nows)
            if state.get(ttid) != "running":
                with pytest.raises(TransactionError):
                    tm.prepare(ttid, now, [], inv)
                continue
            txn = tm.prepare(ttid, now, [], inv)
            if ttid in imposed:
                assert txn.tid == ttid
            else:
                assert txn.tid > allocated
                assert txn.tid % num_partitions == ttid % num_partitions
                allocated = txn.tid
                queue.append(ttid)
            state[ttid] = "prepared"
            involved[ttid] = set(inv)
            locked[ttid] = set()
            excused[ttid] = set()
        elif kind == "locked":
            ttid = draw_ttid(queue)
            # usually one of the storages it waits for
            waited = sorted(involved.get(ttid, set()) - locked.get(ttid, set()))
            if waited and data.draw(st.integers(0, 3)):
                nid = data.draw(st.sampled_from(waited))
            else:
                nid = data.draw(st.sampled_from(STORAGES))
            tm.locked(ttid, nid)
            if state.get(ttid) == "prepared":
                locked[ttid].add(nid)
        elif kind == "lost":
            nid = data.draw(st.sampled_from(STORAGES))
            tm.storage_lost(nid)
            for ttid in queue:
                if state[ttid] == "prepared":
                    excused[ttid].add(nid)
        elif kind == "abort":
            ttid = draw_ttid(running())
            if state.get(ttid) == "prepared":
                with pytest.raises(TransactionError):
                    tm.abort(ttid)
            elif state.get(ttid) == "running":
                assert tm.abort(ttid).ttid == ttid
                drop(ttid)
            else:
                assert tm.abort(ttid) is None
        elif kind == "client_lost":
            c = data.draw(st.sampled_from(CLIENTS))
            expected = {t for t in running() if client[t] == c}
            lost = [t.ttid for t in tm.client_lost(c)]
            assert set(lost) == expected
            for ttid in lost:  # in the order they were aborted
                drop(ttid)
        else:
            check_committable()
        assert tm.prepared_count() == len(queue)
        assert set(tm.txns) == {t for t, s in state.items() if s in ("running", "prepared")}
    # finally drop what is not finishing and lock everything: the queue drains in TID order
    for ttid in running():
        tm.abort(ttid)
        drop(ttid)
    for ttid in queue:
        for nid in involved[ttid]:
            tm.locked(ttid, nid)
            locked[ttid].add(nid)
    check_committable()
    assert queue == [] and tm.prepared_count() == 0
    assert not tm.has_pending()
    assert committed == sorted(set(committed))


def test_imposed_tid_refusal_names_both_tids():
    tm = TransactionManager(12)
    last = tid_from_time(T0)
    tm.reset(last_tid=last, last_oid=0)
    with pytest.raises(TransactionError) as info:
        tm.begin(1, T0, tid=last - 5)
    message = str(info.value)
    assert "%016x" % (last - 5) in message and "%016x" % last in message
    assert "is not greater than the last TID of the cluster" in message


# -- refusals (issue 11) ---------------------------------------------------------------------


def test_imposed_tid_is_bounded_by_the_clock():
    from neozodb.master.transactions import IMPOSED_AHEAD
    tm = TransactionManager(12)
    tm.begin(1, T0, tid_from_time(T0 + IMPOSED_AHEAD - 1))
    with pytest.raises(TransactionError, match="ahead of the clock"):
        tm.begin(2, T0, tid_from_time(T0 + IMPOSED_AHEAD + 60))


def test_a_refusal_covered_by_another_lock_commits():
    tm = TransactionManager(12)
    txn = tm.begin(1, T0)
    tm.prepare(txn.ttid, T0 + 1, [], {1, 2})
    txn.cells = {0: {1, 2}}
    tm.refused(txn.ttid, 1)
    assert tm.committable() == []  # still waiting for storage 2
    tm.locked(txn.ttid, 2)
    assert tm.committable() == [txn] and not txn.lost
    assert tm.last_tid == txn.tid


def test_a_partition_nobody_locked_loses_the_transaction():
    tm = TransactionManager(12)
    txn = tm.begin(1, T0)
    tm.prepare(txn.ttid, T0 + 1, [], {1, 2})
    txn.cells = {0: {1}, 1: {2}}
    tm.locked(txn.ttid, 2)
    tm.refused(txn.ttid, 1)
    assert tm.committable() == [txn] and txn.lost
    assert tm.last_tid == 0  # not committed


def test_an_aborted_imposed_batch_gives_its_tids_back_to_imposed_begins():
    """A bulk copy's batch the storages refused is aborted, and its
    transactions copied one by one with the same TIDs: those TIDs may be
    imposed again if nothing was handed out since.  TTIDs from the clock
    stay above the aborted one (storages remember it as aborted)."""
    tm = TransactionManager(12)
    last = tid_from_time(T0)
    tm.reset(last_tid=last, last_oid=0)
    batch = tm.begin(1, T0, tid=last + 20, first=last + 1)
    tm.abort(batch.ttid)
    first = tm.begin(1, T0, tid=last + 1)  # the batch's first transaction, alone
    assert first.ttid == last + 1
    clock = tm.begin(2, T0)
    assert clock.ttid > batch.ttid  # never the aborted TTID again
    # something handed out after the aborted one: no going back
    tm.abort(first.ttid)
    other = tm.begin(1, T0, tid=clock.ttid + 5)
    tm.begin(2, T0)
    tm.abort(other.ttid)
    with pytest.raises(TransactionError):
        tm.begin(1, T0, tid=other.ttid)


# -- TTID blocks reserved ahead (feature begin-ahead) ------------------------------------


def test_a_reserved_block_is_handed_out_to_nobody_else():
    tm = TransactionManager(12)
    before = tm.begin(1, T0)
    base = tm.reserve(T0)
    assert base > before.ttid
    block = range(base, base + 12)
    assert sorted(t % 12 for t in block) == list(range(12))  # one in each partition
    # what is allocated after it (the clock standing still) comes after it
    other = tm.begin(2, T0)
    imposed_too_low = base + 11
    assert other.ttid >= block.stop
    with pytest.raises(TransactionError, match="not greater"):
        tm.begin(3, T0, tid=imposed_too_low)
    tm.prepare(other.ttid, T0, [], {1})
    assert other.tid >= block.stop


@given(st.integers(0, 11))
def test_a_reserved_ttid_begins_a_transaction_whose_tid_keeps_its_partition(partition):
    tm = TransactionManager(12)
    base = tm.reserve(T0)
    tm.begin(2, T0)  # another client began since
    ttid = base + (partition - base) % 12
    txn = tm.begin(1, T0, reserved=ttid)
    assert txn.ttid == ttid and tm.txns[ttid] is txn and not txn.imposed
    with pytest.raises(TransactionError, match="already in use"):
        tm.begin(1, T0, reserved=ttid)
    tm.prepare(ttid, T0, [], {1})
    assert txn.tid % 12 == partition
    assert txn.tid > ttid


def test_reservations_of_a_connection():
    from neozodb.master.transactions import Reservations
    r = Reservations()
    r.add(100, topology=5)
    r.add(200, topology=5)
    assert not r.take(99, 12, 5) and not r.take(112, 12, 5)  # outside both blocks
    assert r.take(111, 12, 5)  # in the first: used up
    assert not r.take(100, 12, 5)
    # sent a node list or a table since: stale, used up too
    assert not r.take(205, 12, 6)
    assert not r.take(205, 12, 5)
    # one block a committing thread: the oldest forgotten beyond the limit
    for i in range(Reservations.LIMIT + 1):
        r.add(1000 * (i + 1), topology=0)
    assert not r.take(1000, 12, 0)
    assert r.take(2000, 12, 0) and r.take(1000 * (Reservations.LIMIT + 1), 12, 0)
