"""The partition table (pure core)."""

import enum
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from neozodb.pt import (
    CORRUPTED,
    DISCARDED,
    FEEDING,
    OUT_OF_DATE,
    UP_TO_DATE,
    PartitionTable,
)

pytestmark = pytest.mark.timeout(60)


class WireCellStates(enum.Enum):
    """Stands in for neozodb.protocol's enum: only `.value` matters."""

    OUT_OF_DATE = 0
    UP_TO_DATE = 1
    FEEDING = 2
    CORRUPTED = 3
    DISCARDED = 4


def check_made(pt, nids):
    n = len(set(nids))
    repeats = min(pt.num_replicas + 1, n)
    assert pt.ptid == 1
    rows = pt.rows()
    assert len(rows) == pt.num_partitions
    counts = Counter()
    for row in rows:
        row_nids = [nid for nid, _ in row]
        assert len(row_nids) == repeats
        assert len(set(row_nids)) == repeats  # never twice in a row
        assert {state for _, state in row} == {UP_TO_DATE}
        counts.update(row_nids)
    # Every node is used (when there are enough cells) and balanced.
    used = min(n, pt.num_partitions * repeats)
    assert len(counts) == used
    assert max(counts.values()) - min(counts.values()) <= 1
    # Consecutive partitions are not on the very same nodes, unless every row
    # necessarily holds every node.
    if repeats < n:
        for a, b in zip(rows, rows[1:], strict=False):
            assert a != b
    assert pt.operational(set(nids))
    assert pt.nids() == set(counts)


@pytest.mark.parametrize("num_nodes", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("replicas", [0, 1, 2])
def test_make_small(num_nodes, replicas):
    pt = PartitionTable(12, replicas)
    nids = list(range(1, num_nodes + 1))
    pt.make(nids)
    check_made(pt, nids)


@given(
    st.integers(1, 50),
    st.integers(0, 3),
    st.sets(st.integers(1, 1000), min_size=1, max_size=8),
)
def test_make_hypothesis(num_partitions, replicas, nids):
    pt = PartitionTable(num_partitions, replicas)
    pt.make(nids)
    check_made(pt, nids)


def test_make_spreads_consecutive_partitions():
    pt = PartitionTable(6, 0)
    pt.make([1, 2, 3])
    assert [pt.readable_nids(i) for i in range(6)] == [[1], [2], [3], [1], [2], [3]]


def test_make_without_nodes():
    with pytest.raises(ValueError):
        PartitionTable(4, 1).make([])


def test_empty_wire_table():
    # What a cluster without a partition table answers: no rows at all.
    pt = PartitionTable(0, 1)
    pt.load(None, 1, [])
    assert pt.rows() == [] and pt.nids() == set()
    assert not pt.operational({1})
    assert pt.header() == "# ptid: None, replicas: 1"
    with pytest.raises(ValueError):
        PartitionTable(-1, 1)
    with pytest.raises(ValueError):
        PartitionTable(1, -1)


def test_new_table_is_empty():
    pt = PartitionTable(3, 1)
    assert pt.ptid is None
    assert pt.rows() == [[], [], []]
    assert not pt.operational({1, 2})
    assert pt.header() == "# ptid: None, replicas: 1"


def test_load_normalises_enum_states_and_copies():
    pt = PartitionTable(2, 1)
    pt.load(
        5,
        2,
        [
            [(2, WireCellStates.UP_TO_DATE), (1, WireCellStates.OUT_OF_DATE)],
            ((1, 1), (3, WireCellStates.DISCARDED)),
        ],
    )
    assert pt.ptid == 5 and pt.num_replicas == 2
    rows = pt.rows()
    assert rows == [[(1, OUT_OF_DATE), (2, UP_TO_DATE)], [(1, UP_TO_DATE)]]
    assert all(type(state) is int for row in rows for _, state in row)
    rows[0].clear()
    assert pt.cells(0) == [(1, OUT_OF_DATE), (2, UP_TO_DATE)]


def test_load_rejects_wrong_row_count_and_bad_state():
    pt = PartitionTable(2, 1)
    pt.make([1])
    with pytest.raises(ValueError):
        pt.load(3, 1, [[(1, UP_TO_DATE)]])
    with pytest.raises(ValueError):
        pt.load(3, 1, [[(1, UP_TO_DATE)], [(1, 9)]])
    # Unchanged after a refused load.
    assert pt.ptid == 1 and pt.rows() == [[(1, UP_TO_DATE)], [(1, UP_TO_DATE)]]


def test_apply_changes():
    pt = PartitionTable(3, 1)
    pt.make([1, 2])
    assert pt.rows() == [[(1, UP_TO_DATE), (2, UP_TO_DATE)]] * 3
    pt.apply_changes(
        2,
        1,
        [
            (0, 3, OUT_OF_DATE),
            (0, 2, WireCellStates.FEEDING),
            (1, 2, DISCARDED),
            (2, 1, WireCellStates.DISCARDED),
            (2, 9, DISCARDED),  # no such cell: nothing to remove
        ],
    )
    assert pt.ptid == 2
    assert pt.rows() == [
        [(1, UP_TO_DATE), (2, FEEDING), (3, OUT_OF_DATE)],
        [(1, UP_TO_DATE)],
        [(2, UP_TO_DATE)],
    ]
    assert pt.readable_nids(0) == [1, 2]
    assert pt.writable_nids(0) == [1, 2, 3]
    assert pt.nids() == {1, 2, 3}
    assert pt.partitions_of(2) == [0, 2]
    assert pt.partitions_of(3) == [0]
    assert pt.partitions_of(3, readable=True) == []
    pt.apply_changes(3, 2, [(0, 3, CORRUPTED)])
    assert pt.num_replicas == 2
    assert pt.writable_nids(0) == [1, 2]
    assert pt.readable_nids(0) == [1, 2]


@pytest.mark.parametrize("ptid", [1, 2, 4, None])
def test_apply_changes_checks_sequence(ptid):
    pt = PartitionTable(2, 0)
    pt.make([1, 2])
    pt.apply_changes(2, 0, [])
    with pytest.raises(ValueError):
        pt.apply_changes(ptid, 0, [(0, 2, UP_TO_DATE)])
    assert pt.ptid == 2
    assert pt.cells(0) == [(1, UP_TO_DATE)]


def test_apply_changes_without_table_or_bad_offset():
    pt = PartitionTable(2, 0)
    with pytest.raises(ValueError):
        pt.apply_changes(1, 0, [])
    pt.make([1])
    with pytest.raises(ValueError):
        pt.apply_changes(2, 0, [(0, 2, UP_TO_DATE), (2, 2, UP_TO_DATE)])
    # All or nothing.
    assert pt.ptid == 1 and pt.cells(0) == [(1, UP_TO_DATE)]


def test_partition_of_bytes_and_int():
    pt = PartitionTable(12, 0)
    assert pt.partition(0) == 0
    assert pt.partition(25) == 1
    assert pt.partition(b"\0" * 7 + b"\x19") == 1
    assert pt.partition(b"\x01" + b"\0" * 7) == (1 << 56) % 12
    assert pt.partition(0x40D4DEBBFCDF855) == 0x40D4DEBBFCDF855 % 12
    assert pt.partition((0x40D4DEBBFCDF855).to_bytes(8, "big")) == 0x40D4DEBBFCDF855 % 12
    with pytest.raises(ValueError):
        pt.partition(b"\x19")


def test_operational_with_exclude():
    pt = PartitionTable(4, 1)
    pt.make([1, 2, 3])
    assert pt.operational({1, 2, 3})
    # Any single node can go: every row has two readable cells.
    for nid in (1, 2, 3):
        assert pt.operational({1, 2, 3}, exclude={nid})
        assert pt.operational({1, 2, 3} - {nid})
    assert not pt.operational({1, 2, 3}, exclude={1, 2})
    assert not pt.operational({3})
    assert not pt.operational(set())


def test_operational_ignores_non_readable_cells():
    pt = PartitionTable(1, 1)
    pt.load(2, 1, [[(1, OUT_OF_DATE), (2, CORRUPTED)]])
    assert not pt.operational({1, 2})
    pt.load(3, 1, [[(1, OUT_OF_DATE), (2, FEEDING)]])
    assert pt.operational({1, 2})
    assert not pt.operational({1, 2}, exclude={2})


def test_outdate_keeps_last_readable_copy():
    pt = PartitionTable(4, 1)
    pt.make([1, 2])
    changes = pt.outdate(2)
    assert changes == [(i, 2, OUT_OF_DATE) for i in range(4)]
    pt.apply_changes(pt.ptid + 1, 1, changes)
    assert pt.ptid == 2
    assert pt.grid({1: "R", 2: "D"}) == ["S1 R UUUU", "S2 D OOOO"]
    # Now S1 holds the last readable copies: it is kept so the cluster can
    # restart from it.
    assert pt.outdate(1) == []
    assert pt.outdate(2) == []  # nothing readable left on S2


def test_outdate_discards_feeding_and_respects_running():
    pt = PartitionTable(3, 1)
    pt.load(
        7,
        1,
        [
            [(1, FEEDING), (2, UP_TO_DATE), (3, OUT_OF_DATE)],
            [(1, UP_TO_DATE), (3, OUT_OF_DATE)],  # last readable: kept
            [(1, UP_TO_DATE), (2, UP_TO_DATE)],
        ],
    )
    assert pt.outdate(1) == [(0, 1, DISCARDED), (2, 1, OUT_OF_DATE)]
    # With S2 also not running, S1's copies are the last usable ones.
    assert pt.outdate(1, running={3}) == []
    assert pt.outdate(1, running={2, 3}) == [(0, 1, DISCARDED), (2, 1, OUT_OF_DATE)]
    assert pt.ptid == 7  # outdate only computes


def test_header_and_grid_as_neoctl_prints():
    pt = PartitionTable(6, 1)
    pt.make([1, 2])
    assert pt.header() == "# ptid: 1, replicas: 1"
    assert pt.grid({1: "R", 2: "R"}) == ["S1 R UUUUUU", "S2 R UUUUUU"]


def test_grid_with_missing_cells_and_unknown_nodes():
    pt = PartitionTable(6, 1)
    # The table of neoctl-output.md during `tweak -n`.
    letters = {"U": UP_TO_DATE, "F": FEEDING, "O": OUT_OF_DATE}
    lines = ["S1 R UUFUUF", "S2 R UFUUFU", "S3 R .OO.OO"]
    rows = [[] for _ in range(6)]
    for nid, line in enumerate(lines, 1):
        for i, c in enumerate(line.split()[2]):
            if c != ".":
                rows[i].append((nid, letters[c]))
    pt.load(5, 1, rows)
    assert pt.grid({1: "R", 2: "R", 3: "R"}) == lines
    # Unknown state letter defaults to U; nodes without cells get a line of
    # dots; non-storage (negative) nids are not listed.
    assert pt.grid({1: "R", 4: "P", -1: "R"}) == [
        "S1 R UUFUUF",
        "S2 U UFUUFU",
        "S3 U .OO.OO",
        "S4 P ......",
    ]
    pt.apply_changes(6, 1, [(0, 2, CORRUPTED)])
    assert pt.grid({}, name=lambda nid: "N%d" % nid)[1] == "N2 U CFUUFU"


def test_same_cells():
    """The storages holding every one of some partitions, if these have the
    same cells, all UP_TO_DATE (what a bulk copy needs, client/bulk.py)."""
    pt = PartitionTable(4, 1)
    pt.make([1, 2])
    assert pt.same_cells(range(4)) == [1, 2]
    assert pt.same_cells([]) is None
    pt.apply_changes(2, 1, [(1, 3, OUT_OF_DATE)])
    assert pt.same_cells([0, 2, 3]) == [1, 2]
    assert pt.same_cells([0, 1]) is None  # another storage in partition 1
    assert pt.same_cells([1]) is None  # not UP_TO_DATE
    spread = PartitionTable(4, 0)
    spread.make([1, 2])
    owners = {spread.readable_nids(p)[0] for p in range(4)}
    assert owners == {1, 2}
    assert spread.same_cells(range(4)) is None
    assert spread.same_cells([p for p in range(4) if spread.readable_nids(p) == [1]]) == [1]
