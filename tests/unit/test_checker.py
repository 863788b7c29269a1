"""Which copies a replica check reports (storage/checker.py)."""
from __future__ import annotations

import pytest

from neozodb.storage.checker import odd_ones

pytestmark = pytest.mark.timeout(10)


def test_all_agree():
    assert odd_ones({1: ("a",), 2: ("a",), 3: ("a",)}, None) == set()


def test_majority_decides():
    assert odd_ones({1: ("a",), 2: ("b",), 3: ("a",)}, None) == {2}


def test_no_majority():
    assert odd_ones({1: ("a",), 2: ("b",)}, None) is None
    assert odd_ones({1: ("a",), 2: ("b",), 3: ("c",)}, None) is None


def test_reference_wins_over_majority():
    assert odd_ones({1: ("a",), 2: ("b",), 3: ("b",)}, 1) == {2, 3}
    assert odd_ones({1: ("a",), 2: ("b",)}, 2) == {1}


# -- what is sent, to whom -----------------------------------------------------------

def test_empty_report_only_to_a_master_waiting_for_it():
    """NEO's master logs any NotifyPartitionCorrupted as a corruption, an
    empty one included: it gets one only when copies differ."""
    from neozodb.protocol.features import FEATURES, NO_FEATURES
    from neozodb.storage.checker import should_report
    assert not should_report([], NO_FEATURES)
    assert should_report([], FEATURES)
    assert should_report([2], NO_FEATURES)


# -- digests: NEO's, and ours after it between neozodb storages -------------------------

NP = 4


@pytest.fixture
def backend(tmp_path):
    import hashlib

    from neozodb.storage.backends.sqlite import SQLiteBackend
    db = SQLiteBackend(str(tmp_path / "storage.sqlite"))
    db.open(reset=True)
    db.set_num_partitions(NP)
    # partition 1: tids 5 and 9, oids 1 and 5
    for tid, oids in ((5, [1]), (9, [1, 5])):
        for oid in oids:
            data = b"%d@%d" % (oid, tid)
            db.add_object(oid, tid, 0, hashlib.sha1(data).digest(), data, None)
        db.add_transaction(tid, oids, b"user", b"desc", b"", False, tid - NP)
    db.commit_pending()
    yield db
    db.close()


def _sha1(text: bytes) -> bytes:
    import hashlib
    return hashlib.sha1(text).digest()


def test_tid_digest_is_neos(backend):
    """NEO's storage computes SHA-1 over the TIDs in decimal, comma
    separated (its SQLite GROUP_CONCAT): a copy on NEO's storage compares
    equal to ours only if we do the same."""
    from neozodb.protocol import ZERO_HASH, ZERO_TID, p64
    from neozodb.protocol.features import NO_FEATURES
    from neozodb.storage.checker import tid_range_answer
    assert tid_range_answer(backend, NO_FEATURES, 1, 100, 0, 100) == (2, _sha1(b"5,9"), p64(9))
    assert tid_range_answer(backend, NO_FEATURES, 1, 1, 0, 100) == (1, _sha1(b"5"), p64(5))
    assert tid_range_answer(backend, NO_FEATURES, 1, 100, 10, 100) == (0, ZERO_HASH, ZERO_TID)


def test_serial_digest_is_neos(backend):
    from neozodb.protocol import ZERO_HASH, ZERO_OID, ZERO_TID, p64
    from neozodb.protocol.features import NO_FEATURES
    from neozodb.storage.checker import serial_range_answer
    assert serial_range_answer(backend, NO_FEATURES, 1, 100, 0, 100, 0) == (
        3, _sha1(b"5,9,9"), p64(9), _sha1(b"1,1,5"), p64(5))
    assert serial_range_answer(backend, NO_FEATURES, 1, 100, 9, 100, 2) == (
        1, _sha1(b"9"), p64(9), _sha1(b"5"), p64(5))
    assert serial_range_answer(backend, NO_FEATURES, 1, 100, 10, 100, 0) == (
        0, ZERO_HASH, ZERO_TID, ZERO_HASH, ZERO_OID)


def test_neozodb_digest_follows_neos(backend):
    """With ``check-digest``: NEO's digest, then ours, which also covers
    metadata and data; neo_part() cuts it back for a mixed comparison."""
    from neozodb.protocol.features import FEATURES, NO_FEATURES
    from neozodb.storage.checker import neo_part, serial_range_answer, tid_range_answer
    for answer in (tid_range_answer, serial_range_answer):
        args = (1, 100, 0, 100) + ((0,) if answer is serial_range_answer else ())
        neo, ours = answer(backend, NO_FEATURES, *args), answer(backend, FEATURES, *args)
        assert neo_part(ours) == neo and ours != neo
        assert all(len(a) == 40 for a in ours if isinstance(a, bytes) and len(a) > 8)
    before = tid_range_answer(backend, FEATURES, 1, 100, 0, 100)
    backend.connection.execute("UPDATE trans SET description=? WHERE tid=5", (b"tampered",))
    after = tid_range_answer(backend, FEATURES, 1, 100, 0, 100)
    assert after != before and neo_part(after) == neo_part(before)


# -- which storage checks (master/checks.py) ------------------------------------------------

def test_checker_is_a_storage_that_reports_the_end():
    """NEO's storage says nothing when copies agree: a neozodb one checks
    whenever the partition has a copy on one, even the reference."""
    from neozodb.master.checks import choose_checker
    ours = {3, 4}.__contains__
    assert choose_checker([1, 2, 3], None, ours, {}) == 3
    assert choose_checker([1, 3, 4], None, ours, {3: 2}) == 4       # least loaded
    assert choose_checker([1, 3, 4], 3, ours, {}) == 4              # not the reference
    assert choose_checker([1, 3], 3, ours, {}) == 3                 # rather than NEO's
    assert choose_checker([1, 2], None, ours, {1: 1}) == 2          # NEO's only
