"""Rebalancing of the partition table (master/tweak.py and tweak_slots.py, pure core)."""

import itertools
import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import neozodb.master.tweak_slots as tweak_slots
from neozodb.master.tweak import drop_changes, drop_check, plan_tweak, tweak
from neozodb.master.tweak_slots import find_pattern
from neozodb.pt import (
    CORRUPTED,
    DISCARDED,
    FEEDING,
    OUT_OF_DATE,
    UP_TO_DATE,
    PartitionTable,
)

pytestmark = pytest.mark.timeout(120)

READABLE = (UP_TO_DATE, FEEDING)
WEIGHT = {UP_TO_DATE: 4, FEEDING: 3, OUT_OF_DATE: 1}


# -- helpers ------------------------------------------------------------------


def made(num_partitions, num_replicas, nids):
    pt = PartitionTable(num_partitions, num_replicas)
    pt.make(nids)
    return pt


def loaded(num_replicas, rows, ptid=5):
    pt = PartitionTable(len(rows), num_replicas)
    pt.load(ptid, num_replicas, [sorted(row.items()) for row in rows])
    return pt


def apply(pt, changes):
    pt.apply_changes(pt.ptid + 1, pt.num_replicas, changes)


def as_dicts(pt):
    return [dict(row) for row in pt.rows()]


def counts(pt, nids, states=(UP_TO_DATE, OUT_OF_DATE)):
    result = Counter({nid: 0 for nid in nids})
    for row in pt.rows():
        result.update(nid for nid, state in row if state in states)
    return result


def replication_steps(pt, repeats, rng):
    """Finish replication one cell at a time, yielding after each step.

    An OUT_OF_DATE cell becomes UP_TO_DATE; the row's FEEDING cells are
    discarded once it has ``repeats`` UP_TO_DATE cells.
    """
    pending = [
        (offset, nid)
        for offset, row in enumerate(pt.rows())
        for nid, state in row
        if state == OUT_OF_DATE
    ]
    rng.shuffle(pending)
    for offset, nid in pending:
        changes = [(offset, nid, UP_TO_DATE)]
        row = dict(pt.cells(offset))
        row[nid] = UP_TO_DATE
        if sum(state == UP_TO_DATE for state in row.values()) >= repeats:
            changes += [(offset, other, DISCARDED) for other, s in row.items() if s == FEEDING]
        apply(pt, changes)
        yield


def check_final_layout(pt, members, drained, repeats):
    """Invariants of a table once replication is over."""
    rows = pt.rows()
    for offset, row in enumerate(rows):
        assert len(row) == repeats, (offset, row)  # dict keys: distinct nodes
        assert all(state == UP_TO_DATE for _, state in row), (offset, row)
        assert {nid for nid, _ in row} <= set(members), (offset, row)
    per_node = counts(pt, members)
    assert max(per_node.values()) - min(per_node.values()) <= 1, per_node
    for nid in drained:
        assert not pt.partitions_of(nid), nid
    if repeats < len(members):
        for offset in range(len(rows) - 1):
            assert rows[offset] != rows[offset + 1], offset


def data_score(rows, layout):
    return sum(
        WEIGHT.get(rows[offset].get(nid), 0) for offset, nids in enumerate(layout) for nid in nids
    )


def round_robin_layouts(num_partitions, repeats, members):
    """Every layout of the round-robin structure (brute force, small n)."""
    n = len(members)
    for order in itertools.permutations(members):
        yield [
            tuple(sorted(order[(offset * repeats + k) % n] for k in range(repeats)))
            for offset in range(num_partitions)
        ]


# -- concrete examples ------------------------------------------------------------


def test_two_to_three_nodes():
    pt = made(6, 1, [1, 2])
    before = pt.rows()
    changes = tweak(pt, [1, 2, 3])
    assert pt.rows() == before and pt.ptid == 1  # not modified
    by_state = Counter(state for _, _, state in changes)
    # Node 3 gets 4 new cells (12 cells / 3 nodes); each of 1 and 2 gives up 2.
    assert by_state == {OUT_OF_DATE: 4, FEEDING: 4}
    assert {nid for _, nid, state in changes if state == OUT_OF_DATE} == {3}
    assert Counter(nid for _, nid, state in changes if state == FEEDING) == {1: 2, 2: 2}
    # Each changed row: one cell moved from 1 or 2 to 3, the other one kept.
    for offset in {offset for offset, _, _ in changes}:
        row_changes = sorted((nid, state) for o, nid, state in changes if o == offset)
        assert len(row_changes) == 2 and row_changes[-1] == (3, OUT_OF_DATE)
        assert row_changes[0][1] == FEEDING
    apply(pt, changes)
    assert counts(pt, [1, 2, 3]) == {1: 4, 2: 4, 3: 4}
    assert pt.operational([1, 2, 3])
    for offset in range(6):
        assert len(pt.readable_nids(offset)) == 2  # still two full copies
    assert tweak(pt, [1, 2, 3]) == []  # idempotent right away
    for _ in replication_steps(pt, 2, random.Random(0)):
        assert pt.operational([1, 2, 3])
    check_final_layout(pt, [1, 2, 3], [], 2)
    assert tweak(pt, [1, 2, 3]) == []


def test_same_nodes_is_a_no_op():
    for np_, nr, nids in [(6, 1, [1, 2]), (12, 2, [1, 2, 3, 4, 5]), (7, 0, [3, 9]), (1, 3, [1])]:
        pt = made(np_, nr, nids)
        assert tweak(pt, nids) == []
        assert tweak(pt, nids, topology={}) == []


def test_drain_a_node():
    pt = made(6, 1, [1, 2, 3])
    plan = plan_tweak(pt, [1, 2, 3], drop=[3])
    assert plan.layout == [(1, 2)] * 6
    for offset in pt.partitions_of(3):
        assert (offset, 3, FEEDING) in plan.changes  # kept until replaced
    assert {nid for _, nid, s in plan.changes if s == OUT_OF_DATE} <= {1, 2}
    apply(pt, plan.changes)
    assert pt.operational([1, 2, 3]) and pt.operational([1, 2])
    assert tweak(pt, [1, 2, 3], drop=[3]) == []
    # `nodes` may or may not include the drained nodes.
    assert tweak(pt, [1, 2], drop=[3]) == []
    for _ in replication_steps(pt, 2, random.Random(1)):
        assert pt.operational([1, 2, 3])
    check_final_layout(pt, [1, 2], [3], 2)


def test_drain_without_replicas_keeps_the_only_copy_feeding():
    pt = made(4, 0, [1, 2])
    changes = tweak(pt, [1, 2], drop=[2])
    assert changes == [(1, 1, OUT_OF_DATE), (1, 2, FEEDING), (3, 1, OUT_OF_DATE), (3, 2, FEEDING)]
    apply(pt, changes)
    assert pt.operational([1, 2]) and not pt.operational([1])


def test_drain_to_one_node_discards_redundant_copies():
    pt = made(4, 1, [1, 2])
    # Node 1 already has every partition: node 2's copies are not needed.
    assert tweak(pt, [1, 2], drop=[2]) == [(o, 2, DISCARDED) for o in range(4)]


def test_moving_back_restores_feeding_cells():
    pt = made(4, 0, [1, 2])
    original = pt.rows()
    apply(pt, tweak(pt, [1, 2, 3]))
    moved = [o for o, row in enumerate(pt.rows()) if dict(row).get(3) == OUT_OF_DATE]
    assert moved
    changes = tweak(pt, [1, 2], drop=[3])
    for offset in moved:
        assert (offset, 3, DISCARDED) in changes
        (old,) = [nid for nid, state in original[offset]]
        assert (offset, old, UP_TO_DATE) in changes
    apply(pt, changes)
    assert pt.rows() == original


def test_node_in_neither_list_is_drained():
    pt = made(4, 1, [1, 2, 3])
    plan = plan_tweak(pt, [1, 2])
    assert all(3 not in cells for cells in plan.layout)
    apply(pt, plan.changes)
    assert all(dict(row).get(3) in (None, FEEDING) for row in pt.rows())


def test_corrupted_and_extra_cells():
    rows = [
        {1: CORRUPTED, 2: UP_TO_DATE},
        {1: UP_TO_DATE, 2: UP_TO_DATE, 3: OUT_OF_DATE},
        {1: OUT_OF_DATE, 2: FEEDING},
        {3: UP_TO_DATE},
    ]
    pt = loaded(1, rows)
    plan = plan_tweak(pt, [1, 2])
    assert plan.layout == [(1, 2)] * 4
    assert plan.changes == [
        (0, 1, OUT_OF_DATE),  # corrupted cell rebuilt
        (1, 3, DISCARDED),  # extra, not readable
        (2, 2, UP_TO_DATE),  # feeding cell kept
        (3, 1, OUT_OF_DATE),
        (3, 2, OUT_OF_DATE),
        (3, 3, FEEDING),  # last copy, on a node neither kept nor available
    ]
    apply(pt, plan.changes)
    assert tweak(pt, [1, 2]) == []


def test_surplus_readable_cells_are_discarded_when_enough_remain():
    # Replicas lowered from 2 to 1: one copy per row is discarded at once.
    pt = made(3, 2, [1, 2, 3])
    pt.apply_changes(2, 1, [])
    changes = tweak(pt, [1, 2, 3])
    assert Counter(state for _, _, state in changes) == {DISCARDED: 3}
    apply(pt, changes)
    assert all(len(pt.readable_nids(o)) == 2 for o in range(3))


def test_more_nodes_than_cells():
    pt = made(2, 0, [1])
    plan = plan_tweak(pt, [1, 2, 3, 4])
    assert sorted(len(cells) for cells in plan.layout) == [1, 1]
    assert len({cells for cells in plan.layout}) == 2
    # One partition stays on node 1, the other moves (node 1 keeps feeding it).
    assert [state for _, nid, state in plan.changes if nid == 1] == [FEEDING]
    assert [state for _, nid, state in plan.changes if nid != 1] == [OUT_OF_DATE]


def test_empty_cluster_is_refused():
    pt = made(3, 1, [1, 2])
    with pytest.raises(ValueError):
        tweak(pt, [1, 2], drop=[1, 2])
    with pytest.raises(ValueError):
        tweak(pt, [])


# -- topology -----------------------------------------------------------------------


def test_layout_of_current_cells_is_kept():
    # Every partition was just moved to the other node: the FEEDING copies
    # are complete, but the tweak that did it must not be undone by the next.
    pt = loaded(0, [{1: OUT_OF_DATE, 2: FEEDING}, {1: FEEDING, 2: OUT_OF_DATE}])
    assert tweak(pt, [1, 2]) == []
    pt = loaded(0, [{1: CORRUPTED, 2: FEEDING}, {1: FEEDING, 2: OUT_OF_DATE}])
    assert tweak(pt, [1, 2]) == [
        (0, 1, DISCARDED),
        (0, 2, UP_TO_DATE),
        (1, 1, UP_TO_DATE),
        (1, 2, DISCARDED),
    ]


def test_surplus_cells_prefer_up_to_date():
    # Every node already has a cell in every row: keep the complete ones.
    pt = loaded(0, [{1: OUT_OF_DATE, 2: UP_TO_DATE}, {1: UP_TO_DATE, 2: OUT_OF_DATE}])
    assert tweak(pt, [1, 2]) == [(0, 1, DISCARDED), (1, 2, DISCARDED)]


def test_which_leaving_copies_keep_feeding():
    # Already FEEDING first: fewer changes.
    pt = loaded(0, [{1: UP_TO_DATE, 2: FEEDING, 3: UP_TO_DATE}])
    assert tweak(pt, [1, 2, 3, 4], drop=[1, 2, 3]) == [
        (0, 1, DISCARDED),
        (0, 3, DISCARDED),
        (0, 4, OUT_OF_DATE),
    ]
    # Nodes that stay in the cluster before drained ones.
    pt = loaded(0, [{1: UP_TO_DATE, 2: UP_TO_DATE}] * 2)
    changes = tweak(pt, [1, 2, 3], drop=[2])
    (moved,) = {offset for offset, nid, _ in changes if nid == 3}
    assert changes == sorted(
        [(0, 2, DISCARDED), (1, 2, DISCARDED), (moved, 1, FEEDING), (moved, 3, OUT_OF_DATE)]
    )
    # Nodes given (running) before the others.
    pt = loaded(0, [{1: UP_TO_DATE, 2: UP_TO_DATE}])
    assert tweak(pt, [3, 2], drop=[2]) == [(0, 1, DISCARDED), (0, 2, FEEDING), (0, 3, OUT_OF_DATE)]


def test_topology_hosts():
    topology = {1: ("a", 1), 2: ("a", 2), 3: ("b", 1), 4: ("b", 2)}
    pt = made(8, 1, [1, 2, 3, 4])  # rows {1,2} and {3,4}: same host
    plan = plan_tweak(pt, [1, 2, 3, 4], topology=topology)
    assert plan.topology_level == 1 and not plan.topology_ignored
    for cells in plan.layout:
        assert len({topology[nid][0] for nid in cells}) == 2
    apply(pt, plan.changes)
    assert pt.operational([1, 2, 3, 4])
    assert tweak(pt, [1, 2, 3, 4], topology=topology) == []
    # Without topology the same table is already balanced: nothing to do.
    assert tweak(made(8, 1, [1, 2, 3, 4]), [1, 2, 3, 4]) == []


def test_topology_falls_back_to_devices():
    # 3 nodes on host a, 1 on b: b cannot be in every row while staying
    # balanced, so only distinct devices are required.
    topology = {1: ("a", 1), 2: ("a", 1), 3: ("a", 2), 4: ("b", 1)}
    plan = plan_tweak(made(8, 1, [1, 2, 3, 4]), [1, 2, 3, 4], topology=topology)
    assert plan.topology_level == 2
    for cells in plan.layout:
        assert len({topology[nid] for nid in cells}) == 2


def test_topology_moves_little_data():
    # Host b has too many nodes, so devices are spread; among the compliant
    # layouts, one with the fewest new cells is found (a swap-based local
    # search alone would end with 15).
    topology = {1: ("b", 1), 2: ("c", 0), 3: ("c", 0), 4: ("b", 0), 5: ("b", 0)}
    plan = plan_tweak(made(13, 1, [1, 3, 4]), [1, 2, 3, 4, 5], topology=topology)
    assert plan.topology_level == 2
    for cells in plan.layout:
        assert len({topology[nid] for nid in cells}) == 2
    assert sum(1 for _, _, state in plan.changes if state == OUT_OF_DATE) == 14


def test_topology_ignored_when_impossible():
    topology = {1: ("a", 1), 2: ("a", 1), 3: ("b", 1)}
    pt = made(6, 2, [1, 2, 3])  # every row needs the 3 nodes
    plan = plan_tweak(pt, [1, 2, 3], topology=topology)
    assert plan.topology_level is None and plan.topology_ignored
    assert plan.changes == []
    plan = plan_tweak(pt, [1, 2, 3])
    assert plan.topology_level is None and not plan.topology_ignored
    # Paths only for nodes not in the cluster: nothing to honour.
    plan = plan_tweak(pt, [1, 2, 3], topology={4: ("a", 1), 5: ("a", 1)})
    assert plan.topology_level is None and not plan.topology_ignored


def test_topology_partial_paths():
    # Nodes without a path are groups of their own.
    topology = {1: ("a",), 2: ("a",)}
    plan = plan_tweak(made(6, 1, [1, 2, 3, 4]), [1, 2, 3, 4], topology=topology)
    assert plan.topology_level == 1
    assert all(cells != (1, 2) for cells in plan.layout)


# -- drop -----------------------------------------------------------------------------


def test_drop_check():
    pt = made(4, 0, [1, 2])
    reason = drop_check(pt, 1, {1, 2})
    assert reason is not None and "1" in reason and "0, 2" in reason
    assert drop_check(pt, 3, {1, 2}) is None
    pt = made(4, 1, [1, 2])
    assert drop_check(pt, 1, {1, 2}) is None
    # The other copy is on a node that is not running.
    assert drop_check(pt, 1, {1}) is not None
    assert drop_check(pt, 1, set()) is None  # both down: the other copy remains


def test_drop_check_feeding():
    pt = loaded(0, [{1: FEEDING, 2: OUT_OF_DATE}])
    assert drop_check(pt, 1, {1, 2}) is not None
    assert drop_check(pt, 2, {1, 2}) is None
    pt = loaded(0, [{1: UP_TO_DATE, 2: FEEDING}])
    assert drop_check(pt, 1, {1, 2}) is None  # the feeding copy takes over
    assert drop_changes(pt, 1) == [(0, 1, DISCARDED), (0, 2, UP_TO_DATE)]
    assert drop_changes(pt, 2) == [(0, 2, DISCARDED)]


def test_drop_changes_promotes_feeding_only_as_needed():
    pt = loaded(0, [{1: UP_TO_DATE, 2: FEEDING, 3: OUT_OF_DATE}])
    assert drop_changes(pt, 3) == [(0, 3, DISCARDED)]  # node 1 is enough
    assert drop_changes(pt, 1) == [(0, 1, DISCARDED)]  # node 3 replaces it
    pt = loaded(1, [{1: UP_TO_DATE, 2: FEEDING, 3: FEEDING, 4: OUT_OF_DATE}])
    assert drop_changes(pt, 4) == [(0, 2, UP_TO_DATE), (0, 4, DISCARDED)]


def test_drop_changes_after_tweak():
    pt = made(6, 1, [1, 2])
    apply(pt, tweak(pt, [1, 2, 3]))
    assert drop_check(pt, 3, {1, 2, 3}) is None
    before = made(6, 1, [1, 2]).rows()
    apply(pt, drop_changes(pt, 3))
    assert pt.rows() == before  # the moves are cancelled


# -- properties ---------------------------------------------------------------------------


@st.composite
def clusters(draw):
    num_partitions = draw(st.integers(1, 40))
    num_replicas = draw(st.integers(0, 3))
    n = draw(st.integers(1, 7))
    nids = list(range(1, n + 1))
    initial = draw(st.sets(st.sampled_from(nids), min_size=1))
    drop = draw(st.sets(st.sampled_from(nids), max_size=n - 1))
    return num_partitions, num_replicas, nids, sorted(initial), sorted(drop)


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(clusters(), st.booleans(), st.randoms(use_true_random=False))
def test_tweak_properties(cluster, list_drop_in_nodes, rng):
    num_partitions, num_replicas, nids, initial, drop = cluster
    pt = made(num_partitions, num_replicas, initial)
    members = [nid for nid in nids if nid not in drop]
    nodes = nids if list_drop_in_nodes else members
    repeats = min(num_replicas + 1, len(members))
    old = as_dicts(pt)

    plan = plan_tweak(pt, nodes, drop)
    assert as_dicts(pt) == old and pt.ptid == 1
    changes = plan.changes
    assert changes == tweak(pt, nodes, drop)
    assert len({(offset, nid) for offset, nid, _ in changes}) == len(changes)
    for offset, nid, state in changes:
        previous = old[offset].get(nid)
        assert state != previous
        if state == OUT_OF_DATE:
            assert previous is None and nid in members  # new cells only
        elif state == FEEDING:
            assert previous == UP_TO_DATE
    apply(pt, changes)
    assert pt.operational(nids)
    for offset, row in enumerate(as_dicts(pt)):
        members_cells = sorted(nid for nid, s in row.items() if s != FEEDING)
        assert tuple(members_cells) == plan.layout[offset]
        # Enough readable copies until the replacements are done.
        assert len(pt.readable_nids(offset)) >= min(repeats, len(old[offset]))
    assert tweak(pt, nodes, drop) == []

    for _ in replication_steps(pt, repeats, rng):
        assert pt.operational(nids)
    check_final_layout(pt, members, drop, repeats)
    assert tweak(pt, nodes, drop) == []
    # Draining nodes again after the fact is a no-op as well.
    assert tweak(pt, members) == []


@SETTINGS
@given(
    st.integers(1, 12),
    st.integers(0, 2),
    st.integers(1, 5),
    st.data(),
)
def test_optimal_data_movement(num_partitions, num_replicas, n, data):
    """Brute force over every assignment of the round-robin layout."""
    nids = list(range(1, n + 1))
    initial = sorted(data.draw(st.sets(st.sampled_from(nids), min_size=1)))
    pt = made(num_partitions, num_replicas, initial)
    members = sorted(data.draw(st.sets(st.sampled_from(nids), min_size=1)))
    repeats = min(num_replicas + 1, len(members))
    rows = as_dicts(pt)
    plan = plan_tweak(pt, members)
    best = max(
        data_score(rows, layout) for layout in round_robin_layouts(num_partitions, repeats, members)
    )
    assert data_score(rows, plan.layout) == best
    # Which implies the minimum number of new cells.
    new_cells = sum(1 for _, _, state in plan.changes if state == OUT_OF_DATE)
    assert new_cells == num_partitions * repeats - best // WEIGHT[UP_TO_DATE]


def current_layout(rows, members):
    """UP_TO_DATE/OUT_OF_DATE cells of ``members``, as a plan's layout."""
    return [
        tuple(sorted(nid for nid, s in row.items() if nid in members and s in (0, 1)))
        for row in rows
    ]


def assert_optimal(rows, members, plan, layouts):
    """The plan moves as little data as the best of ``layouts`` (assignments
    of the round-robin structure), unless it is the current layout, kept as
    it is (which takes precedence, so as not to undo a previous tweak)."""
    layouts = [[tuple(sorted(cells)) for cells in layout] for layout in layouts]
    assert plan.layout in layouts
    if plan.layout != current_layout(rows, members):
        best = max(data_score(rows, layout) for layout in layouts)
        assert data_score(rows, plan.layout) == best


@SETTINGS
@given(
    st.integers(1, 10),
    st.integers(0, 2),
    st.integers(1, 5),
    st.data(),
)
def test_optimal_data_movement_messy(num_partitions, num_replicas, n, data):
    nids = list(range(1, n + 1))
    states = st.sampled_from([UP_TO_DATE, OUT_OF_DATE, FEEDING, CORRUPTED])
    rows = [
        data.draw(st.dictionaries(st.sampled_from(nids), states, max_size=n))
        for _ in range(num_partitions)
    ]
    pt = loaded(num_replicas, rows)
    members = sorted(data.draw(st.sets(st.sampled_from(nids), min_size=1)))
    repeats = min(num_replicas + 1, len(members))
    plan = plan_tweak(pt, members)
    assert_optimal(rows, members, plan, round_robin_layouts(num_partitions, repeats, members))


@st.composite
def messy_tables(draw):
    num_partitions = draw(st.integers(1, 20))
    num_replicas = draw(st.integers(0, 3))
    nids = list(range(1, draw(st.integers(1, 7)) + 1))
    states = st.sampled_from([UP_TO_DATE, UP_TO_DATE, OUT_OF_DATE, FEEDING, CORRUPTED])
    rows = [
        draw(st.dictionaries(st.sampled_from(nids), states, max_size=len(nids)))
        for _ in range(num_partitions)
    ]
    running = draw(st.sets(st.sampled_from(nids), min_size=1))
    drop = draw(st.sets(st.sampled_from(sorted(running)), max_size=len(running) - 1))
    return num_replicas, rows, sorted(running), sorted(drop)


@SETTINGS
@given(messy_tables(), st.randoms(use_true_random=False))
def test_tweak_messy_tables(table, rng):
    """Any table (extra, corrupted, feeding cells, nodes down): readability
    on the given nodes is never lost, the result converges, and a second
    tweak is a no-op."""
    num_replicas, rows, running, drop = table
    pt = loaded(num_replicas, rows)
    members = [nid for nid in running if nid not in drop]
    repeats = min(num_replicas + 1, len(members))
    was_operational = pt.operational(running)
    changes = tweak(pt, running, drop)
    apply(pt, changes)
    assert not any(state == CORRUPTED for row in pt.rows() for _, state in row)
    if was_operational:
        assert pt.operational(running)
    assert tweak(pt, running, drop) == []
    for _ in replication_steps(pt, repeats, rng):
        if was_operational:
            assert pt.operational(running)
    check_final_layout(pt, members, drop, repeats)
    assert tweak(pt, running, drop) == []


@SETTINGS
@given(
    st.integers(1, 24),
    st.integers(0, 2),
    st.lists(
        st.tuples(st.sets(st.integers(1, 6), min_size=1), st.sets(st.integers(1, 6))),
        min_size=1,
        max_size=4,
    ),
    st.randoms(use_true_random=False),
)
def test_successive_tweaks_with_partial_replication(num_partitions, num_replicas, rounds, rng):
    """Tweaks with replication interrupted in between stay safe."""
    everyone = list(range(1, 7))
    pt = made(num_partitions, num_replicas, sorted(rounds[0][0]))
    for nodes, drop in rounds:
        if not nodes - drop:
            drop = set()
        changes = tweak(pt, nodes, drop)
        apply(pt, changes)
        assert pt.operational(everyone)
        assert tweak(pt, nodes, drop) == []
        steps = replication_steps(pt, min(num_replicas + 1, len(nodes - drop)), rng)
        for _ in range(rng.randint(0, num_partitions * (num_replicas + 1))):
            if next(steps, StopIteration) is StopIteration:
                break
            assert pt.operational(everyone)


def topology_level_brute_force(num_partitions, repeats, members, topology):
    depth = max(len(topology.get(nid, ())) for nid in members)
    for level in range(1, depth + 1):

        def key(nid, level=level):
            path = topology.get(nid)
            return tuple(path[:level]) if path else ("", nid)

        if len({key(nid) for nid in members}) < repeats:
            continue
        for layout in round_robin_layouts(num_partitions, repeats, members):
            if all(len({key(nid) for nid in cells}) == len(cells) for cells in layout):
                return level
    return None


@SETTINGS
@given(
    st.integers(1, 16),
    st.integers(0, 2),
    st.integers(1, 6),
    st.data(),
)
def test_topology_properties(num_partitions, num_replicas, n, data):
    nids = list(range(1, n + 1))
    path = st.tuples(st.sampled_from("abc"), st.integers(0, 1))
    topology = data.draw(st.dictionaries(st.sampled_from(nids), path, min_size=1))
    if data.draw(st.booleans()):
        initial = sorted(data.draw(st.sets(st.sampled_from(nids), min_size=1)))
        pt = made(num_partitions, num_replicas, initial)
    else:
        states = st.sampled_from([UP_TO_DATE, UP_TO_DATE, OUT_OF_DATE, FEEDING, CORRUPTED])
        cells = st.dictionaries(st.sampled_from(nids), states, max_size=n)
        pt = loaded(num_replicas, [data.draw(cells) for _ in range(num_partitions)])
    was_operational = pt.operational(nids)
    repeats = min(num_replicas + 1, n)
    rows = as_dicts(pt)
    plan = plan_tweak(pt, nids, topology=topology)
    level = topology_level_brute_force(num_partitions, repeats, nids, topology)
    assert plan.topology_level == level
    assert plan.topology_ignored == (level is None)

    def complies(layout):
        for cells in layout:
            keys = {tuple(topology[nid][:level]) if nid in topology else nid for nid in cells}
            if len(keys) != len(cells):
                return False
        return True

    layouts = list(round_robin_layouts(num_partitions, repeats, nids))
    if level is not None:
        assert complies(plan.layout)
        layouts = [layout for layout in layouts if complies(layout)]
    assert_optimal(rows, nids, plan, layouts)
    apply(pt, plan.changes)
    assert pt.operational(nids) or not was_operational
    assert tweak(pt, nids, topology=topology) == []
    for _ in replication_steps(pt, repeats, random.Random(0)):
        pass
    check_final_layout(pt, nids, [], repeats)
    assert tweak(pt, nids, topology=topology) == []


@SETTINGS
@given(st.data())
def test_find_pattern_is_complete(data):
    """The search for a topology-compliant pattern, against brute force on
    arbitrary conflict graphs."""
    n = data.draw(st.integers(1, 7))
    labels = data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    edges = data.draw(st.sets(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1))))
    conflicts = [set() for _ in range(n)]
    for a, b in edges:
        if a != b:
            conflicts[a].add(b)
            conflicts[b].add(a)

    def valid(pattern):
        return all(pattern[a] != pattern[b] for a in range(n) for b in conflicts[a])

    pattern = find_pattern(labels, conflicts, [1] * n, n)
    expected = any(valid(p) for p in set(itertools.permutations(labels)))
    assert (pattern is not None) == expected
    if pattern is not None:
        assert sorted(pattern) == sorted(labels) and valid(pattern)


@SETTINGS
@given(
    st.integers(1, 16),
    st.integers(0, 2),
    st.integers(2, 6),
    st.data(),
)
def test_topology_heuristic_fallback(num_partitions, num_replicas, n, data):
    """With too many compliant patterns to try them all, the best-effort
    search still complies, and a second tweak is a no-op."""
    nids = list(range(1, n + 1))
    path = st.tuples(st.sampled_from("ab"), st.integers(0, 1))
    topology = data.draw(st.dictionaries(st.sampled_from(nids), path, min_size=1))
    initial = sorted(data.draw(st.sets(st.sampled_from(nids), min_size=1)))
    pt = made(num_partitions, num_replicas, initial)
    repeats = min(num_replicas + 1, n)
    limit = tweak_slots._PATTERN_LIMIT
    tweak_slots._PATTERN_LIMIT = 1
    try:
        plan = plan_tweak(pt, nids, topology=topology)
        level = plan.topology_level
        if level is not None:
            for cells in plan.layout:
                keys = {tuple(topology[nid][:level]) if nid in topology else nid for nid in cells}
                assert len(keys) == len(cells)
        apply(pt, plan.changes)
        assert pt.operational(nids)
        assert tweak(pt, nids, topology=topology) == []
        for _ in replication_steps(pt, repeats, random.Random(0)):
            pass
        check_final_layout(pt, nids, [], repeats)
        assert tweak(pt, nids, topology=topology) == []
    finally:
        tweak_slots._PATTERN_LIMIT = limit


# -- the master's side of neoctl tweak / set replicas (administration.py) --------


class _FakeConn:
    closed = False

    def __init__(self):
        self.sent = []

    def notify(self, packet, *args):
        self.sent.append((packet.name, args))


def _master(running=(1, 2), table=(1, 2), down=(), pending=(), replicas=1, partitions=6,
            devpath=None):
    """A MasterApp (no network) in RUNNING with storages S<i> and one admin."""
    from neozodb.master.app import MasterApp
    from neozodb.nodes import Node
    from neozodb.protocol import ClusterStates, NodeStates, NodeTypes, make_nid

    app = MasterApp("test", ("127.0.0.1", 0), partitions=partitions, replicas=replicas)
    app.cluster_state = ClusterStates.RUNNING
    pt = PartitionTable(partitions, replicas)
    pt.make([make_nid(NodeTypes.STORAGE, i) for i in table])
    app.pt = pt
    for states, numbers in ((NodeStates.RUNNING, running), (NodeStates.DOWN, down),
                            (NodeStates.PENDING, pending)):
        for i in numbers:
            node = Node(NodeTypes.STORAGE, make_nid(NodeTypes.STORAGE, i), state=states,
                        conn=None if states is NodeStates.DOWN else _FakeConn())
            if devpath is not None:
                node.devpath = devpath(i)
            app.nm.add(node)
    app.nm.add(Node(NodeTypes.ADMIN, _admin(), state=NodeStates.RUNNING, conn=_FakeConn()))
    return app


def _s(i):
    from neozodb.protocol import NodeTypes, make_nid
    return make_nid(NodeTypes.STORAGE, i)


def _admin():
    from neozodb.protocol import NodeTypes, make_nid
    return make_nid(NodeTypes.ADMIN, 1)


def _sent(app, nid):
    return app.nm.get(nid).conn.sent


def test_admin_tweak_dry_run_then_apply():
    from neozodb.master.administration import tweak_partition_table
    app = _master(running=(1, 2, 3), pending=(4,))
    before = app.pt.rows()
    changed, rows = tweak_partition_table(app, True, [])
    assert changed and app.pt.rows() == before and app.pt.ptid == 1
    assert not any(_sent(app, _s(i)) for i in (1, 2, 3, 4))
    s3 = [state.value for row in rows for nid, state in row if nid == _s(3)]
    assert len(s3) == 4 and set(s3) == {OUT_OF_DATE}  # 6 partitions x 2 cells / 3 nodes
    assert all(nid != _s(4) for row in rows for nid, _ in row)  # pending: no cell
    changed, applied = tweak_partition_table(app, False, [])
    assert changed and applied == rows and app.pt.ptid == 2
    assert [[(nid, state.value) for nid, state in row] for row in applied] == app.pt.rows()
    wire = _sent(app, _s(1))
    assert len(wire) == 1 and wire[0][0] == "NotifyPartitionChanges"
    assert wire[0][1][:2] == (2, 1)
    assert _sent(app, _s(3)) == _sent(app, _admin()) == wire
    assert _sent(app, _s(4)) == []  # pending storages get the table when added
    assert tweak_partition_table(app, False, []) == (False, applied)
    assert app.pt.ptid == 2


def test_admin_tweak_refusals():
    from neozodb.master.administration import tweak_partition_table
    from neozodb.net.connection import Denied
    from neozodb.protocol import ClusterStates, NodeTypes, make_nid

    app = _master(running=(1,), table=(1, 2), down=(2,))
    with pytest.raises(Denied, match=r"^unknown node: S9$"):
        tweak_partition_table(app, True, [_s(9)])
    with pytest.raises(Denied, match=r"^M1 is not a storage node$"):
        tweak_partition_table(app, True, [app.nid])
    with pytest.raises(Denied, match=r"^A1 is not a storage node$"):
        tweak_partition_table(app, True, [_admin()])
    with pytest.raises(Denied, match=r"^unknown node: C1$"):
        tweak_partition_table(app, True, [make_nid(NodeTypes.CLIENT, 1)])
    with pytest.raises(Denied, match=r"^S2 \(DOWN\) is not running but holds cells: list it"):
        tweak_partition_table(app, False, [])
    with pytest.raises(Denied, match="no storage node left"):
        tweak_partition_table(app, False, [_s(1), _s(2)])
    assert app.pt.ptid == 1
    # listed, the down storage is drained
    app.apply_pt_changes(app.pt.outdate(_s(2)))
    changed, rows = tweak_partition_table(app, False, [_s(2)])
    assert changed and app.pt.nids() == {_s(1)} and app.pt.ptid == 3
    app.cluster_state = ClusterStates.RECOVERING
    with pytest.raises(Denied, match=r"^cluster is RECOVERING, not RUNNING$"):
        tweak_partition_table(app, True, [])


def test_admin_tweak_must_stay_operational():
    """Draining a down storage that holds the only readable copy of a
    partition would leave it unreadable for the running storages."""
    from neozodb.master.administration import tweak_partition_table
    from neozodb.net.connection import Denied
    app = _master(running=(1,), table=(1, 2), down=(2,), replicas=0, partitions=2)
    assert app.pt.rows() == [[(_s(1), UP_TO_DATE)], [(_s(2), UP_TO_DATE)]]
    with pytest.raises(Denied, match="would not be operational with the running storages"):
        tweak_partition_table(app, True, [_s(2)])
    assert app.pt.ptid == 1


def test_admin_tweak_topology_warning(caplog):
    from neozodb.master.administration import tweak_partition_table
    for devpath, warned in ((lambda i: (b"host",), True), (lambda i: (b"h%d" % i,), False),
                            (lambda i: (b"host", i), False)):
        app = _master(running=(1, 2), devpath=devpath)
        caplog.clear()
        assert tweak_partition_table(app, True, [])[0] is False
        assert ("topology" in caplog.text) == warned, devpath(1)


def test_admin_set_num_replicas():
    from neozodb.master.administration import set_num_replicas, tweak_partition_table
    from neozodb.net.connection import Denied
    from neozodb.protocol import ClusterStates

    app = _master(running=(1, 2, 3), pending=(4,))
    with pytest.raises(Denied, match=r"^invalid number of replicas: -1 \(must be 0 or more\)$"):
        set_num_replicas(app, -1)
    set_num_replicas(app, 1)  # unchanged: nothing broadcast
    assert app.pt.ptid == 1 and _sent(app, _s(1)) == []
    before = app.pt.rows()
    set_num_replicas(app, 2)
    assert (app.pt.ptid, app.pt.num_replicas, app.num_replicas) == (2, 2, 2)
    assert app.pt.rows() == before  # no cell moved
    for nid in (_s(1), _s(2), _s(3), _admin()):
        assert _sent(app, nid) == [("NotifyPartitionChanges", (2, 2, []))]
    assert _sent(app, _s(4)) == []
    changed, rows = tweak_partition_table(app, True, [])
    assert changed and all(len(row) == 3 for row in rows)
    app.cluster_state = ClusterStates.VERIFYING
    with pytest.raises(Denied, match=r"^cluster is VERIFYING, not RUNNING$"):
        set_num_replicas(app, 0)
