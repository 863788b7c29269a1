"""Behaviour every storage backend must have (``neozodb.storage.backends``).

``BackendConformance`` is a mixin: a backend's test module subclasses it as
``class TestFooBackend(BackendConformance)`` and provides
``make_backend(self, tmp_path)``, returning a new, *unopened* backend on the
database belonging to ``tmp_path`` (two calls with the same ``tmp_path``
must reach the same database, which is how reopening is tested).  Tests
open the first backend with ``reset=True``, so a server database shared by
tests starts empty.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neozodb.storage.backends import DISCARDED, ZERO_HASH, Backend

NP = 4  # partitions used by most tests

UP_TO_DATE, OUT_OF_DATE, FEEDING = 1, 0, 2


def h(data: bytes) -> bytes:
    return hashlib.sha1(data).digest()


class BackendConformance:
    """Shared backend tests; see the module docstring."""

    def make_backend(self, tmp_path) -> Backend:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- helpers -------------------------------------------------------------

    @pytest.fixture
    def opener(self, tmp_path):
        """``opener(reset=False)`` opens a backend on this test's database;
        every backend opened is closed at teardown."""
        opened: list[Backend] = []

        def open_(reset: bool = False) -> Backend:
            backend = self.make_backend(tmp_path)
            backend.open(reset=reset)
            opened.append(backend)
            return backend

        yield open_
        for backend in opened:
            backend.close()

    @pytest.fixture
    def db(self, opener) -> Backend:
        backend = opener(reset=True)
        backend.set_num_partitions(NP)
        return backend

    @staticmethod
    def reopen(backend: Backend, opener) -> Backend:
        backend.close()
        return opener()

    @staticmethod
    def commit(db: Backend, tid: int, objects: dict[int, bytes | None], *,
               ttid: int | None = None, user: bytes = b'user', description: bytes = b'desc',
               ext: bytes = b'', undo: dict[int, int] | None = None) -> dict[int, int | None]:
        """Run a full commit cycle; returns the data id used for each oid.

        ``objects`` maps oid -> data (None = deletion); ``undo`` maps oid ->
        the tid whose data the new revision reuses (back-pointer).  The ttid
        defaults to ``tid - NP``: smaller, and in the same partition, as the
        master allocates them."""
        undo = undo or {}
        if ttid is None:
            ttid = tid - NP
        rows = []
        data_ids: dict[int, int | None] = {}
        for oid, data in objects.items():
            if oid in undo:
                # as the storage does: the undone revision's row, held
                data_id = db.get_revision(oid, tid=undo[oid])[1]
                db.hold_data(data_id)
                rows.append((oid, data_id, undo[oid]))
            elif data is None:
                data_id = None
                rows.append((oid, None, None))
            else:
                data_id = db.store_data(h(data), 0, data)
                rows.append((oid, data_id, None))
            data_ids[oid] = data_id
        db.store_transaction(ttid, rows, (list(objects), user, description, ext, False))
        db.lock_transaction(ttid, tid)
        db.unlock_transaction(ttid, tid)
        return data_ids

    # -- schema and configuration ------------------------------------------------

    def test_fresh_database_is_empty(self, opener):
        db = opener(reset=True)
        assert db.name
        assert isinstance(db.describe(), str) and db.describe()
        assert db.get_nid() is None
        assert db.get_name() is None
        assert db.get_num_partitions() is None
        assert db.get_pt() == (None, 0, [])
        assert db.last_ids() == (None, None)
        assert db.first_tid() is None
        assert db.get_locked_transactions() == {}
        assert db.get_object(1) is None

    def test_config_round_trip_and_persistence(self, opener):
        db = opener(reset=True)
        db.set_config('foo', 'bar')
        assert db.get_config('foo') == 'bar'
        db.set_config('foo', 'baz')
        assert db.get_config('foo') == 'baz'
        db.set_config('gone', 'x')
        db.set_config('gone', None)
        assert db.get_config('gone') is None
        db.set_nid(0x10000001)
        db.set_name('cluster')
        db.set_num_partitions(12)
        db = self.reopen(db, opener)
        assert db.get_config('foo') == 'baz'
        assert db.get_config('gone') is None
        assert db.get_nid() == 0x10000001
        assert db.get_name() == 'cluster'
        assert db.get_num_partitions() == 12
        db.set_num_partitions(12)  # same value: accepted
        with pytest.raises(ValueError):
            db.set_num_partitions(13)
        assert db.get_num_partitions() == 12

    def test_reset_and_erase(self, opener, db):
        db.set_name('cluster')
        self.commit(db, 6, {1: b'a'})
        db.erase()
        assert db.get_name() is None
        assert db.get_num_partitions() is None
        assert db.get_object(1) is None
        db.set_num_partitions(NP)
        self.commit(db, 6, {1: b'a'})
        db = self.reopen(db, opener)
        assert db.get_object(1)[0] == 6
        db.close()
        db = opener(reset=True)
        assert db.get_num_partitions() is None
        assert db.last_ids() == (None, None)

    # -- partition table --------------------------------------------------------

    def test_partition_table(self, opener):
        db = opener(reset=True)
        rows = [[(1, UP_TO_DATE), (2, UP_TO_DATE)], [(2, UP_TO_DATE)], [(1, UP_TO_DATE)]]
        db.save_pt(1, 1, rows)
        assert db.get_num_partitions() == 3
        assert db.get_pt() == (1, 1, rows)
        db.change_pt(2, 1, [(0, 2, DISCARDED), (1, 3, OUT_OF_DATE), (2, 1, FEEDING)])
        expected = [[(1, UP_TO_DATE)], [(2, UP_TO_DATE), (3, OUT_OF_DATE)], [(1, FEEDING)]]
        assert db.get_pt() == (2, 1, expected)
        db = self.reopen(db, opener)
        assert db.get_pt() == (2, 1, expected)
        db.change_pt(3, 2, [(2, 1, DISCARDED)])
        assert db.get_pt() == (3, 2, [[(1, UP_TO_DATE)], [(2, UP_TO_DATE), (3, OUT_OF_DATE)], []])
        db.save_pt(4, 0, [[(5, UP_TO_DATE)], [(5, UP_TO_DATE)], [(5, UP_TO_DATE)]])
        assert db.get_pt() == (4, 0, [[(5, UP_TO_DATE)]] * 3)
        with pytest.raises(ValueError):
            db.save_pt(5, 0, [[(5, UP_TO_DATE)]])  # wrong number of partitions

    # -- commit cycle and reads ------------------------------------------------

    def test_commit_cycle(self, db):
        data = b'some pickle'
        data_id = db.store_data(h(data), 0, data)
        db.store_transaction(100, [(1, data_id, None)], ([1], b'u', b'd', b'e', False))
        assert db.get_object(1) is None          # voted only: not readable
        assert db.last_serial(1) is None
        assert db.get_locked_transactions() == {100: None}
        db.lock_transaction(100, 104)
        assert db.get_locked_transactions() == {100: 104}
        assert db.get_final_tid(100) == 104
        assert db.get_object(1) is None          # locked: still not committed
        assert db.last_ids() == (104, 1)
        db.unlock_transaction(100, 104)
        assert db.get_locked_transactions() == {}
        assert db.get_final_tid(100) == 104
        expected = (104, None, 0, h(data), data, None)
        assert db.get_object(1) == expected
        assert db.get_object(1, tid=104) == expected
        assert db.get_object(1, before_tid=105) == expected
        assert db.get_object(1, before_tid=104) is False
        assert db.get_object(1, tid=103) is False
        assert db.get_object(2) is None
        assert db.get_object(2, tid=104) is None
        assert db.last_serial(1) == 104
        assert db.get_transaction(104) == ([1], b'u', b'd', b'e', False, 100)
        assert db.first_tid() == 104
        with pytest.raises(ValueError):
            db.get_object(1, tid=104, before_tid=105)

    def test_bulk_lock(self, db):
        """The transactions of a bulk copy (storage/bulk.py): each voted
        under its own TID as TTID, then all locked at once with that TID,
        survive drop_unfinished as locked, and unlock in order."""
        for tid, value in ((200, b'first'), (201, b'second'), (205, b'third')):
            data_id = db.store_data(h(value), 0, value)
            db.store_transaction(tid, [(1, data_id, None)], ([1], b'', value, b'', False))
        db.store_transaction(300, [(2, None, None)], ([2], b'', b'', b'', False))  # another
        assert db.get_locked_transactions() == {200: None, 201: None, 205: None, 300: None}
        db.lock_bulk([200, 201, 205])
        assert db.get_locked_transactions() == {200: 200, 201: 201, 205: 205, 300: None}
        db.drop_unfinished()
        assert db.get_locked_transactions() == {200: 200, 201: 201, 205: 205}
        for tid in (200, 201, 205):
            db.unlock_transaction(tid, tid)
        assert db.get_locked_transactions() == {}
        assert [db.get_object(1, tid=tid)[4] for tid in (200, 201, 205)] == [
            b'first', b'second', b'third']
        assert db.get_transaction(201)[2] == b'second'
        assert db.last_serial(1) == 205

    def test_several_revisions(self, db):
        for i, tid in enumerate((10, 20, 30)):
            self.commit(db, tid, {5: b'rev%d' % i})
        assert db.get_object(5) == (30, None, 0, h(b'rev2'), b'rev2', None)
        assert db.get_object(5, tid=10) == (10, 20, 0, h(b'rev0'), b'rev0', None)
        assert db.get_object(5, tid=20) == (20, 30, 0, h(b'rev1'), b'rev1', None)
        assert db.get_object(5, before_tid=30)[:2] == (20, 30)
        assert db.get_object(5, before_tid=25)[:2] == (20, 30)
        assert db.get_object(5, before_tid=11)[:2] == (10, 20)
        assert db.get_object(5, before_tid=10) is False
        assert db.get_object(5, before_tid=2**63 - 1)[:2] == (30, None)
        assert db.get_object(5, tid=15) is False
        assert db.last_serial(5) == 30
        assert db.get_object_history(5, 0, 10) == [(30, 4), (20, 4), (10, 4)]
        assert db.get_object_history(5, 1, 1) == [(20, 4)]
        assert db.get_object_history(5, 3, 10) == []
        assert db.get_object_history(6, 0, 10) is None

    def test_last_serials_of_a_burst(self, db):
        """``last_serials`` (a burst of stores) gives what ``last_serial``
        gives for each oid, over more oids than one statement takes, with
        oids never stored, voted only, and deleted."""
        for tid in (10, 20):
            self.commit(db, tid, {oid: b'%d-%d' % (oid, tid) for oid in range(tid, 600, 7)})
        self.commit(db, 30, {3: None})
        data = b'voted only'
        db.store_transaction(100, [(1, db.store_data(h(data), 0, data), None)],
                             ([1], b'', b'', b'', False))
        oids = list(range(0, 700)) + [2**63 - 1]
        found = db.last_serials(oids)
        assert found == {oid: db.last_serial(oid) for oid in oids}
        assert found[20] == 20 and found[10] == 10 and found[3] == 30
        assert found[1] is None and found[699] is None
        assert db.last_serials([]) == {}

    def test_store_data_many_as_store_data(self, db):
        """``store_data_many`` finds or inserts like ``store_data`` (equal
        values share a row, within the burst too), and holds each id once
        per item: released, the rows no transaction took are pruned."""
        kept = db.store_data(h(b'old'), 0, b'old', 1)
        self.commit(db, 10, {1: b'old'})
        items = [(h(b'a'), 0, b'a', 2), (h(b'old'), 0, b'old', 3), (h(b'a'), 0, b'a', 4),
                 (h(b'b'), 1, b'b', 5), (h(b'b'), 0, b'b', 6)]
        ids = db.store_data_many(items)
        assert len(ids) == 5
        for (checksum, compression, data, _), data_id in zip(items, ids, strict=True):
            assert db.load_data(data_id) == (checksum, compression, data)
        assert db.store_data_many([]) == []
        if not db.deduplicates:
            assert len({kept, *ids}) == 6  # every item its own row
            db.release_data(ids, prune=True)
            assert [db.load_data(i) for i in ids] == [None] * 5
            assert db.load_data(kept) is not None
            return
        assert ids[1] == kept
        assert ids[0] == ids[2] and ids[3] != ids[4] and len({ids[0], ids[3], ids[4]}) == 3
        db.release_data(ids[:1], prune=True)      # still held by item 3
        assert db.load_data(ids[0]) is not None
        db.release_data([kept] + ids[2:], prune=True)
        assert db.load_data(ids[0]) is None and db.load_data(ids[3]) is None
        assert db.load_data(ids[4]) is None
        assert db.load_data(kept) is not None     # committed at tid 10

    def test_deletion_revision(self, db):
        self.commit(db, 10, {3: b'alive'})
        self.commit(db, 20, {3: None})
        assert db.get_object(3) == (20, None, 0, ZERO_HASH, b'', None)
        assert db.get_object(3, tid=10) == (10, 20, 0, h(b'alive'), b'alive', None)
        assert db.last_serial(3) == 20
        assert db.get_object_history(3, 0, 5) == [(20, 0), (10, 5)]

    def test_undo_back_pointer(self, db):
        self.commit(db, 10, {7: b'original'})
        self.commit(db, 20, {7: b'changed'})
        ids = self.commit(db, 30, {7: b''}, undo={7: 10})
        assert db.get_object(7) == (30, None, 0, h(b'original'), b'original', 10)
        assert db.get_object(7, tid=10) == (10, 20, 0, h(b'original'), b'original', None)
        first = db.get_object(7, tid=10)
        assert db.load_data(ids[7]) == (h(b'original'), 0, b'original')
        assert first[3] == db.get_object(7)[3]

    def test_revision_metadata(self, db):
        ids = self.commit(db, 10, {7: b'original'})
        self.commit(db, 20, {7: b'changed'})
        self.commit(db, 30, {7: b''}, undo={7: 10})
        self.commit(db, 40, {7: None})
        assert db.get_revision(7, tid=10) == (10, ids[7], None)
        assert db.get_revision(7, tid=30) == (30, ids[7], 10)
        assert db.get_revision(7, tid=40) == (40, None, None)
        assert db.get_revision(7, tid=25) is None
        assert db.get_revision(7, before_tid=30)[0] == 20
        assert db.get_revision(7, before_tid=31) == (30, ids[7], 10)
        assert db.get_revision(7, before_tid=10) is None
        assert db.get_revision(8, before_tid=100) is None
        with pytest.raises(ValueError):
            db.get_revision(7)

    def test_hold_data_keeps_a_row_reused_by_an_undo(self, db):
        ids = self.commit(db, 10, {7: b'original'})
        self.commit(db, 20, {7: b'changed'})
        # an undo record of ttid 36 reuses the data of revision 10 ...
        db.hold_data(ids[7])
        # ... while every revision referencing it goes (as a truncation does)
        db.truncate(5)
        assert db.load_data(ids[7]) == (h(b'original'), 0, b'original')
        db.store_transaction(36, [(7, ids[7], 10)], None)
        db.lock_transaction(36, 40)
        db.unlock_transaction(36, 40)
        assert db.get_object(7) == (40, None, 0, h(b'original'), b'original', 10)

    def test_oids_from(self, db):
        # partition 1 of NP=4: oids 1, 5, 9, 13, 17
        for tid, objects in ((10, {1: b'a', 5: b'b', 9: b'c'}), (20, {5: None, 13: b'd'}),
                             (30, {17: b'e', 5: b'f'})):
            self.commit(db, tid, objects)
        assert db.get_oids_from(1, 100, 0, 30) == ([1, 5, 9, 13, 17], None)
        assert db.get_oids_from(1, 100, 0, 29) == ([1, 9, 13], None)   # 5 deleted at 20
        assert db.get_oids_from(1, 100, 0, 19) == ([1, 5, 9], None)
        assert db.get_oids_from(1, 100, 0, 9) == ([], None)
        assert db.get_oids_from(1, 2, 0, 25) == ([1], 6)               # 5 examined
        assert db.get_oids_from(1, 2, 6, 25) == ([9, 13], 14)
        assert db.get_oids_from(1, 2, 14, 25) == ([], None)
        assert db.get_oids_from(2, 10, 0, 30) == ([], None)

    def test_data_dedup(self, db):
        a = db.store_data(h(b'x'), 0, b'x')
        b = db.store_data(h(b'x'), 0, b'x')
        c = db.store_data(h(b'x'), 1, b'x')
        d = db.store_data(h(b'y'), 0, b'y')
        assert (a == b) is db.deduplicates
        assert len({a, c, d}) == 3
        db.store_transaction(1, [(1, a, None), (2, b, None), (3, c, None), (4, d, None)], None)
        db.lock_transaction(1, 5)
        db.unlock_transaction(1, 5)
        assert db.get_object(1)[3:5] == db.get_object(2)[3:5] == (h(b'x'), b'x')
        assert db.get_object(3)[2] == 1
        with pytest.raises(ValueError):
            db.store_data(ZERO_HASH, 0, b'')

    def test_partitions_and_transaction_without_metadata(self, db):
        # A node holding partition(oid) but not partition(ttid) gets no txn.
        data_id = db.store_data(h(b'o'), 0, b'o')
        db.store_transaction(13, [(6, data_id, None)], None)
        assert db.get_locked_transactions() == {13: None}
        db.lock_transaction(13, 17)
        assert db.get_locked_transactions() == {13: None}  # no lock record here
        db.unlock_transaction(13, 17)
        assert db.get_object(6)[:2] == (17, None)
        assert db.get_transaction(17) is None
        assert db.last_ids() == (17, 6)
        assert db.last_ids([6 % NP]) == (17, 6)
        assert db.last_ids([0, 1, 3]) == (None, None)

    # -- abort and unfinished transactions -------------------------------------

    def test_abort_removes_temp_rows_and_orphan_data(self, db):
        ids = self.commit(db, 10, {1: b'shared'})
        shared = db.store_data(h(b'shared'), 0, b'shared')
        assert (shared == ids[1]) is db.deduplicates
        own = db.store_data(h(b'own'), 0, b'own')
        unvoted = db.store_data(h(b'unvoted'), 0, b'unvoted')
        db.store_transaction(20, [(1, shared, None), (2, own, None)],
                             ([1, 2], b'', b'', b'', False))
        assert db.get_locked_transactions() == {20: None}
        db.abort_transaction(20, [unvoted])
        assert db.get_locked_transactions() == {}
        assert db.get_final_tid(20) is None
        assert db.load_data(own) is None
        assert db.load_data(unvoted) is None
        assert db.load_data(ids[1]) == (h(b'shared'), 0, b'shared')
        if not db.deduplicates:
            assert db.load_data(shared) is None  # its own row, aborted with it
        assert db.get_object(1)[4] == b'shared'
        assert db.get_object(2) is None
        assert db.last_ids() == (10, 1)

    def test_abort_keeps_data_held_by_another_transaction(self, db):
        a = db.store_data(h(b'same'), 0, b'same')      # for ttid 30
        b = db.store_data(h(b'same'), 0, b'same')      # for ttid 40
        assert (a == b) is db.deduplicates
        db.abort_transaction(30, [a])
        assert db.load_data(b) is not None
        db.store_transaction(40, [(1, b, None)], None)
        db.lock_transaction(40, 44)
        db.unlock_transaction(40, 44)
        assert db.get_object(1)[4] == b'same'

    def test_release_data(self, db):
        a = db.store_data(h(b'first try'), 0, b'first try')
        db.release_data([a], prune=True)
        assert db.load_data(a) is None

    def test_drop_unfinished_keeps_locked(self, db):
        committed = self.commit(db, 10, {1: b'committed'})[1]
        d_locked = db.store_data(h(b'locked'), 0, b'locked')
        db.store_transaction(20, [(2, d_locked, None)], ([2], b'', b'', b'', False))
        db.lock_transaction(20, 24)
        d_voted = db.store_data(h(b'voted'), 0, b'voted')
        db.store_transaction(30, [(3, d_voted, None)], ([3], b'', b'', b'', False))
        d_other = db.store_data(h(b'other'), 0, b'other')
        db.store_transaction(40, [(4, d_other, None)], None)   # metadata elsewhere
        assert db.get_locked_transactions() == {20: 24, 30: None, 40: None}
        db.drop_unfinished()
        assert db.get_locked_transactions() == {20: 24}
        assert db.load_data(d_locked) is not None
        assert db.load_data(committed) is not None
        assert db.load_data(d_voted) is None
        assert db.load_data(d_other) is None
        db.unlock_transaction(20, 24)
        assert db.get_object(2)[:2] == (24, None)

    def test_drop_unfinished_removes_data_of_unvoted_after_reopen(self, opener, db):
        lost = db.store_data(h(b'never voted'), 0, b'never voted')
        kept = db.store_data(h(b'voted'), 0, b'voted')
        # This durable commit also makes the unvoted row durable.
        db.store_transaction(20, [(2, kept, None)], ([2], b'', b'', b'', False))
        db.lock_transaction(20, 24)
        db = self.reopen(db, opener)
        assert db.load_data(lost) is not None
        db.drop_unfinished()
        assert db.load_data(lost) is None
        assert db.load_data(kept) is not None
        assert db.get_locked_transactions() == {20: 24}

    def test_prune_orphans(self, opener, db):
        self.commit(db, 10, {1: b'used'})
        orphan = db.store_data(h(b'orphan'), 0, b'orphan')
        held = db.store_data(h(b'held'), 0, b'held')
        db.store_transaction(20, [], ([], b'', b'', b'', False))  # makes both durable
        db.release_data([orphan])
        assert db.prune_orphans() == 1
        assert db.load_data(orphan) is None
        assert db.load_data(held) is not None
        assert db.get_object(1)[4] == b'used'

    def test_locked_transaction_survives_reopen(self, opener, db):
        data_id = db.store_data(h(b'crash'), 0, b'crash')
        db.store_transaction(50, [(9, data_id, None)], ([9], b'u', b'd', b'', False))
        db.lock_transaction(50, 54)
        db = self.reopen(db, opener)               # crash after the commit point
        assert db.get_locked_transactions() == {50: 54}
        assert db.get_final_tid(50) == 54
        assert db.last_ids() == (54, 9)
        assert db.get_object(9) is None
        db.drop_unfinished()
        db.validate_transaction(50, 54)
        assert db.get_locked_transactions() == {}
        assert db.get_object(9) == (54, None, 0, h(b'crash'), b'crash', None)
        assert db.get_transaction(54) == ([9], b'u', b'd', b'', False, 50)
        db = self.reopen(db, opener)
        assert db.get_object(9)[:2] == (54, None)
        assert db.get_final_tid(50) == 54

    def test_validate_voted_transaction_without_lock(self, opener, db):
        # Verification found it committed on another node.
        data_id = db.store_data(h(b'v'), 0, b'v')
        db.store_transaction(60, [(2, data_id, None)], None)
        db = self.reopen(db, opener)
        assert db.get_locked_transactions() == {60: None}
        assert db.get_final_tid(60) is None
        db.validate_transaction(60, 64)
        assert db.get_object(2)[:2] == (64, None)
        assert db.get_locked_transactions() == {}

    # -- ids and metadata reads --------------------------------------------------

    def test_last_ids_per_partition(self, db):
        self.commit(db, 12, {1: b'a', 2: b'b'})     # tid 12 in partition 0
        self.commit(db, 21, {5: b'c'})              # tid 21 in partition 1
        data_id = db.store_data(h(b'd'), 0, b'd')
        db.store_transaction(30, [(11, data_id, None)], ([11], b'', b'', b'', False))
        assert db.last_ids() == (21, 11)                 # tobj oid counts, voted ttid not
        db.lock_transaction(30, 34)                      # partition 2
        assert db.last_ids() == (34, 11)
        assert db.last_ids([0]) == (12, None)
        assert db.last_ids([1]) == (21, 5)
        assert db.last_ids([2]) == (34, 2)
        assert db.last_ids([3]) == (None, 11)
        assert db.last_ids([0, 3]) == (12, 11)
        assert db.last_ids([]) == (None, None)
        assert db.first_tid() == 12

    def test_transactions_and_tids(self, db):
        tids = [100, 101, 102, 103, 104, 105, 106, 107, 108, 109]
        for i, tid in enumerate(tids):
            packed = i == 0
            rows = [(i, db.store_data(h(b'%d' % i), 0, b'%d' % i), None)]
            db.store_transaction(tid - 40, rows, ([i], b'user%d' % i, b'', b'ext', packed))
            db.lock_transaction(tid - 40, tid)
            db.unlock_transaction(tid - 40, tid)
        assert db.get_transaction(100) == ([0], b'user0', b'', b'ext', True, 60)
        assert db.get_transaction(105) == ([5], b'user5', b'', b'ext', False, 65)
        assert db.get_transaction(110) is None
        everything = range(NP)
        assert db.get_tids(0, 3, everything) == [109, 108, 107]
        assert db.get_tids(2, 3, everything) == [107, 106, 105]
        assert db.get_tids(0, 100, [1]) == [109, 105, 101]
        assert db.get_tids(8, 100, everything) == [101, 100]
        assert db.get_tids(0, 0, everything) == []
        assert db.get_tids_from(102, 106, 100, everything) == [102, 103, 104, 105, 106]
        assert db.get_tids_from(102, 106, 2, everything) == [102, 103]
        assert db.get_tids_from(0, 2**63 - 1, 3, [0, 2]) == [100, 102, 104]
        assert db.get_tids_from(110, 200, 10, everything) == []
        assert db.get_final_tid(65) == 105

    def test_multi_oid_transaction_metadata(self, db):
        oids = [1, 2**40 + 3, 2**63 - 1]
        self.commit(db, 72, {oid: b'x%d' % oid for oid in oids})
        assert db.get_transaction(72)[0] == oids
        for oid in oids:
            assert db.get_object(oid)[:2] == (72, None)
        assert db.last_ids() == (72, 2**63 - 1)

    # -- model-based check of revision reads -------------------------------------

    # -- replication and checks -----------------------------------------------------

    def test_replication_copies_a_partition(self, tmp_path, db):
        """fetch_* on a source and add_* on a destination give the same
        partition, back-pointers and deletions included; the resume point
        persists across a reopen."""
        src = db
        self.commit(src, 100, {1: b'one', 5: b'five'})
        self.commit(src, 104, {1: b'one bis', 9: None})
        self.commit(src, 108, {5: None}, undo={5: 100})
        self.commit(src, 101, {2: b'other partition'})
        assert src.fetch_tids(0, 10, 0, 200) == [100, 104, 108]
        assert src.fetch_tids(0, 2, 101, 200) == [104, 108]
        keys = src.fetch_object_keys(1, 100, 0, 200, 0)
        assert keys == [(100, 1), (100, 5), (104, 1), (104, 9), (108, 5)]
        assert src.fetch_object_keys(1, 2, 100, 200, 2) == [(100, 5), (104, 1)]
        assert src.fetch_object_keys(1, 100, 0, 104, 0)[-1] == (104, 9)
        assert src.fetch_object(9, 104) == (0, ZERO_HASH, b'', None)
        compression, checksum, data, data_serial = src.fetch_object(5, 108)
        assert (data, data_serial) == (b'five', 100)
        assert src.fetch_object(5, 999) is None

        (tmp_path / 'second').mkdir()
        dst = self.make_backend(tmp_path / 'second')  # another database
        dst.open(reset=True)
        try:
            dst.set_num_partitions(NP)
            for tid in src.fetch_tids(1, 10, 0, 200):
                oids, user, desc, ext, packed, ttid = src.get_transaction(tid)
                dst.add_transaction(tid, oids, user, desc, ext, packed, ttid)
            for tid, oid in keys:
                dst.add_object(oid, tid, *src.fetch_object(oid, tid))
            dst.set_replication(1, (109, 109, 0))
            assert dst.get_replication(1) == (109, 109, 0)
            assert dst.get_replication(2) is None
            for oid in (1, 5, 9):
                for tid in (100, 104, 108):
                    assert dst.get_object(oid, tid=tid) == src.get_object(oid, tid=tid)
            assert dst.check_tid_range(1, 100, 0, 200) == src.check_tid_range(1, 100, 0, 200)
            assert dst.check_serial_range(1, 100, 0, 200, 0) == \
                src.check_serial_range(1, 100, 0, 200, 0)
            dst.set_replication(1, None)
            assert dst.get_replication(1) is None
        finally:
            dst.close()

    def test_replication_in_chunks_matches_one_by_one(self, tmp_path, db):
        """fetch_objects / add_transactions / add_objects (a chunk at once)
        give what fetch_object / add_transaction / add_object give one
        record at a time: data shared, deletions and back-pointers kept."""
        src = db
        self.commit(src, 100, {1: b'one', 5: b'five', 9: b'same'})
        self.commit(src, 104, {1: b'one bis', 9: None, 13: b'same'})
        self.commit(src, 108, {5: None}, undo={5: 100})
        keys = src.fetch_object_keys(1, 100, 0, 200, 0)
        assert list(src.fetch_objects(1, keys)) == [
            (oid, tid, *src.fetch_object(oid, tid)) for tid, oid in keys]
        # a sparse selection, and keys that do not exist, are fine too
        some = [keys[1], (106, 5), keys[-1]]
        assert [r[:2] for r in src.fetch_objects(1, some)] == [(5, 100), (5, 108)]
        assert list(src.fetch_objects(1, [])) == []
        copies = []
        for name, batched in (('one', False), ('many', True)):
            (tmp_path / name).mkdir()
            dst = self.make_backend(tmp_path / name)
            dst.open(reset=True)
            dst.set_num_partitions(NP)
            copies.append(dst)
            txns = [(tid, *src.get_transaction(tid)) for tid in src.fetch_tids(1, 10, 0, 200)]
            records = list(src.fetch_objects(1, keys))
            if batched:
                dst.add_transactions(txns)
                dst.add_objects(1, records[:2])
                dst.add_objects(1, records[2:])
            else:
                for tid, oids, user, desc, ext, packed, ttid in txns:
                    dst.add_transaction(tid, oids, user, desc, ext, packed, ttid)
                for record in records:
                    dst.add_object(*record)
            dst.set_replication(1, (109, 109, 0), durable=False)
        try:
            one, many = copies
            for oid in (1, 5, 9, 13):
                for tid in (100, 104, 108):
                    assert many.get_object(oid, tid=tid) == one.get_object(oid, tid=tid) \
                        == src.get_object(oid, tid=tid)
            assert many.check_serial_range(1, 100, 0, 200, 0) == \
                src.check_serial_range(1, 100, 0, 200, 0)
            assert many.check_tid_range(1, 100, 0, 200) == src.check_tid_range(1, 100, 0, 200)
            # b'same' (oids 9 and 13) and the undo of 5 share their data row
            assert many.get_object(9, tid=100)[2:5] == many.get_object(13)[2:5]
            assert many.get_replication(1) == (109, 109, 0)
            assert many.prune_orphans() == 0
        finally:
            for dst in copies:
                dst.close()

    def test_add_objects_replaces_and_deduplicates(self, db):
        self.commit(db, 100, {1: b'old', 5: b'kept'})
        # a replicated chunk over existing rows: other data for oid 1 (its
        # old data row goes), the same for 5, twice the same new data
        db.add_objects(1, [(1, 100, 0, h(b'new'), b'new', None),
                           (5, 100, 0, h(b'kept'), b'kept', None),
                           (9, 104, 0, h(b'new'), b'new', None),
                           (13, 104, 0, ZERO_HASH, b'', None)])
        assert db.get_object(1)[4] == b'new' and db.get_object(5)[4] == b'kept'
        assert db.get_object(9)[4] == b"new" and db.get_object(13)[3:5] == (ZERO_HASH, b"")
        assert db.prune_orphans() == 0  # b'old' was deleted with its last reference
        assert db.fetch_object(13, 104) == (0, ZERO_HASH, b'', None)
        with pytest.raises(ValueError):
            db.add_objects(1, [(2, 100, 0, h(b'x'), b'x', None)])  # partition 2

    def test_replication_deletes_and_resume_point(self, opener, db):
        self.commit(db, 100, {1: b'one', 5: b'five'})
        self.commit(db, 104, {1: b'one bis'})
        assert db.last_tid_of(0) == 104 and db.last_tid_of(2) is None
        db.delete_transactions(0, [104])
        db.delete_objects(1, [(104, 1)])
        assert db.get_transaction(104) is None
        assert db.get_object(1)[0] == 100
        db.set_replication(1, (105, 100, 6))
        db = self.reopen(db, opener)
        assert db.get_replication(1) == (105, 100, 6)
        assert db.get_object(1)[0] == 100
        # re-adding a revision replaces it, data deduplicated
        db.add_object(1, 100, 0, h(b'one'), b'one', None)
        db.add_object(7, 120, 0, h(b'seven'), b'seven', None)
        assert db.get_object(7)[4] == b'seven'
        assert db.prune_orphans() == 0

    def test_drop_partition_in_chunks(self, db):
        for i in range(5):
            self.commit(db, 100 + 4 * i, {1 + 4 * i: b'x%d' % i, 2: b'y%d' % i})
        assert db.drop_partition(1, 3) is True
        while db.drop_partition(1, 3):
            pass
        assert db.fetch_object_keys(1, 100, 0, 1000, 0) == []
        assert len(db.fetch_tids(0, 100, 0, 1000)) == 5   # other partitions untouched
        assert db.get_object(2) is not None
        while db.drop_partition(0, 2):
            pass
        assert db.fetch_tids(0, 100, 0, 1000) == []
        assert db.prune_orphans() == 0

    def test_truncate_tid_round_trip(self, opener, db):
        assert db.get_truncate_tid() is None
        db.set_truncate_tid(2**63 - 1)
        db = self.reopen(db, opener)
        assert db.get_truncate_tid() == 2**63 - 1
        db.set_truncate_tid(None)
        assert db.get_truncate_tid() is None

    def test_truncate(self, opener, db):
        """Everything after the truncation tid goes, in every partition,
        with the data only it used; what is at or before it stays."""
        shared = self.commit(db, 100, {1: b'one', 2: b'shared'})[2]       # partition 0
        self.commit(db, 105, {1: b'one bis', 6: b'six'})                  # partition 1
        gone = self.commit(db, 112, {1: b'one ter', 3: b'shared', 7: b'gone'})  # partition 0
        self.commit(db, 113, {2: None, 6: None}, undo={6: 105})           # partition 1
        self.commit(db, 118, {5: b'five'})                                # partition 2
        assert (gone[3] == shared) is db.deduplicates
        # locked, not unlocked: at the truncation tid or below (kept), after
        # it (dropped); voted only, with metadata here or elsewhere (dropped)
        kept_locked = db.store_data(h(b'locked before'), 0, b'locked before')
        db.store_transaction(91, [(9, kept_locked, None)], ([9], b'', b'', b'', False))
        db.lock_transaction(91, 107)
        late_locked = db.store_data(h(b'locked after'), 0, b'locked after')
        db.store_transaction(95, [(10, late_locked, None)], ([10], b'', b'', b'', False))
        db.lock_transaction(95, 119)
        voted = db.store_data(h(b'voted'), 0, b'voted')
        db.store_transaction(120, [(11, voted, None)], ([11], b'', b'', b'', False))
        elsewhere = db.store_data(h(b'elsewhere'), 0, b'elsewhere')
        db.store_transaction(121, [(12, elsewhere, None)], None)
        db.set_replication(1, (130, 125, 3))
        db.set_replication(2, (50, 40, 7))
        db.set_replication(3, (111, 111, 0))
        db.set_truncate_tid(110)
        db = self.reopen(db, opener)                   # pending across a restart
        assert db.get_truncate_tid() == 110
        db.truncate(110)
        assert db.get_truncate_tid() is None
        for tid in (112, 113, 118):
            assert db.get_transaction(tid) is None
        assert db.get_transaction(105)[0] == [1, 6]
        assert db.get_object(1)[:2] == (105, None)
        assert db.get_object(1, tid=100)[:2] == (100, 105)
        assert db.get_object(2)[:2] == (100, None)      # its deletion is gone
        assert db.get_object(6)[:5] == (105, None, 0, h(b'six'), b'six')
        for oid in (3, 5, 7, 10, 11, 12):
            assert db.get_object(oid) is None
        assert db.load_data(shared) is not None         # still used by oid 2 at 100
        for data_id in (gone[7], late_locked, voted, elsewhere):
            assert db.load_data(data_id) is None
        assert db.load_data(kept_locked) is not None
        assert db.get_locked_transactions() == {91: 107}
        assert db.last_ids() == (107, 9)
        assert db.get_replication(1) == (111, 111, 0)
        assert db.get_replication(2) == (50, 40, 7)
        assert db.get_replication(3) == (111, 111, 0)
        assert db.prune_orphans() == 0
        db = self.reopen(db, opener)                    # durable
        assert db.get_truncate_tid() is None
        assert db.get_object(1)[:2] == (105, None)
        assert db.get_transaction(112) is None
        db.unlock_transaction(91, 107)
        assert db.last_ids() == (107, 9)
        # committing goes on after the truncation tid
        self.commit(db, 116, {1: b'new'})
        assert db.get_object(1)[:2] == (116, None)
        assert db.get_object(1, tid=105)[:2] == (105, 116)

    def test_truncate_nothing_after(self, db):
        self.commit(db, 100, {1: b'one'})
        db.set_truncate_tid(100)
        db.truncate(100)
        assert db.get_object(1)[:2] == (100, None)
        assert db.get_truncate_tid() is None

    # -- pack --------------------------------------------------------------------

    def test_pack_order_follows_its_transaction(self, opener, db):
        db.store_transaction(100, [], ([], b'', b'IStorage.pack', b'', False),
                             pack=(False, [3, 7], 90, True))
        db.store_transaction(101, [], ([], b'', b'pack', b'', False), pack=(True, None, 80, False))
        assert db.get_pack_orders() == []            # voted: not committed
        db.lock_transaction(100, 104, pack_approved=True)
        db.drop_unfinished()                          # 101 was not locked: its order goes
        db = self.reopen(db, opener)
        assert db.get_pack_orders() == []
        db.unlock_transaction(100, 104)
        assert db.get_pack_orders() == [(104, True, False, [3, 7], 90, True)]
        db.store_transaction(200, [], ([], b'', b'pack', b'', False), pack=(False, None, 150, False))
        db.abort_transaction(200)
        self.commit(db, 208, {}, ttid=204)
        assert db.get_pack_orders(105) == []
        db.add_pack_order((212, None, True, [1], 100, False))
        db.add_pack_order((216, None, False, None, 110, False))
        db.sign_pack_orders([212], True)
        assert db.get_pack_orders(105) == [(212, True, True, [1], 100, False),
                                           (216, None, False, None, 110, False)]
        assert [o[0] for o in db.get_pack_orders(max_oids=1)] == [104]
        assert [o[0] for o in db.get_pack_orders(max_oids=2)] == [104, 212]
        assert [o[0] for o in db.get_pack_orders(105, max_oids=0)] == [212]
        db.delete_transactions(0, [216])
        assert [o[0] for o in db.get_pack_orders()] == [104, 212]
        db.set_truncate_tid(200)
        db.truncate(200)
        assert [o[0] for o in db.get_pack_orders()] == [104]

    def test_pack_order_among_commits(self, db):
        # orders voted between ordinary commits, before and after the first
        # unlock, each committed with its own transaction and no other
        self.commit(db, 100, {1: b'one'})
        db.store_transaction(104, [], ([], b'', b'pack', b'', False), pack=(False, None, 100, True))
        self.commit(db, 120, {1: b'two'})
        db.lock_transaction(104, 124, pack_approved=True)
        db.unlock_transaction(104, 124)
        assert db.get_pack_orders() == [(124, True, False, None, 100, True)]
        db.store_transaction(130, [], ([], b'', b'pack', b'', False), pack=(True, [1], 120, False))
        self.commit(db, 140, {1: b'three'})
        db.lock_transaction(130, 144)
        db.unlock_transaction(130, 144)
        assert [o[0] for o in db.get_pack_orders()] == [124, 144]

    def test_pack_progress_round_trip(self, opener, db):
        assert db.get_pack_progress(1) is None
        db.set_pack_progress(1, (0, 120, 9))
        db.commit_pending()
        db = self.reopen(db, opener)
        assert db.get_pack_progress(1) == (0, 120, 9)
        db.set_pack_progress(1, (120, None, 0))
        assert db.get_pack_progress(1) == (120, None, 0)
        db.set_pack_progress(1, None)
        assert db.get_pack_progress(1) is None

    def pack_all(self, db, partition, steps, length=1000, min_oid=0):
        while True:
            next_oid, _, _ = db.pack_partition(partition, steps, min_oid, length, (0, 1, 0))
            if next_oid is None:
                return
            min_oid = next_oid

    def test_pack_history(self, db):
        for tid in (100, 104, 108):
            self.commit(db, tid, {1: b'a%d' % tid, 5: b'b%d' % tid})
        self.commit(db, 112, {1: b'a112', 5: None})
        self.commit(db, 116, {9: b'nine'})
        self.pack_all(db, 1, [(112, False, None, False)])
        # oid 1: the revision current at 112 stays; oid 5 ends deleted: gone
        assert [s for s, _ in db.get_object_history(1, 0, 10)] == [112]
        assert db.get_object_history(5, 0, 10) is None
        assert db.get_object(9)[0] == 116
        assert db.get_object(1, before_tid=112) is False
        assert db.prune_orphans() == 0
        # packing again changes nothing
        self.pack_all(db, 1, [(116, False, None, False)])
        assert [s for s, _ in db.get_object_history(1, 0, 10)] == [112]

    def test_pack_keeps_later_revisions_and_shared_data(self, db):
        self.commit(db, 100, {1: b'original'})
        self.commit(db, 104, {1: b'changed'})
        self.commit(db, 108, {1: b''}, undo={1: 100})   # back-pointer to 100's data
        self.commit(db, 112, {1: b'last'})
        self.pack_all(db, 1, [(110, False, None, False)])
        assert [s for s, _ in db.get_object_history(1, 0, 10)] == [112, 108]
        assert db.get_object(1, tid=108)[4] == b'original'  # its data outlived revision 100
        assert db.prune_orphans() == 0

    def test_pack_gc_and_partial(self, db):
        for tid in (100, 104):
            self.commit(db, tid, {1: b'x%d' % tid, 5: b'y%d' % tid, 9: b'z%d' % tid})
        self.commit(db, 108, {9: b'z108'})
        # GC of 5 and 9 at 104: 5 is gone, 9 keeps its revision after 104
        self.pack_all(db, 1, [(104, False, frozenset([5, 9]), True)])
        assert db.get_object(5) is None
        assert [s for s, _ in db.get_object_history(9, 0, 10)] == [108]
        assert [s for s, _ in db.get_object_history(1, 0, 10)] == [104]
        # partial: only the listed oids
        self.commit(db, 112, {1: b'x112', 13: b'w'})
        self.commit(db, 116, {13: b'w116'})
        self.pack_all(db, 1, [(116, True, frozenset([13]), False)])
        assert [s for s, _ in db.get_object_history(1, 0, 10)] == [112, 104]
        assert [s for s, _ in db.get_object_history(13, 0, 10)] == [116]

    def test_pack_in_chunks_resumes(self, db):
        for tid in (100, 104, 108):
            self.commit(db, tid, {oid: b'%d-%d' % (oid, tid) for oid in range(1, 80, 4)})
        steps = [(108, False, None, False)]
        next_oid, visited, deleted = db.pack_partition(1, steps, 0, 7, (5, 108, 0))
        assert (visited, deleted) == (2, 4) and next_oid == 6
        assert db.get_pack_progress(1) == (5, 108, 6)
        # one object with more revisions than a chunk
        next_oid, visited, deleted = db.pack_partition(1, steps, 6, 2, (5, 108, 6))
        assert (next_oid, visited, deleted) == (10, 1, 2)
        self.pack_all(db, 1, steps, length=5, min_oid=next_oid)
        for oid in range(1, 80, 4):
            assert [s for s, _ in db.get_object_history(oid, 0, 10)] == [108]

    def test_check_ranges_detect_differences(self, db):
        self.commit(db, 100, {1: b'one'})
        self.commit(db, 104, {1: b'two', 5: b'five'})
        count, digest, last = db.check_tid_range(0, 100, 0, 1000)
        assert (count, last) == (2, 104) and digest != ZERO_HASH
        assert db.check_tid_range(0, 1, 0, 1000)[0::2] == (1, 100)
        assert db.check_tid_range(3, 100, 0, 1000) == (0, ZERO_HASH, 0)
        count, tid_digest, last_tid, oid_digest, last_oid = db.check_serial_range(1, 100, 0, 1000, 0)
        assert (count, last_tid, last_oid) == (3, 104, 5)
        assert db.check_serial_range(1, 100, 104, 1000, 2)[0::2] == (1, 104, 5)
        before = db.check_serial_range(1, 100, 0, 1000, 0)
        db.add_object(5, 104, 0, h(b'FIVE'), b'FIVE', None)  # same key, other data
        after = db.check_serial_range(1, 100, 0, 1000, 0)
        assert after[:3] == before[:3] and after[3] != before[3]


    @settings(max_examples=25, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.differing_executors])
    @given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from([b'a', b'b', None])),
                    min_size=1, max_size=12),
           st.integers(0, 110))
    def test_reads_match_model(self, opener, history, probe):
        db = opener(reset=True)
        db.set_num_partitions(NP)
        model: dict[int, list[tuple[int, bytes | None]]] = {}
        for i, (oid, data) in enumerate(history):
            tid = 8 * (i + 1)
            self.commit(db, tid, {oid: data})
            model.setdefault(oid, []).append((tid, data))
        for oid in range(5):
            revs = model.get(oid)
            if revs is None:
                assert db.get_object(oid) is None
                assert db.get_object(oid, before_tid=probe) is None
                continue
            older = [r for r in revs if r[0] < probe]
            result = db.get_object(oid, before_tid=probe)
            if not older:
                assert result is False
            else:
                serial, data = older[-1]
                later = [r[0] for r in revs if r[0] > serial]
                assert result[:2] == (serial, later[0] if later else None)
                assert result[4] == (data or b'')
                assert result[3] == (ZERO_HASH if data is None else h(data))
            exact = [r for r in revs if r[0] == probe]
            assert (db.get_object(oid, tid=probe) is not False) == bool(exact)
            assert db.get_object(oid)[0] == revs[-1][0]
            assert db.last_serial(oid) == revs[-1][0]
        db.close()

    # -- blob contents (base_blobs.py); backends that keep none skip -------------

    @staticmethod
    def blob_record(content: bytes, record: bytes = b'record', compression: int = 0
                    ) -> tuple[bytes, int, bytes]:
        """(checksum, compression, stored bytes) of a blob revision."""
        from neozodb.protocol.blobs import add_tail
        compression, stored = add_tail(compression, record, hashlib.sha256(content).digest(),
                                       len(content))
        return h(stored), compression, stored

    def test_blob_upload_attach_load_and_delete(self, db):
        if not db.blobs:
            pytest.skip('%s keeps no blobs' % db.name)
        first, second = db.new_blob(), db.new_blob()
        assert first != second
        for n, chunk in enumerate((b'a' * 10, b'b' * 3)):
            db.store_blob_chunk(first, n, chunk)
        checksum, compression, stored = self.blob_record(b'a' * 10 + b'b' * 3)
        data_id = db.store_data(checksum, compression, stored)
        assert db.blob_missing(checksum) == data_id
        assert not db.has_blob(data_id)
        assert db.attach_blob(data_id, first)
        assert db.has_blob(data_id) and db.blob_missing(checksum) is None
        assert [db.load_blob_chunk(checksum, n) for n in range(3)] == [b'a' * 10, b'b' * 3,
                                                                       None]
        # the same content uploaded again: the row keeps its own
        db.store_blob_chunk(second, 0, b'other')
        assert not db.attach_blob(data_id, second)
        assert db.load_blob_chunk(checksum, 0) == b'a' * 10
        self.commit_rows(db, 10, [(1, data_id)])
        assert db.get_object(1)[2:5] == (compression, checksum, stored)
        # a truncation deletes the revision, its data row and content
        db.truncate(5)
        assert db.load_data(data_id) is None
        assert db.load_blob_chunk(checksum, 0) is None

    def commit_rows(self, db, tid: int, rows) -> None:
        ttid = tid - NP
        db.store_transaction(ttid, [(oid, data_id, None) for oid, data_id in rows],
                             ([oid for oid, _ in rows], b'', b'', b'', False))
        db.lock_transaction(ttid, tid)
        db.unlock_transaction(ttid, tid)

    def test_blob_content_goes_with_its_data_row(self, db):
        if not db.blobs:
            pytest.skip('%s keeps no blobs' % db.name)
        blob_id = db.new_blob()
        db.store_blob_chunk(blob_id, 0, b'gone soon')
        checksum, compression, stored = self.blob_record(b'gone soon')
        data_id = db.store_data(checksum, compression, stored)
        db.attach_blob(data_id, blob_id)
        db.release_data([data_id], prune=True)  # never voted: the row goes
        assert db.load_data(data_id) is None
        assert db.load_blob_chunk(checksum, 0) is None
        # a new row with that checksum has no content
        data_id = db.store_data(checksum, compression, stored)
        assert not db.has_blob(data_id)

    def test_unattached_uploads_are_dropped_at_start(self, opener, db):
        if not db.blobs:
            pytest.skip('%s keeps no blobs' % db.name)
        kept, lost, dropped = db.new_blob(), db.new_blob(), db.new_blob()
        for blob_id in (kept, lost, dropped):
            db.store_blob_chunk(blob_id, 0, b'content %d' % blob_id)
        checksum, compression, stored = self.blob_record(b'content %d' % kept)
        data_id = db.store_data(checksum, compression, stored)
        db.attach_blob(data_id, kept)
        db.drop_blob(dropped)
        self.commit_rows(db, 10, [(1, data_id)])  # durable, the upload "lost" too
        db = self.reopen(db, opener)
        assert db.drop_unattached_blobs() == 1
        assert db.load_blob_chunk(checksum, 0) == b'content %d' % kept
        assert db.new_blob() not in (kept,)

    def test_blob_digest_is_the_same_on_every_backend(self, db):
        """``blob_range_digest`` is computed the same way by every backend
        (replicas on different backends compare equal in ``neoctl check``):
        SHA-1 over each blob revision of the range, in (tid, oid) order,
        of ``b'TID OID '``, its checksum and its content's SHA-256 hashed
        anew (``b'missing'`` without content); other records count not."""
        contents = {1: b'x' * 10 + b'y', 5: b'five'}    # oids 1 and 5: partition 1
        chunks = {1: [b'x' * 10, b'y'], 5: [b'five']}
        rows, checksums = [], {}
        for oid, content in contents.items():
            blob_id = db.new_blob()
            for n, chunk in enumerate(chunks[oid]):
                db.store_blob_chunk(blob_id, n, chunk)
            checksum, compression, stored = self.blob_record(content, b'record %d' % oid)
            data_id = db.store_data(checksum, compression, stored, oid)
            db.attach_blob(data_id, blob_id)
            rows.append((oid, data_id))
            checksums[oid] = checksum
        # a blob revision whose content is not here, and a plain record
        checksum, compression, stored = self.blob_record(b'elsewhere', b'record 9')
        rows.append((9, db.store_data(checksum, compression, stored, 9)))
        checksums[9] = checksum
        rows.append((13, db.store_data(h(b'plain'), 0, b'plain', 13)))
        self.commit_rows(db, 21, rows)                  # tid 21
        expected = hashlib.sha1()
        for oid in (1, 5, 9):
            content = (hashlib.sha256(contents[oid]).digest() if oid in contents
                       else b'missing')
            expected.update(b'%d %d ' % (21, oid) + checksums[oid] + content)
        assert db.blob_range_digest(1, (0, 0), (100, 100)) == expected.digest()
        assert db.blob_range_digest(1, (21, 2), (21, 5)) == hashlib.sha1(
            b'21 5 ' + checksums[5] + hashlib.sha256(b'five').digest()).digest()
        assert db.blob_range_digest(1, (22, 0), (100, 100)) is None
        assert db.blob_range_digest(2, (0, 0), (100, 100)) is None

    def test_blobs_lacking_their_content_in_a_range(self, db):
        """``blobs_lacking``: the data rows of a partition's blob revisions
        within a (tid, oid) range (end excluded, None: none) that have no
        content; plain records and rows with their content are not."""
        if not db.blobs:
            pytest.skip('%s keeps no blobs' % db.name)

        def blob_row(oid: int, content: bytes, attached: bool) -> int:
            checksum, compression, stored = self.blob_record(content, b'record %d' % oid)
            data_id = db.store_data(checksum, compression, stored, oid)
            if attached:
                blob_id = db.new_blob()
                db.store_blob_chunk(blob_id, 0, content)
                db.attach_blob(data_id, blob_id)
            return data_id
        has = blob_row(1, b'here', True)
        lacks = blob_row(5, b'elsewhere', False)
        plain = db.store_data(h(b'plain'), 0, b'plain', 9)
        self.commit_rows(db, 21, [(1, has), (5, lacks), (9, plain)])   # partition 1
        later = blob_row(13, b'later', False)
        other = blob_row(2, b'other partition', False)
        self.commit_rows(db, 31, [(13, later), (2, other)])
        assert db.blobs_lacking(1, (0, 0), None) == sorted([lacks, later])
        assert db.blobs_lacking(1, (0, 0), (31, 0)) == [lacks]
        assert db.blobs_lacking(1, (21, 6), (31, 13)) == []
        assert db.blobs_lacking(1, (21, 5), (31, 14)) == sorted([lacks, later])
        assert db.blobs_lacking(2, (0, 0), None) == [other]
        blob_id = db.new_blob()
        db.store_blob_chunk(blob_id, 0, b'elsewhere')
        assert db.attach_blob(lacks, blob_id)
        assert db.blobs_lacking(1, (0, 0), None) == [later]

    def test_pack_takes_an_unreachable_content(self, db):
        if not db.blobs:
            pytest.skip('%s keeps no blobs' % db.name)
        blob_id = db.new_blob()
        db.store_blob_chunk(blob_id, 0, b'old')
        checksum, compression, stored = self.blob_record(b'old')
        data_id = db.store_data(checksum, compression, stored, 1)
        db.attach_blob(data_id, blob_id)
        self.commit_rows(db, 10, [(1, data_id)])
        self.commit(db, 14, {1: None})                  # deleted
        db.pack_partition(1, [(14, False, None, False)], 0, 100, (0, 14, 0))
        assert db.load_data(data_id) is None
        assert db.load_blob_chunk(checksum, 0) is None
        assert db.drop_unattached_blobs() == 0          # no chunk left behind
