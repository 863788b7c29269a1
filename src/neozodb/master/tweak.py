"""Rebalancing of the partition table (``neoctl tweak``) and drop checks.

This module is pure: it reads a :class:`~neozodb.pt.PartitionTable` and
returns cell changes ``(offset, nid, state)`` for the master to apply with
``pt.apply_changes(pt.ptid + 1, pt.num_replicas, changes)`` and broadcast.
It never modifies the table it is given.  Here: the structure of the
wanted layout, the cell changes that reach it, and dropping a node; which
node takes which slot (steps 1 and 2 below, and the topology) is chosen by
:mod:`neozodb.master.tweak_slots`.

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
in each (exact as long as there are at most ``_PATTERN_LIMIT`` of them in
:mod:`~neozodb.master.tweak_slots`, i.e. always for small clusters); beyond
that it is best effort (best patterns seen and the repaired unconstrained
optimum, improved by swapping nodes).  If no level can be honoured (too few hosts and devices, or too
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

from neozodb.master.tweak_slots import choose_assignment, topology_constraint
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

    level, labels, pattern = topology_constraint(
        members, repeats, num_partitions, slot_rows, topology
    )
    member_set = set(members)
    current_cells = sum(
        1
        for row in rows
        for nid, state in row.items()
        if nid in member_set and state in (UP_TO_DATE, OUT_OF_DATE)
    )
    assignment = choose_assignment(
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
