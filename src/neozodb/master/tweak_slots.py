"""Which storage node takes which slot of the layout ``neoctl tweak`` wants.

:mod:`neozodb.master.tweak` fixes the structure of the layout (cells dealt
round-robin over abstract slots) and turns it into cell changes; this
module only chooses the node of each slot.  It is pure: it works on the
matrices the planner computed (how many of a slot's cells each node
already holds, and how much data), never on a partition table.

* :func:`choose_assignment`: the assignment keeping the current cells if
  there is one, else the one maximising the data already in place
  (Hungarian algorithm), under the topology constraint if any;
* :func:`topology_constraint`: the level of topology (host, device, ...)
  that can be honoured, with the group of each node;
* :func:`find_pattern`: whether, and how, groups can be given to the slots
  so that no row holds two nodes of one group.

The rules themselves are described in :mod:`neozodb.master.tweak`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

__all__ = ["choose_assignment", "find_pattern", "topology_constraint"]

# Bound on the (state-independent) search for a topology-compliant pattern,
# so that a hopeless level is given up on quickly and deterministically.
_SEARCH_BUDGET = 200_000
# At most that many compliant patterns are compared for data movement.
_PATTERN_LIMIT = 5_000


# -- assignment of nodes to slots ---------------------------------------


def choose_assignment(
    presence: list[list[int]],
    data: list[list[int]],
    total_cells: int,
    current_cells: int,
    labels: list[int] | None,
    pattern: list[int] | None,
    repeats: int,
    num_partitions: int,
) -> list[int]:
    """``assignment[x]`` = slot of member ``x``; the rules are in the module
    doc of :mod:`neozodb.master.tweak`."""
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
    group_at = _groups_at(assignment, labels)
    return (
        sum(1 for a, others in enumerate(conflicts) for b in others if group_at[a] == group_at[b])
        // 2
    )


def topology_constraint(
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
        pattern = find_pattern(
            labels, conflicts, [len(rows) for rows in slot_rows], num_partitions
        )
        if pattern is not None:
            return level, labels, pattern
    return None, None, None


def find_pattern(
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
