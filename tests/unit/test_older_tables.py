"""The pure cores of ``neoctl print pt_history`` / ``recover_pt``: which
older partition tables the present storages can serve again and up to
which TID (master/older_tables.py), and each storage's history of its
readable partitions (storage/pt_history.py)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from neozodb.master.older_tables import History, check_history, older_table, older_tables
from neozodb.protocol import CellStates
from neozodb.storage import pt_history
from neozodb.storage.pt_history import Entry, clamped, decode, encode, updated

pytestmark = pytest.mark.timeout(60)

U, OUT = CellStates.UP_TO_DATE, CellStates.OUT_OF_DATE
ALL = frozenset(range(6))


def h(ptid, *entries):
    return History(ptid, tuple((p, end, frozenset(r)) for p, end, r in entries))


# The story of tests/cluster/test_older_pt.py, 6 partitions over S1 S2 S3
# with replicas 1: partitions 0 1 on S1 S2, 2 3 on S1 S3, 4 5 on S2 S3.
# Table 1: all readable.  S1 dies (table 2: its cells OUT_OF_DATE, it does
# not know), commits go on up to 300 on S2 and S3; S3 is lost for good
# (table 3).  S1 (complete up to 100) comes back, with S2.
S1 = h(1, (1, 100, {0, 1, 2, 3}))
S2 = h(3, (1, 300, {0, 1, 4, 5}))  # its readable partitions never changed


def test_lost_storage_older_table_serves():
    histories = {1: S1, 2: S2}
    tables = older_tables(6, histories)
    assert [t.ptid for t in tables] == [1]
    (t,) = tables
    assert t.operational and t.bound == 100 and t.storages == (1, 2) and t.unreadable == ()
    # partitions 2 3 only on S1: the bound; every copy is complete up to it
    assert t.rows == (((1, U), (2, U)),) * 2 + (((1, U),),) * 2 + (((2, U),),) * 2
    # table 3 (the latest) needs S3 for partitions 2 3: S1 never had it
    latest = older_table(6, histories, 3)
    assert not latest.operational and latest.unreadable == (2, 3) and latest.storages == (2,)
    assert latest.bound is None and latest.rows == ()


def test_copies_behind_the_bound_are_out_of_date():
    # S2 went down first (complete up to 50), then S1 (up to 100): S2's
    # copies of 0 1 miss 51..100
    histories = {1: h(2, (1, 100, {0, 1, 2, 3, 4, 5})), 2: h(1, (1, 50, {0, 1}))}
    t = older_table(6, histories, 1)
    assert t.operational and t.bound == 100
    assert t.rows[0] == ((1, U), (2, OUT))
    assert t.rows[5] == ((1, U),)


def test_bound_is_the_weakest_partition():
    histories = {1: h(1, (1, 80, {0, 1, 2})), 2: h(1, (1, 90, {3, 4, 5, 0}))}
    t = older_table(6, histories, 1)
    assert t.bound == 80 and t.rows[0] == ((1, U), (2, U))


def test_a_run_of_entries_keeps_a_copy_complete_longer():
    # S1 readable in 0 1 from table 1; partition 2 added at table 4 (a
    # replication done), then 0 left at table 6: 0 is complete up to the end
    # of table 4's entry, 1 up to now
    s1 = h(7, (1, 10, {0, 1}), (4, 20, {0, 1, 2}), (6, 30, {1, 2}))
    s2 = h(7, (1, 25, {2, 3, 4, 5}))
    t = older_table(6, {1: s1, 2: s2}, 1)
    assert t.operational and t.bound == 20  # partition 0: 20; 2 3 4 5: 25; 1: 30
    assert t.rows[0] == ((1, U),) and t.rows[2] == ((2, U),)
    t6 = older_table(6, {1: s1, 2: s2}, 6)
    assert not t6.operational and t6.unreadable == (0,)
    t4 = older_table(6, {1: s1, 2: s2}, 5)  # covered by table 4's entry
    assert t4.operational and t4.bound == 20


def test_storage_down_since_does_not_cover_later_tables():
    histories = {1: h(2, (1, 10, ALL)), 2: h(5, (1, 50, ALL), (3, 60, {0}))}
    assert older_table(6, histories, 2).storages == (1, 2)
    assert older_table(6, histories, 3).storages == (2,)  # S1's table is 2
    assert not older_table(6, histories, 3).operational
    assert older_table(6, histories, 6).storages == ()   # nobody had 6


def test_packs_on_the_holders_are_reported():
    histories = {1: History(1, ((1, 100, ALL),), packed=150),
                 2: History(1, ((1, 90, frozenset({0})),), packed=200),
                 3: History(1, (), packed=300)}  # holds nothing: not counted
    t = older_table(6, histories, 1)
    assert t.bound == 100 and t.packed == 200


def test_no_commits_means_complete_up_to_nothing():
    t = older_table(6, {1: h(1, (1, None, ALL))}, 1)
    assert t.operational and t.bound == 0 and t.rows[0] == ((1, U),)


def test_check_history():
    assert check_history(6, 3, [(1, None, [0, 1]), (3, None, [2])]) is None
    assert check_history(6, None, []) is None
    assert "out of order" in check_history(6, 3, [(2, None, []), (2, None, [])])
    assert "after the current" in check_history(6, 3, [(4, None, [])])
    assert "out of order" in check_history(6, None, [(1, None, [])])
    assert "invalid partitions" in check_history(6, 3, [(1, None, [6])])
    assert "invalid partitions" in check_history(6, 3, [(1, None, [1, 1])])
    assert "invalid partitions" in check_history(6, 3, [(1, None, [-1])])
    assert "invalid ptid" in check_history(6, -1, [])
    assert "entries" in check_history(6, 1000, [(i, None, []) for i in range(1, 100)])


@given(st.lists(st.tuples(st.integers(1, 10), st.integers(0, 50), st.frozensets(
    st.integers(0, 5))), max_size=3), st.integers(1, 12))
def test_operational_tables_have_a_complete_copy_everywhere(raw, ptid):
    """Invariants: an operational table has, in every partition, an
    UP_TO_DATE cell on a storage that held it; only holders have cells."""
    histories = {}
    for nid, (current, end, readable) in enumerate(raw, 1):
        histories[nid] = h(current, (1, end, readable))
    t = older_table(6, histories, ptid)
    if t.operational:
        for p, row in enumerate(t.rows):
            assert any(state is U for _, state in row)
            for nid, _ in row:
                assert p in histories[nid].entries[0][2] and ptid <= histories[nid].ptid
    else:
        assert t.unreadable and t.bound is None


# -- the storage's side --------------------------------------------------------------
def test_encode_decode():
    entries = [Entry(1, 0x40d4e2d3a7c41b8, frozenset({0, 3, 99})), Entry(7, None, frozenset())]
    text = encode(entries)
    assert decode(text, 100) == entries
    assert decode("", 100) == []
    for bad in ("1,2", "x,,1", "1,,1;1,,1", "1,,%x" % (1 << 100)):
        with pytest.raises(ValueError):
            decode(bad, 100)


def test_updated_appends_when_readable_changes():
    ends = {frozenset({0, 1}): 42}
    e = updated([], 1, frozenset({0, 1}), frozenset({0, 1, 2}), ends.get)
    assert e == [Entry(1, None, frozenset({0, 1}))]
    # same readable partitions at table 2: nothing new
    assert updated(e, 2, frozenset({0, 1}), frozenset({0, 1, 2}), ends.get) == e
    e = updated(e, 3, frozenset({0, 1, 2}), frozenset({0, 1, 2}), ends.get)
    assert e == [Entry(1, 42, frozenset({0, 1})), Entry(3, None, frozenset({0, 1, 2}))]
    # partition 0 dropped (no cell any more), 1 CORRUPTED: gone from every
    # entry; the last one now lists what is readable: it goes on
    e = updated(e, 4, frozenset({2}), frozenset({2}), lambda r: 50)
    assert e == [Entry(1, 42, frozenset()), Entry(3, None, frozenset({2}))]
    e = updated(e, 5, frozenset({1, 2}), frozenset({1, 2}), lambda r: 50)
    assert e == [Entry(1, 42, frozenset()), Entry(3, 50, frozenset({2})),
                 Entry(5, None, frozenset({1, 2}))]
    assert clamped(e, 45) == [Entry(1, 42, frozenset()), Entry(3, 45, frozenset({2})),
                              Entry(5, None, frozenset({1, 2}))]


def test_updated_keeps_the_last_entries():
    e: list = []
    for ptid in range(1, 40):
        e = updated(e, ptid, frozenset({ptid % 2}), frozenset({0, 1}), lambda r, t=ptid: t)
    assert len(e) == pt_history.MAX_ENTRIES and e[-1] == Entry(39, None, frozenset({1}))


def test_a_table_older_than_recorded_drops_the_newer_entries():
    e = [Entry(1, 5, frozenset({0})), Entry(5, None, frozenset({1}))]
    assert updated(e, 3, frozenset({0}), frozenset({0, 1}), lambda r: 9) == [
        Entry(1, None, frozenset({0}))]


class _Config:
    """A backend's configuration and committed TIDs, 255 bytes a value at
    most (MariaDB's ``config`` table)."""

    def __init__(self):
        self.config = {"partitions": "100"}
        self.last = {}

    def get_config(self, name):
        return self.config.get(name)

    def set_config(self, name, value):
        assert value is None or len(value) <= 255
        if value is None:
            self.config.pop(name, None)
        else:
            self.config[name] = value

    def get_num_partitions(self):
        return int(self.config["partitions"])

    def last_tid_of(self, partition):
        return self.last.get(partition)


def test_history_in_config_chunks():
    backend = _Config()
    history = pt_history.PartitionHistory(backend, lambda: "S1")
    everything = frozenset(range(100))
    for ptid in range(1, 30):
        # when a table comes, what was committed under the previous one is there
        history.table_changed(ptid, frozenset(range(ptid % 3, 100, 2)), everything)
        backend.last = {p: ptid * 10 for p in range(100)}
    assert len(history.entries) == pt_history.MAX_ENTRIES
    assert int(backend.config["pt_history"].split()[1]) > 1  # several chunks
    again = pt_history.PartitionHistory(backend, lambda: "S1")
    assert again.entries == history.entries
    assert again.report()[-1].end == 290 and again.report()[-2].end == 280
    # a crash before the pointer moved: the previous history, whole
    backend.set_config("pt_history.%d.0" % ((again.generation + 1) % 2), "garbage")
    assert pt_history.PartitionHistory(backend, lambda: "S1").entries == history.entries
    # unreadable: started again, not fatal
    backend.set_config("pt_history.%d.0" % (again.generation % 2), "garbage")
    assert pt_history.PartitionHistory(backend, lambda: "S1").entries == []


# -- who is sent what ---------------------------------------------------------------
def test_neo_master_and_admin_are_not_sent_the_requests():
    """NEO's master and admin would take the requests for protocol errors:
    the admin does not forward them, neoctl does not send them."""
    from types import SimpleNamespace

    from neozodb.admin.app import unforwardable
    from neozodb.ctl.neoctl import CtlError, run_command
    from neozodb.protocol import Packets
    from neozodb.protocol.features import FEATURES, NO_FEATURES
    for packet in (Packets.AskOlderPartitionTables, Packets.RecoverPartitionTable):
        assert unforwardable(packet, NO_FEATURES) == \
            "the master keeps no partition table history (NEO's master)"
        assert unforwardable(packet, FEATURES) is None

    class Ctl:
        conn = SimpleNamespace(peer_features=NO_FEATURES)

        def call(self, *args):
            raise AssertionError("sent %r" % (args,))
    for words in (["print", "pt_history"], ["recover_pt", "1"]):
        with pytest.raises(CtlError, match="the admin does not relay partition table histories"):
            run_command(Ctl(), words)


def test_neoctl_lines():
    from neozodb.ctl.older import describe
    assert describe(3, 3, False, None, ["S2"], [1, 4]) == \
        "ptid 3 (latest): not operational, no readable copy of partitions 1 4 (copies on S2)"
    assert describe(2, 3, False, None, [], [0, 1]) == \
        "ptid 2: not operational, no readable copy of partitions 0 1 (copies on no storage)"
    assert describe(1, 3, True, 0x40d6f4e65576956, ["S1", "S2"], []) == (
        "ptid 1: operational with S1 S2, truncating after 0x40d6f4e65576956"
        " (2026-12-02 19:26:23.751902)")
    # a pack at or below the TID changes nothing at the new end; above, say so
    assert describe(1, 3, True, 0x40d6f4e65576956, ["S1"], [], 0x40d6f4e65576956) == (
        "ptid 1: operational with S1, truncating after 0x40d6f4e65576956"
        " (2026-12-02 19:26:23.751902)")
    assert describe(1, 3, True, 0x40d6f4e65576956, ["S1"], [], 0x40d6f4e75576956) == (
        "ptid 1: operational with S1, truncating after 0x40d6f4e65576956"
        " (2026-12-02 19:26:23.751902); a pack up to 0x40d6f4e75576956"
        " (2026-12-02 19:26:27.501902) was applied since: the objects it deleted are lost")


# -- a storage node's history, in-process over SQLite -------------------------------
def test_storage_records_its_readable_partitions(tmp_path):
    import asyncio

    from neozodb.protocol import NodeTypes, Packets, make_nid, p64
    from neozodb.storage.app import StorageApp
    from neozodb.storage.backends.sqlite import SQLiteBackend
    from neozodb.storage.handlers import MasterHandler

    class Conn:
        def __init__(self):
            self.sent = []

        def answer(self, msg_id, packet, *args):
            self.sent.append((packet, args))

        def ack(self, msg_id, message=""):
            pass

    me, other = make_nid(NodeTypes.STORAGE, 1), make_nid(NodeTypes.STORAGE, 2)
    path = str(tmp_path / "s1.sqlite")

    def history(app):
        conn = Conn()
        MasterHandler(app).AskPartitionHistory(conn, 1)
        ((packet, args),) = conn.sent
        assert packet is Packets.AnswerPartitionHistory
        return args

    async def main():
        backend = SQLiteBackend(path)
        backend.open()
        app = StorageApp("test", [], backend)
        app.nid = me
        app.set_pt(1, 1, [[(me, U), (other, U)]] * 2 + [[(other, U)]] * 2)
        assert history(app) == (1, [(1, None, [0, 1])], None)
        # a transaction committed in partition 0 (tid 0x10, oid 4)
        backend.add_transaction(0x10, [4], b"", b"", b"", False, 0x10)
        backend.add_object(4, 0x10, 0, b"\0" * 20, b"x", None)
        backend.commit_pending()
        assert history(app) == (1, [(1, p64(0x10), [0, 1])], None)
        # another storage's cell changes: nothing to record
        app.change_pt(2, 1, [(2, other, OUT)])
        assert history(app) == (2, [(1, p64(0x10), [0, 1])], None)
        # our cell of 1 outdated (we were away): a new entry, the first ends
        app.change_pt(3, 1, [(1, me, OUT)])
        assert history(app) == (3, [(1, p64(0x10), [0, 1]), (3, p64(0x10), [0])], None)
        # 1 dropped: its data goes, it leaves every entry
        app.change_pt(4, 1, [(1, me, CellStates.DISCARDED)])
        assert history(app) == (4, [(1, p64(0x10), [0]), (3, p64(0x10), [0])], None)
        backend.close()
        # restarted: the same history, from the database
        backend = SQLiteBackend(path)
        backend.open()
        app = StorageApp("test", [], backend)
        app.nid = me
        assert history(app) == (4, [(1, p64(0x10), [0]), (3, p64(0x10), [0])], None)
        # a pending truncation counts at once, and stays once applied (then
        # nothing is left in partition 0: complete up to nothing known)
        app.set_truncation(0x8)
        assert history(app) == (4, [(1, p64(0x8), [0]), (3, p64(0x8), [0])], None)
        app.apply_truncation()
        assert history(app) == (4, [(1, p64(0x8), [0]), (3, None, [0])], None)
        assert backend.get_config("pt_history.0.0") or backend.get_config("pt_history.1.0")
        # a pack applied (or being applied) to our partitions: its pack TID
        backend.add_pack_order((0x6, True, False, None, 0x5, False))
        backend.add_pack_order((0x7, None, False, None, 0x7, False))  # not approved
        backend.set_pack_progress(0, (0x7, None, 0))
        backend.commit_pending()
        assert history(app)[2] == p64(0x5)
        backend.close()
    asyncio.run(main())
