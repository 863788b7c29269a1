"""The client's object cache (pure core)."""

import struct

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from neozodb.client.cache import ClientCache

pytestmark = pytest.mark.timeout(60)


def p64(n: int) -> bytes:
    return struct.pack(">Q", n)


OID = p64(1)
OID2 = p64(2)
T1, T2, T3, T4, T5 = (p64(n) for n in (10, 20, 30, 40, 50))


def test_empty():
    cache = ClientCache(1000)
    assert len(cache) == 0 and cache.size == 0
    assert cache.load(OID) is None
    assert cache.load(OID, T2) is None
    assert (cache.hits, cache.misses) == (0, 2)


def test_current_and_before():
    cache = ClientCache(1000)
    cache.store(OID, b"one", T1, None)
    assert cache.load(OID) == (b"one", T1, None)
    # A current revision answers any before_tid above its serial.
    assert cache.load(OID, T2) == (b"one", T1, None)
    assert cache.load(OID, p64(11)) == (b"one", T1, None)
    assert cache.load(OID, T1) is None
    assert cache.load(OID2) is None
    assert (cache.hits, cache.misses) == (3, 2)
    assert len(cache) == 1 and cache.size == 3
    cache._check()


def test_invalidate():
    cache = ClientCache(1000)
    cache.store(OID, b"one", T1, None)
    cache.invalidate(OID, T3)
    assert cache.load(OID) is None
    assert cache.load(OID, T2) == (b"one", T1, T3)
    assert cache.load(OID, T3) == (b"one", T1, T3)
    assert cache.load(OID, T4) is None
    # Invalidating again (no current revision) changes nothing.
    cache.invalidate(OID, T5)
    assert cache.load(OID, T3) == (b"one", T1, T3)
    cache.store(OID, b"two", T3, None)
    assert cache.load(OID) == (b"two", T3, None)
    assert cache.load(OID, T4) == (b"two", T3, None)
    assert cache.load(OID, T3) == (b"one", T1, T3)
    # Unknown oid: nothing happens.
    cache.invalidate(OID2, T5)
    assert len(cache) == 2
    cache._check()


def test_store_ignores_present_revision_but_learns_next_serial():
    cache = ClientCache(1000)
    cache.store(OID, b"one", T1, None)
    cache.store(OID, b"other", T1, None)
    assert cache.load(OID) == (b"one", T1, None)
    assert cache.size == 3
    cache.store(OID, b"one", T1, T2)
    assert cache.load(OID) is None
    assert cache.load(OID, T2) == (b"one", T1, T2)
    cache._check()


def test_store_older_revisions_and_gaps():
    cache = ClientCache(1000)
    cache.store(OID, b"three", T3, None)
    cache.store(OID, b"one", T1, T2)
    assert cache.load(OID) == (b"three", T3, None)
    assert cache.load(OID, T2) == (b"one", T1, T2)
    # Between T2 and T3 lies an uncached revision.
    assert cache.load(OID, p64(25)) is None
    assert cache.load(OID, T3) is None
    assert cache.load(OID, T4) == (b"three", T3, None)
    cache._check()


def test_store_stale_current_is_refused_and_newer_current_replaces():
    cache = ClientCache(1000)
    cache.store(OID, b"three", T3, None)
    # A late answer claiming T1 is current: stale, not recorded.
    cache.store(OID, b"one", T1, None)
    assert cache.load(OID, T2) is None
    assert cache.load(OID) == (b"three", T3, None)
    # A newer current revision: T3's end is unknown, so it goes.
    cache.store(OID, b"five", T5, None)
    assert cache.load(OID) == (b"five", T5, None)
    assert cache.load(OID, T4) is None
    assert len(cache) == 1
    with pytest.raises(ValueError):
        cache.store(OID, b"x", T2, T1)
    cache._check()


def test_forget():
    cache = ClientCache(1000)
    cache.store(OID, b"one", T1, T2)
    cache.store(OID, b"two", T2, None)
    cache.store(OID2, b"x", T1, None)
    cache.forget(OID)
    cache.forget(OID)
    assert cache.load(OID) is None and cache.load(OID, T2) is None
    assert cache.load(OID2) == (b"x", T1, None)
    assert len(cache) == 1 and cache.size == 1
    cache._check()


def test_clear_current():
    cache = ClientCache(1000)
    cache.store(OID, b"one", T1, T2)
    cache.store(OID, b"two", T2, None)
    cache.store(OID2, b"x", T1, None)
    cache.clear_current()
    assert cache.load(OID) is None
    assert cache.load(OID2) is None
    assert cache.load(OID, T2) == (b"one", T1, T2)
    assert cache.load(OID, T3) is None
    assert len(cache) == 1 and cache.size == 3
    cache._check()
    cache.clear()
    assert len(cache) == 0 and cache.size == 0 and cache.load(OID, T2) is None
    cache._check()


def test_large_data_not_cached():
    cache = ClientCache(100)
    cache.store(OID, b"x" * 51, T1, None)
    assert cache.load(OID) is None
    cache.store(OID, b"x" * 50, T1, None)
    assert cache.load(OID) == (b"x" * 50, T1, None)
    cache._check()


def test_eviction_is_lru_within_a_level():
    cache = ClientCache(30)
    for n in range(1, 5):
        cache.store(p64(n), b"x" * 10, T1, None)
        cache._check()
    assert cache.size == 30 and len(cache) == 3
    assert cache.load(p64(1)) is None
    assert cache.load(p64(4)) is not None


def test_frequent_items_survive_a_scan():
    cache = ClientCache(100)
    hot = p64(0)
    cache.store(hot, b"h" * 10, T1, None)
    for _ in range(10):
        assert cache.load(hot) is not None
    # A scan of objects read once, much bigger than the cache.
    for n in range(1, 200):
        cache.store(p64(n), b"s" * 10, T1, None)
    assert cache.load(hot) == (b"h" * 10, T1, None)
    cache._check()


def test_history_remembers_frequency():
    cache = ClientCache(20, max_history=10)
    a = p64(100)
    cache.store(a, b"a" * 10, T1, None)
    cache.load(a)
    cache.load(a)
    cache.load(a)  # counter 4: level 3
    cache.store(p64(1), b"b" * 10, T1, None)
    cache.store(p64(2), b"c" * 10, T1, None)  # evicts b (level 1)
    assert cache.load(p64(1)) is None
    assert cache.load(a) is not None
    cache._check()
    # History is bounded.
    for n in range(3, 40):
        cache.store(p64(n), b"d" * 10, T1, None)
        cache._check()
    assert len(cache._queues[0]) <= 10


def test_expired_items_are_demoted():
    cache = ClientCache(30, life_time=5)
    hot = p64(0)
    cache.store(hot, b"h" * 10, T1, None)
    for _ in range(7):
        cache.load(hot)  # counter 8: level 4
    # Long after its last access, a stream of new items demotes then
    # evicts it: frequency decays.
    for n in range(1, 100):
        cache.store(p64(n), b"s" * 10, T1, None)
        cache._check()
    assert cache.load(hot) is None


# -- model-based random workload ------------------------------------------


@st.composite
def op(draw):
    # Mostly loads (so that hits happen), some commits, rare reconnections.
    kind = draw(st.integers(0, 19))
    if kind == 0:
        return ("clear_current",)
    if kind <= 5:
        return ("commit", draw(st.integers(0, 7)))
    return ("load", draw(st.integers(0, 7)), draw(st.none() | st.integers(0, 60)))


ops = st.lists(op(), min_size=30, max_size=300)


@settings(max_examples=200, deadline=None)
@given(
    ops,
    st.integers(0, 400),
    st.lists(st.integers(0, 60), min_size=1, max_size=8),
    st.integers(1, 50),
    st.integers(0, 20),
)
def test_random_workload_against_model(operations, max_size, sizes, life_time, max_history):
    """Whatever the cache answers matches the database; size stays bounded."""
    cache = ClientCache(max_size, life_time=life_time, max_history=max_history)
    # The database: per oid, ascending serials; data derived from (oid, serial).
    db: dict[int, list[int]] = {}
    last_tid = 0

    def data_of(oid, serial):
        size = sizes[(oid + serial) % len(sizes)]
        return (b"%d@%d:" % (oid, serial) + b"." * size)[: max(size, 1)]

    for op in operations:
        if op[0] == "commit":
            last_tid += 1
            db.setdefault(op[1], []).append(last_tid)
            cache.invalidate(p64(op[1]), p64(last_tid))
        elif op[0] == "load":
            oid = op[1]
            before = last_tid + 1 if op[2] is None else min(op[2], last_tid + 1)
            serials = [s for s in db.get(oid, ()) if s < before]
            truth = None
            if serials:
                serial = serials[-1]
                later = [s for s in db[oid] if s > serial]
                next_serial = p64(later[0]) if later else None
                truth = (data_of(oid, serial), p64(serial), next_serial)
            got = cache.load(p64(oid), None if op[2] is None else p64(before))
            if got is not None:
                assert got == truth
            elif truth is not None:
                cache.store(p64(oid), *truth)
        else:
            cache.clear_current()
        cache._check()
        assert cache.size <= max_size
    assert cache.hits + cache.misses == sum(op[0] == "load" for op in operations)
    event("hits" if cache.hits else "no hits")


@pytest.mark.parametrize("max_history", [0, 10])
def test_history_counter_survives_eviction(max_history):
    cache = ClientCache(20, max_history=max_history)
    b, c, d = p64(1), p64(2), p64(3)
    cache.store(b, b"b" * 10, T1, None)
    cache.store(c, b"c" * 10, T1, None)
    cache.store(d, b"d" * 10, T1, None)  # evicts b
    assert cache.load(b) is None
    cache.store(b, b"b" * 10, T1, None)  # evicts c
    cache._check()
    assert cache.load(c) is None
    # b was stored twice in all: with history that is remembered, so it
    # ranks above items seen once and outlives a scan of them.
    assert cache._oids[b][0].counter == (2 if max_history else 1)
    for n in range(10, 20):
        cache.store(p64(n), b"s" * 10, T1, None)
        cache._check()
    assert (cache.load(b) is None) == (not max_history)


def test_drop_history_of_a_pack():
    cache = ClientCache(1000)
    cache.store(OID, b"one", T1, T2)    # superseded at T2
    cache.store(OID, b"two", T2, T4)    # superseded at T4
    cache.store(OID, b"four", T4, None)  # current
    cache.store(OID2, b"gone", T1, T3)  # deleted at T3
    cache.drop_history(T3)
    # what stopped being current by T3 is gone, as on the storages
    assert cache.load(OID, T2) is None and cache.load(OID2, T3) is None
    assert cache.load(OID, T3) == (b"two", T2, T4)
    assert cache.load(OID) == (b"four", T4, None)
    assert len(cache) == 2 and cache.size == len(b"two") + len(b"four")
    cache.drop_history(T5)
    assert cache.load(OID, T3) is None and cache.load(OID) == (b"four", T4, None)
    assert len(cache) == 1


# -- our own commits, many objects at once -----------------------------------


def _state(cache):
    return {oid: [(i.serial, i.next_serial, i.data, i.counter, i.level) for i in items]
            for oid, items in cache._oids.items()}


@st.composite
def own_commits(draw):
    """Operations on oids 0-7: commits of several of them by us (data, or
    None for a deletion), by others (an invalidation), and loads."""
    result = []
    for _ in range(draw(st.integers(5, 60))):
        kind = draw(st.integers(0, 9))
        if kind < 4:
            oids = draw(st.lists(st.integers(0, 7), min_size=1, max_size=6, unique=True))
            result.append(("ours", {oid: draw(st.none() | st.binary(min_size=1, max_size=30))
                                    for oid in oids}))
        elif kind < 6:
            result.append(("theirs", draw(st.integers(0, 7))))
        else:
            result.append(("load", draw(st.integers(0, 7))))
    return result


@settings(max_examples=200, deadline=None)
@given(own_commits())
def test_committed_is_invalidate_then_store(operations):
    """Without eviction, ``committed`` leaves the cache exactly as an
    invalidation then a store of each object would."""
    batch, single = ClientCache(1 << 20), ClientCache(1 << 20)
    tid = 0
    for op in operations:
        tid += 1
        if op[0] == "ours":
            batch.committed(p64(tid), {p64(oid): data for oid, data in op[1].items()})
            for oid, data in op[1].items():
                single.invalidate(p64(oid), p64(tid))
                if data is not None:
                    single.store(p64(oid), data, p64(tid), None)
        elif op[0] == "theirs":
            for cache in (batch, single):
                cache.invalidate(p64(op[1]), p64(tid))
        else:
            assert batch.load(p64(op[1])) == single.load(p64(op[1]))
        batch._check()
        assert _state(batch) == _state(single)
        assert (len(batch), batch.size) == (len(single), single.size)


@settings(max_examples=200, deadline=None)
@given(own_commits(), st.integers(0, 80), st.integers(0, 10))
def test_committed_against_model(operations, max_size, max_history):
    """With evictions: what the cache answers after our commits is what
    was committed, and the cache stays within its size."""
    cache = ClientCache(max_size, life_time=5, max_history=max_history)
    db: dict[int, list[tuple[int, bytes | None]]] = {}
    tid = 0
    for op in operations:
        tid += 1
        if op[0] == "ours":
            cache.committed(p64(tid), {p64(oid): data for oid, data in op[1].items()})
            for oid, data in op[1].items():
                db.setdefault(oid, []).append((tid, data))
        elif op[0] == "theirs":
            cache.invalidate(p64(op[1]), p64(tid))
            db.setdefault(op[1], []).append((tid, None))
        else:
            got = cache.load(p64(op[1]))
            revisions = db.get(op[1])
            if got is not None:
                assert revisions and got == (revisions[-1][1], p64(revisions[-1][0]), None)
        cache._check()
        assert cache.size <= max_size


def test_committed_after_a_racing_load():
    """A load that got our new revision before our finish was processed:
    it stays, once."""
    cache = ClientCache(1000)
    cache.store(OID, b"one", T1, None)
    cache.invalidate(OID, T2)
    cache.store(OID, b"two", T2, None)
    cache.committed(T2, {OID: b"two", OID2: b"new"})
    cache._check()
    assert [i.serial for i in cache._oids[OID]] == [T1, T2]
    assert cache.load(OID) == (b"two", T2, None)
    assert cache.load(OID, T2) == (b"one", T1, T2)
    assert cache.load(OID2) == (b"new", T2, None)
    assert len(cache) == 3 and cache.size == len(b"one" + b"two" + b"new")
