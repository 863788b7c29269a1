"""Rebalancing of the partition table (``neoctl tweak``) and drop checks.

This module is pure: it reads a :class:`~neozodb.pt.PartitionTable` and
returns cell changes ``(offset, nid, state)`` for the master to apply with
``pt.apply_changes(pt.ptid + 1, pt.num_replicas, changes)`` and broadcast.
It never modifies the table it is given.

Layout
------
Let ``N`` be the storage nodes allowed to hold cells (``nodes - drop``),
``n = len(N)`` and ``r = min(num_replicas + 1, n)``.  The wanted layout deals
the ``num_partitions * r`` cells round-robin over ``n`` abstract *slots*: row
``i`` takes the slots ``(i * r + k) % n`` for ``k < r``.  Dealing one
continuous sequence gives every slot the same number of cells within one,
puts the ``r`` cells of a row on distinct slots, and makes consecutive rows
start on different slots unless ``r == n`` (then every row holds every node).

Only which node goes to which slot is chosen, to minimise data movement:

1. If some assignment reproduces exactly the current non-feeding cells
   (UP_TO_DATE / OUT_OF_DATE) of ``N``, it is kept: a tweak right after
   applying the previous one changes nothing.
2. Otherwise the assignment maximising the data already in place is
   computed (Hungarian algorithm, exact): a cell already UP_TO_DATE weighs 4,
   FEEDING (a complete copy to take back) 3, OUT_OF_DATE (partial) 1.

Applying the layout to a row:

* a wanted cell that does not exist, or is CORRUPTED, becomes OUT_OF_DATE
  (replication fills it); a wanted FEEDING cell goes back to UP_TO_DATE;
  wanted UP_TO_DATE / OUT_OF_DATE cells are left alone;
* any other cell (on a node not wanted for the row, a drained node, or a node
  in neither ``nodes`` nor ``drop``) goes away.  A readable one (UP_TO_DATE or
  FEEDING) becomes FEEDING, rather than DISCARDED, as long as the row has
  fewer than ``r`` readable cells counting the wanted ones that are already
  readable and the FEEDING ones kept so far: so a partition never loses its
  last readable copies before their replacements caught up.  Among them,
  cells on nodes given in ``nodes``/``drop`` are preferred, then cells on
  ``N``, then cells already FEEDING, then the lowest nid.

The master discards FEEDING cells once the row's replacements are
UP_TO_DATE (replication done), which is outside this module.

Topology
--------
``topology[nid]`` is a path such as ``(hostname, device)``.  For ``L = 1,
2, ...`` (host, then device, ...), nodes are grouped by the first ``L``
elements of their path (a node without a path is a group by itself); the
first level at which there are at least ``r`` groups and some assignment puts
the ``r`` cells of every row in distinct groups is enforced (this choice
depends on the nodes, paths and table size only, never on the cells, so
successive tweaks agree).  Within that level: the exact match of step 1 if
it complies, else the unconstrained optimum if it complies, else every
compliant group-per-slot pattern is tried with the nodes placed optimally
in each (exact as long as there are at most ``_PATTERN_LIMIT`` of them,
i.e. always for small clusters); beyond that it is best effort (best
patterns seen and the repaired unconstrained optimum, improved by swapping
nodes).  If no level can be honoured (too few hosts and devices, or too
uneven to keep the nodes balanced), topology is ignored: balance always
wins.  :func:`plan_tweak` tells which level was enforced, so that the master
can warn.

Trade-off (as in NEO's ideal layout): since the structure depends on ``n``,
changing the number of nodes may move much more than the strict minimum,
e.g. 9 -> 10 nodes, 100 partitions, 1 replica: 150 new cells where 20 would
keep the balance but not the round-robin structure.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from neozodb.pt import (
    CORRUPTED,
    DISCARDED,
    FEEDING,
    OUT_OF_DATE,
    UP_TO_DATE,
    PartitionTable,
)

__all__ = ["TweakPlan", "drop_changes", "drop_check", "plan_tweak", "tweak"]

_READABLE = frozenset((UP_TO_DATE, FEEDING))

# How much of a partition a node already has, for the data-movement score.
_DATA_WEIGHT = {UP_TO_DATE: 4, FEEDING: 3, OUT_OF_DATE: 1}

# Bound on the (state-independent) search for a topology-compliant pattern,
# so that a hopeless level is given up on quickly and deterministically.
_SEARCH_BUDGET = 200_000
# At most that many compliant patterns are compared for data movement.
_PATTERN_LIMIT = 5_000


@dataclass(frozen=True)
class TweakPlan:
    """What :func:`plan_tweak` computed.

    ``changes``: ``(offset, nid, state)`` triples, sorted.
    ``layout``: per partition, the sorted nids of its wanted non-feeding cells.
    ``topology_level``: the path prefix length enforced (1 = host,
    2 = device, ...), or None when no topology applied.
    ``topology_ignored``: some node of ``nodes - drop`` has a topology path
    but no level could be honoured (the master should warn).
    """

    changes: list[tuple[int, int, int]]
    layout: list[tuple[int, ...]]
    topology_level: int | None
    topology_ignored: bool


def tweak(
    pt: PartitionTable,
    nodes: Iterable[int],
    drop: Iterable[int] = (),
    topology: Mapping[int, Sequence[Hashable]] | None = None,
) -> list[tuple[int, int, int]]:
    """Cell changes rebalancing ``pt`` over ``nodes - drop``; see the module doc.

    ``nodes``: storage nids that may hold cells (running, added).  ``drop``:
    nids to drain (whether or not also listed in ``nodes``): they get no new
    cell, do not count as replicas, and keep their readable cells as FEEDING
    until replacements are up to date.  Nodes holding cells but in neither
    set are drained as well.  ``pt`` is not modified.
    """
    return plan_tweak(pt, nodes, drop, topology).changes


def plan_tweak(
    pt: PartitionTable,
    nodes: Iterable[int],
    drop: Iterable[int] = (),
    topology: Mapping[int, Sequence[Hashable]] | None = None,
) -> TweakPlan:
    """Like :func:`tweak`, also returning the layout and topology outcome."""
    nodes = set(nodes)
    drop = set(drop)
    available = nodes | drop
    members = sorted(nodes - drop)
    if not members:
        raise ValueError("no storage node left to hold the partition table")
    rows = [dict(cells) for cells in pt.rows()]
    num_partitions = len(rows)
    n = len(members)
    repeats = min(pt.num_replicas + 1, n)
    slot_rows: list[list[int]] = [[] for _ in range(n)]
    for offset in range(num_partitions):
        for k in range(repeats):
            slot_rows[(offset * repeats + k) % n].append(offset)

    presence = [[0] * n for _ in members]
    data = [[0] * n for _ in members]
    for x, nid in enumerate(members):
        for slot, offsets in enumerate(slot_rows):
            for offset in offsets:
                state = rows[offset].get(nid)
                if state in (UP_TO_DATE, OUT_OF_DATE):
                    presence[x][slot] += 1
                data[x][slot] += _DATA_WEIGHT.get(state, 0)

    level, labels, pattern = _topology_constraint(
        members, repeats, num_partitions, slot_rows, topology
    )
    member_set = set(members)
    current_cells = sum(
        1
        for row in rows
        for nid, state in row.items()
        if nid in member_set and state in (UP_TO_DATE, OUT_OF_DATE)
    )
    assignment = _choose_assignment(
        presence,
        data,
        num_partitions * repeats,
        current_cells,
        labels,
        pattern,
        repeats,
        num_partitions,
    )

    layout = [[] for _ in range(num_partitions)]
    for x, slot in enumerate(assignment):
        for offset in slot_rows[slot]:
            layout[offset].append(members[x])
    changes = []
    for offset, row in enumerate(rows):
        wanted = set(layout[offset])
        readable = 0
        for nid in wanted:
            state = row.get(nid)
            if state is None or state == CORRUPTED:
                changes.append((offset, nid, OUT_OF_DATE))
            else:
                if state == FEEDING:
                    changes.append((offset, nid, UP_TO_DATE))
                if state in _READABLE:
                    readable += 1
        leaving = sorted(
            (nid for nid in row if nid not in wanted),
            key=lambda nid: (
                nid not in available,
                nid not in member_set,
                row[nid] != FEEDING,
                nid,
            ),
        )
        for nid in leaving:
            state = row[nid]
            if state in _READABLE and readable < repeats:
                readable += 1
                if state != FEEDING:
                    changes.append((offset, nid, FEEDING))
            else:
                changes.append((offset, nid, DISCARDED))
    changes.sort()
    _check_safe(rows, changes, available)
    return TweakPlan(
        changes=changes,
        layout=[tuple(sorted(cells)) for cells in layout],
        topology_level=level,
        topology_ignored=level is None
        and topology is not None
        and any(topology.get(nid) for nid in members),
    )


def _check_safe(
    rows: list[dict[int, int]], changes: list[tuple[int, int, int]], available: set[int]
) -> None:
    """Guard: no row loses its last readable cell on an available node."""
    after = [dict(row) for row in rows]
    for offset, nid, state in changes:
        if state == DISCARDED:
            after[offset].pop(nid, None)
        else:
            after[offset][nid] = state
    for offset, (before, row) in enumerate(zip(rows, after, strict=True)):
        if any(s in _READABLE and nid in available for nid, s in before.items()) and not any(
            s in _READABLE and nid in available for nid, s in row.items()
        ):
            raise AssertionError("tweak would make partition %d unreadable" % offset)


# -- assignment of nodes to slots ---------------------------------------


def _choose_assignment(
    presence: list[list[int]],
    data: list[list[int]],
    total_cells: int,
    current_cells: int,
    labels: list[int] | None,
    pattern: list[int] | None,
    repeats: int,
    num_partitions: int,
) -> list[int]:
    """``assignment[x]`` = slot of member ``x``; see the module doc."""
    n = len(data)
    conflicts = _slot_conflicts(n, repeats, num_partitions) if labels is not None else None

    def complies(assignment: list[int]) -> bool:
        return conflicts is None or _violations(assignment, labels, conflicts) == 0

    # The current non-feeding cells of the members form a layout of the
    # structure iff there are as many as wanted and some assignment uses
    # them all: then that layout is the only one with no change.
    if current_cells == total_cells:
        exact = _max_assignment(presence)
        if _score(presence, exact) == total_cells and complies(exact):
            return exact
    best = _max_assignment(data)
    if complies(best):
        return best
    # Topology-constrained.  Every compliant pattern (group per slot) is
    # tried, nodes being placed optimally within each, so the result is
    # optimal unless there are too many of them; then the best seen, the
    # pattern of the feasibility search and the unconstrained optimum
    # repaired by swaps are improved by swaps, and the best one wins.
    assert labels is not None and pattern is not None and conflicts is not None
    result = None
    patterns = _patterns(labels, conflicts)
    for candidate_pattern in patterns:
        candidate = _place(candidate_pattern, data, labels)
        if result is None or _score(data, candidate) > _score(data, result):
            result = candidate
    if patterns.complete and result is not None:
        return result
    candidates = [_place(pattern, data, labels)]
    if result is not None:
        candidates.append(result)
    repaired = _repair(best, data, labels, conflicts)
    if repaired is not None:
        candidates.append(repaired)
    result = None
    for candidate in candidates:
        candidate = _improve(candidate, data, labels, conflicts)
        if result is None or _score(data, candidate) > _score(data, result):
            result = candidate
    return result


class _patterns:
    """Iterate over every compliant pattern (``pattern[slot]`` = group),
    depth-first, within a budget; ``complete`` tells whether all were seen."""

    def __init__(self, labels: list[int], conflicts: list[set[int]]) -> None:
        self.labels = labels
        self.conflicts = conflicts
        self.complete = False

    def __iter__(self):
        n = len(self.labels)
        conflicts = self.conflicts
        remaining: dict[int, int] = {}
        for label in self.labels:
            remaining[label] = remaining.get(label, 0) + 1
        groups = sorted(remaining)
        pattern = [-1] * n
        steps = _SEARCH_BUDGET
        found = 0
        # Explicit stack of (slot, index of the next group to try).
        stack = [0]
        while stack:
            slot = len(stack) - 1
            if slot == n:
                found += 1
                yield list(pattern)
                if found >= _PATTERN_LIMIT:
                    return
                stack.pop()
                continue
            steps -= 1
            if steps < 0:
                return
            index = stack[slot]
            if pattern[slot] >= 0:
                remaining[pattern[slot]] += 1
                pattern[slot] = -1
            used = {pattern[other] for other in conflicts[slot]}
            while index < len(groups):
                label = groups[index]
                index += 1
                if remaining[label] and label not in used:
                    pattern[slot] = label
                    remaining[label] -= 1
                    break
            if pattern[slot] < 0:
                stack.pop()
                continue
            stack[slot] = index
            stack.append(0)
        self.complete = True


def _place(pattern: list[int], data: list[list[int]], labels: list[int]) -> list[int]:
    """Best assignment of the nodes to the slots of their group in ``pattern``."""
    assignment = [0] * len(labels)
    for label in set(labels):
        nodes = [x for x, group in enumerate(labels) if group == label]
        slots = [slot for slot, group in enumerate(pattern) if group == label]
        placed = _max_assignment([[data[x][slot] for slot in slots] for x in nodes])
        for x, column in zip(nodes, placed, strict=True):
            assignment[x] = slots[column]
    return assignment


def _score(weights: list[list[int]], assignment: list[int]) -> int:
    return sum(weights[x][slot] for x, slot in enumerate(assignment))


def _max_assignment(weights: list[list[int]]) -> list[int]:
    """Assignment (row -> column) of maximum total weight, square matrix.

    Hungarian method with potentials (shortest augmenting paths), O(n^3):
    rows are added one at a time and the potentials ``u``/``v`` keep every
    reduced cost ``-w[i][j] - u[i] - v[j]`` non-negative, zero on the
    matching.  Deterministic for a given matrix.
    """
    n = len(weights)
    inf = float("inf")
    u = [0] * (n + 1)
    v = [0] * (n + 1)
    owner = [0] * (n + 1)  # owner[column] = row (1-based), 0 = free
    for row in range(1, n + 1):
        owner[0] = row
        column = 0
        reach = [inf] * (n + 1)
        back = [0] * (n + 1)
        seen = [False] * (n + 1)
        while True:
            seen[column] = True
            current = owner[column]
            delta = inf
            nxt = 0
            line = weights[current - 1]
            for j in range(1, n + 1):
                if not seen[j]:
                    reduced = -line[j - 1] - u[current] - v[j]
                    if reduced < reach[j]:
                        reach[j] = reduced
                        back[j] = column
                    if reach[j] < delta:
                        delta = reach[j]
                        nxt = j
            for j in range(n + 1):
                if seen[j]:
                    u[owner[j]] += delta
                    v[j] -= delta
                else:
                    reach[j] -= delta
            column = nxt
            if owner[column] == 0:
                break
        while column:
            prev = back[column]
            owner[column] = owner[prev]
            column = prev
    result = [0] * n
    for j in range(1, n + 1):
        result[owner[j] - 1] = j - 1
    return result


# -- topology ---------------------------------------------------------------


def _slot_conflicts(n: int, repeats: int, num_partitions: int) -> list[set[int]]:
    """Slots sharing a row with each slot (the rows' windows of slots)."""
    conflicts: list[set[int]] = [set() for _ in range(n)]
    for start in {(offset * repeats) % n for offset in range(num_partitions)}:
        window = [(start + k) % n for k in range(repeats)]
        for a in window:
            conflicts[a].update(b for b in window if b != a)
    return conflicts


def _violations(assignment: list[int], labels: list[int], conflicts: list[set[int]]) -> int:
    """Pairs of conflicting slots holding nodes of the same group."""
    group_at = [0] * len(assignment)
    for x, slot in enumerate(assignment):
        group_at[slot] = labels[x]
    return (
        sum(1 for a, others in enumerate(conflicts) for b in others if group_at[a] == group_at[b])
        // 2
    )


def _topology_constraint(
    members: list[int],
    repeats: int,
    num_partitions: int,
    slot_rows: list[list[int]],
    topology: Mapping[int, Sequence[Hashable]] | None,
) -> tuple[int | None, list[int] | None, list[int] | None]:
    """``(level, labels, pattern)`` to enforce, or ``(None, None, None)``.

    ``labels[x]`` is the group of member ``x``; ``pattern[slot]`` a group per
    slot proving the level feasible.  When the level puts every node in its
    own group, nothing needs enforcing and labels/pattern are None.  The
    result only depends on the nodes, their paths and the table size, never
    on the cells, so successive tweaks agree on it.
    """
    if not topology:
        return None, None, None
    paths = {nid: tuple(topology.get(nid) or ()) for nid in members}
    depth = max(map(len, paths.values()))
    if depth == 0:
        return None, None, None
    n = len(members)
    conflicts = _slot_conflicts(n, repeats, num_partitions)
    for level in range(1, depth + 1):
        keys = [paths[nid][:level] if paths[nid] else ("", nid) for nid in members]
        index: dict[tuple, int] = {}
        labels = [index.setdefault(key, len(index)) for key in keys]
        if len(index) == n:
            return level, None, None  # every node its own group: trivially spread
        if len(index) < repeats:
            continue
        pattern = _find_pattern(
            labels, conflicts, [len(rows) for rows in slot_rows], num_partitions
        )
        if pattern is not None:
            return level, labels, pattern
    return None, None, None


def _find_pattern(
    labels: list[int], conflicts: list[set[int]], slot_sizes: list[int], num_partitions: int
) -> list[int] | None:
    """A group per slot (as many slots per group as it has nodes) such that
    conflicting slots have different groups, or None (also when the search
    budget runs out).  Depth-first, deterministic."""
    n = len(labels)
    size: dict[int, int] = {}
    for label in labels:
        size[label] = size.get(label, 0) + 1
    if any(conflicts):
        # Necessary condition: a group has at most one cell per row, and its
        # nodes hold at least the cells of the smallest slots.
        smallest = sorted(slot_sizes)
        if any(sum(smallest[:count]) > num_partitions for count in size.values()):
            return None
    remaining = dict(size)
    groups = sorted(size, key=lambda g: (-size[g], g))  # largest groups first
    pattern = [-1] * n
    budget = [_SEARCH_BUDGET]

    def search(slot: int) -> bool:
        if slot == n:
            return True
        budget[0] -= 1
        if budget[0] < 0:
            return False
        used = {pattern[other] for other in conflicts[slot]}
        fresh_sizes_tried = set()
        for label in groups:
            count = remaining[label]
            if not count or label in used:
                continue
            if count == size[label]:
                # Groups not placed yet and of equal size are interchangeable.
                if count in fresh_sizes_tried:
                    continue
                fresh_sizes_tried.add(count)
            pattern[slot] = label
            remaining[label] = count - 1
            if search(slot + 1):
                return True
            remaining[label] = count
            pattern[slot] = -1
        return False

    # Slots in their natural (cyclic) order: a row is a window of
    # consecutive slots, so clashes are detected as early as possible.
    return pattern if search(0) else None


def _groups_at(assignment: list[int], labels: list[int]) -> list[int]:
    group_at = [0] * len(assignment)
    for x, slot in enumerate(assignment):
        group_at[slot] = labels[x]
    return group_at


def _swap_violations(group_at: list[int], conflicts: list[set[int]], a: int, b: int) -> int:
    """Change in :func:`_violations` if the nodes in slots ``a`` and ``b``
    (of different groups) are swapped."""
    ga, gb = group_at[a], group_at[b]
    delta = 0
    for slot, mine, theirs in ((a, ga, gb), (b, gb, ga)):
        for other in conflicts[slot]:
            if other == a or other == b:
                continue
            group = group_at[other]
            delta += (group == theirs) - (group == mine)
    return delta


def _repair(
    assignment: list[int],
    data: list[list[int]],
    labels: list[int],
    conflicts: list[set[int]],
) -> list[int] | None:
    """Swap nodes of ``assignment`` until it complies (greedy: most
    violations removed, then least data lost), or None if stuck."""
    assignment = list(assignment)
    n = len(assignment)
    group_at = _groups_at(assignment, labels)
    current = _violations(assignment, labels, conflicts)
    while current:
        best = None
        for x in range(n):
            for y in range(x + 1, n):
                if labels[x] == labels[y]:
                    continue
                a, b = assignment[x], assignment[y]
                delta = _swap_violations(group_at, conflicts, a, b)
                if delta >= 0:
                    continue
                loss = data[x][a] + data[y][b] - data[x][b] - data[y][a]
                key = (delta, loss, x, y)
                if best is None or key < best:
                    best = key
        if best is None:
            return None
        delta, _, x, y = best
        a, b = assignment[x], assignment[y]
        assignment[x], assignment[y] = b, a
        group_at[a], group_at[b] = group_at[b], group_at[a]
        current += delta
    return assignment


def _improve(
    assignment: list[int],
    data: list[list[int]],
    labels: list[int],
    conflicts: list[set[int]],
) -> list[int]:
    """Hill-climb from a compliant ``assignment`` by swapping two nodes
    while that keeps it compliant and increases the data score."""
    assignment = list(assignment)
    n = len(assignment)
    group_at = _groups_at(assignment, labels)
    improved = True
    while improved:
        improved = False
        for x in range(n):
            for y in range(x + 1, n):
                a, b = assignment[x], assignment[y]
                gain = data[x][b] + data[y][a] - data[x][a] - data[y][b]
                if gain <= 0:
                    continue
                if labels[x] != labels[y] and _swap_violations(group_at, conflicts, a, b):
                    continue
                assignment[x], assignment[y] = b, a
                group_at[a], group_at[b] = group_at[b], group_at[a]
                improved = True
    return assignment


# -- dropping a node ----------------------------------------------------------


def drop_check(pt: PartitionTable, nid: int, running: Collection[int]) -> str | None:
    """Why storage ``nid`` may not be dropped from ``pt``, or None if it may.

    Dropping is refused when, in some partition, ``nid`` holds a readable
    cell (UP_TO_DATE, or FEEDING) and no other node holds one that is as
    available: another readable cell on a node of ``running`` if ``nid`` is
    running, any other readable cell otherwise (``nid`` being down, its
    copy only matters if it is the last one).  Readable cells of other nodes
    include FEEDING ones: :func:`drop_changes` turns them back to UP_TO_DATE.
    """
    running = set(running)
    lost = []
    for offset in range(pt.num_partitions):
        readable = pt.readable_nids(offset)
        if nid not in readable:
            continue
        others = [other for other in readable if other != nid]
        if nid in running:
            others = [other for other in others if other in running]
        if not others:
            lost.append(offset)
    if not lost:
        return None
    shown = ", ".join(map(str, lost[:10])) + (", ..." if len(lost) > 10 else "")
    return "storage %d holds the only readable copy of partition%s %s" % (
        nid,
        "s" if len(lost) > 1 else "",
        shown,
    )


def drop_changes(pt: PartitionTable, nid: int) -> list[tuple[int, int, int]]:
    """Cell changes removing storage ``nid`` from ``pt`` (check first with
    :func:`drop_check`).

    Its cells are DISCARDED; where that removes a non-feeding cell, FEEDING
    cells of the row (lowest nid first) go back to UP_TO_DATE as long as the
    row has fewer than ``num_replicas + 1`` non-feeding cells, since the move
    they were waiting for is now moot.
    """
    changes = []
    for offset, cells in enumerate(pt.rows()):
        row = dict(cells)
        state = row.pop(nid, None)
        if state is None:
            continue
        changes.append((offset, nid, DISCARDED))
        if state == FEEDING:
            continue
        members = sum(1 for s in row.values() if s != FEEDING)
        for other in sorted(row):
            if members > pt.num_replicas:
                break
            if row[other] == FEEDING:
                changes.append((offset, other, UP_TO_DATE))
                members += 1
    changes.sort()
    return changes
