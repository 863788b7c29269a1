"""The partition table, shared by every node type.

Objects and transactions are placed by ``u64(oid_or_tid) % num_partitions``;
each partition (row) has cells ``(nid, state)`` on storage nodes, ideally
``num_replicas + 1`` of them.  The master owns the table and broadcasts
changes, each bumping the table id (``ptid``); the other nodes keep a copy
and check that changes arrive in sequence.

This module is pure: it imports nothing else of neozodb (cell states are
plain ints with the wire values of ``CellStates``; wire enums are accepted
wherever a state is given, through their ``.value``) and does no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "CELL_STATE_NAMES",
    "CORRUPTED",
    "DISCARDED",
    "FEEDING",
    "OUT_OF_DATE",
    "UP_TO_DATE",
    "PartitionTable",
]

# Cell states: same values as the wire enum CellStates.
OUT_OF_DATE = 0
UP_TO_DATE = 1
FEEDING = 2
CORRUPTED = 3
DISCARDED = 4

CELL_STATE_NAMES = {
    OUT_OF_DATE: "OUT_OF_DATE",
    UP_TO_DATE: "UP_TO_DATE",
    FEEDING: "FEEDING",
    CORRUPTED: "CORRUPTED",
    DISCARDED: "DISCARDED",
}

# One letter per cell state in `neoctl print pt` (DISCARDED cells do not exist).
_CELL_LETTERS = {OUT_OF_DATE: "O", UP_TO_DATE: "U", FEEDING: "F", CORRUPTED: "C"}

# FEEDING cells are still complete copies (kept readable until their
# replacement has caught up), so they serve reads.
_READABLE = frozenset((UP_TO_DATE, FEEDING))


def _state(state: Any) -> int:
    """Normalise a cell state given as an int or a wire enum (``.value``)."""
    value = getattr(state, "value", state)
    if type(value) is not int or value not in CELL_STATE_NAMES:
        raise ValueError("invalid cell state: %r" % (state,))
    return value


def _storage_name(nid: int) -> str:
    return "S%d" % nid


class PartitionTable:
    """Rows of ``{nid: state}``; see the module docstring.

    Not thread-safe: a client wraps it with its own lock.
    """

    __slots__ = ("num_partitions", "num_replicas", "ptid", "_rows")

    def __init__(self, num_partitions: int, num_replicas: int) -> None:
        # 0 is allowed: it is how an empty table arrives on the wire (rows
        # of a cluster that has none yet), and callers size it from the rows.
        if num_partitions < 0:
            raise ValueError("num_partitions must not be negative")
        if num_replicas < 0:
            raise ValueError("num_replicas must not be negative")
        self.num_partitions = num_partitions
        self.num_replicas = num_replicas
        self.ptid: int | None = None
        self._rows: list[dict[int, int]] = [{} for _ in range(num_partitions)]

    def __repr__(self) -> str:
        return "<PartitionTable ptid=%s np=%d nr=%d>" % (
            self.ptid,
            self.num_partitions,
            self.num_replicas,
        )

    # -- building and updating ------------------------------------------

    def make(self, nids: Iterable[int]) -> None:
        """Build a brand-new table (ptid 1) over ``nids``, every cell UP_TO_DATE.

        Cells are dealt round-robin over the sorted nodes: row ``i`` takes the
        ``repeats`` nodes starting at position ``i * repeats``.  Dealing one
        continuous sequence gives every node the same number of cells within
        one, the ``repeats <= len(nids)`` consecutive nodes of a row are
        distinct, and consecutive rows start on different nodes, so that
        sequential OIDs are written in parallel to different storages.
        """
        nodes = sorted(set(nids))
        if not nodes:
            raise ValueError("cannot make a partition table without storage nodes")
        n = len(nodes)
        repeats = min(self.num_replicas + 1, n)
        rows = []
        for offset in range(self.num_partitions):
            start = offset * repeats
            rows.append({nodes[(start + k) % n]: UP_TO_DATE for k in range(repeats)})
        self._rows = rows
        self.ptid = 1

    def load(self, ptid: int | None, num_replicas: int, rows: Sequence[Iterable[Any]]) -> None:
        """Replace the whole table (``SendPartitionTable``, or a persisted copy).

        ``rows`` has one sequence of ``(nid, state)`` per partition; DISCARDED
        cells are not kept since they mean "no cell".
        """
        if len(rows) != self.num_partitions:
            raise ValueError(
                "partition table has %d rows, expected %d" % (len(rows), self.num_partitions)
            )
        new_rows = []
        for row in rows:
            cells = {}
            for nid, state in row:
                state = _state(state)
                if state != DISCARDED:
                    cells[nid] = state
            new_rows.append(cells)
        # Only commit once everything validated, so a bad table changes nothing.
        self._rows = new_rows
        self.ptid = ptid
        self.num_replicas = num_replicas

    def apply_changes(self, ptid: int, num_replicas: int, changes: Iterable[Any]) -> None:
        """Apply ``NotifyPartitionChanges``: ``(offset, nid, state)`` triples.

        A change to DISCARDED removes the cell.  The table id must follow the
        current one exactly: a gap means a lost notification, and the
        receiver must not keep running on a table it knows to be wrong.
        """
        if self.ptid is None:
            raise ValueError("no partition table to change")
        if ptid != self.ptid + 1:
            raise ValueError("partition table id %r does not follow %r" % (ptid, self.ptid))
        checked = []
        for offset, nid, state in changes:
            if not 0 <= offset < self.num_partitions:
                raise ValueError("invalid partition %r" % (offset,))
            checked.append((offset, nid, _state(state)))
        for offset, nid, state in checked:
            row = self._rows[offset]
            if state == DISCARDED:
                row.pop(nid, None)
            else:
                row[nid] = state
        self.ptid = ptid
        self.num_replicas = num_replicas

    def clear(self) -> None:
        """Forget every cell (a client that lost the primary master)."""
        self._rows = [{} for _ in range(self.num_partitions)]
        self.ptid = None

    # -- queries ---------------------------------------------------------

    def rows(self) -> list[list[tuple[int, int]]]:
        """A copy of the table: per partition, ``(nid, state)`` sorted by nid."""
        return [sorted(row.items()) for row in self._rows]

    def cells(self, offset: int) -> list[tuple[int, int]]:
        return sorted(self._rows[offset].items())

    def state_of(self, offset: int, nid: int) -> int | None:
        """The state of nid's cell in partition ``offset``, None if none."""
        return self._rows[offset].get(nid)

    def sole(self, offset: int, nid: int) -> bool:
        """Whether nid has the only cell of partition ``offset``."""
        row = self._rows[offset]
        return len(row) == 1 and nid in row

    def same_cells(self, offsets: Iterable[int]) -> list[int] | None:
        """The storages with a cell in each of partitions ``offsets``, if
        these partitions have the very same cells, all UP_TO_DATE (so that
        each of these storages holds all of them); else None."""
        rows = self._rows
        nids = None
        for offset in offsets:
            row = rows[offset]
            if nids is None:
                nids = sorted(row)
                if not nids:
                    return None
            elif len(row) != len(nids) or any(nid not in row for nid in nids):
                return None
            if any(state != UP_TO_DATE for state in row.values()):
                return None
        return nids

    def readable_nids(self, offset: int) -> list[int]:
        """Nodes that can serve reads of partition ``offset``."""
        return sorted(nid for nid, state in self._rows[offset].items() if state in _READABLE)

    def writable_nids(self, offset: int) -> list[int]:
        """Nodes that must receive writes of partition ``offset``.

        OUT_OF_DATE cells are written too, so that replication only has to
        catch up with what was committed before they were assigned.
        """
        return sorted(nid for nid, state in self._rows[offset].items() if state != CORRUPTED)

    def partition(self, oid_or_tid: int | bytes) -> int:
        """Partition of an OID or TID given as an int or 8 big-endian bytes."""
        if isinstance(oid_or_tid, (bytes, bytearray, memoryview)):
            if len(oid_or_tid) != 8:
                raise ValueError("OID/TID must be 8 bytes, got %d" % len(oid_or_tid))
            oid_or_tid = int.from_bytes(oid_or_tid, "big")
        return oid_or_tid % self.num_partitions

    def nids(self) -> set[int]:
        """Every node holding at least one cell."""
        result: set[int] = set()
        for row in self._rows:
            result.update(row)
        return result

    def partitions_of(self, nid: int, readable: bool = False) -> list[int]:
        """Offsets where ``nid`` has a cell (a readable one if ``readable``)."""
        if readable:
            return [i for i, row in enumerate(self._rows) if row.get(nid) in _READABLE]
        return [i for i, row in enumerate(self._rows) if nid in row]

    def filled(self) -> bool:
        """Every partition has at least one cell."""
        return all(self._rows)

    def operational(self, running: Collection[int], exclude: Collection[int] = frozenset()) -> bool:
        """Every partition has a readable cell on a node of ``running - exclude``.

        ``exclude`` lets the master ask "would we still be operational
        without these nodes?" (vote arbitration, drop requests).
        """
        if not self._rows:
            return False  # no table at all is not a usable one
        alive = set(running).difference(exclude)
        for row in self._rows:
            for nid, state in row.items():
                if state in _READABLE and nid in alive:
                    break
            else:
                return False
        return True

    def outdate(
        self, lost_nid: int, running: Collection[int] | None = None
    ) -> list[tuple[int, int, int]]:
        """Changes to apply because storage ``lost_nid`` is no longer running.

        Its readable cells become OUT_OF_DATE (it will miss writes), and its
        FEEDING cells are DISCARDED (their replacement is elsewhere), except
        where it holds the last readable cell of a row: that one is kept so
        that the cluster can restart from it if it comes back.  If
        ``running`` is given, only readable cells on running nodes count as
        "another readable cell"; otherwise every other readable cell does.

        Returns ``(offset, nid, state)`` without applying them: the master
        applies them with ``apply_changes(ptid + 1, ...)`` and broadcasts.
        """
        changes = []
        for offset, row in enumerate(self._rows):
            state = row.get(lost_nid)
            if state not in _READABLE:
                continue
            for nid, other in row.items():
                if nid != lost_nid and other in _READABLE and (running is None or nid in running):
                    break
            else:
                continue  # last readable copy: keep it
            changes.append((offset, lost_nid, DISCARDED if state == FEEDING else OUT_OF_DATE))
        return changes

    # -- display ---------------------------------------------------------

    def header(self) -> str:
        """First line of ``neoctl print pt``: ``'# ptid: 1, replicas: 1'``."""
        return "# ptid: %s, replicas: %d" % (self.ptid, self.num_replicas)

    def grid(
        self,
        node_state_letters: Mapping[int, str],
        name: Callable[[int], str] = _storage_name,
    ) -> list[str]:
        """Lines of ``neoctl print pt``, e.g. ``'S1 R UUOF.'``.

        One line per storage node (in the table, or among the positive
        nids of ``node_state_letters``, since non-storage nids are negative),
        sorted by nid: name, node state letter ('U' when unknown), then one
        letter per partition.
        """
        nids = self.nids()
        nids.update(nid for nid in node_state_letters if nid > 0)
        lines = []
        for nid in sorted(nids):
            cells = "".join(_CELL_LETTERS[row[nid]] if nid in row else "." for row in self._rows)
            lines.append("%s %s %s" % (name(nid), node_state_letters.get(nid, "U"), cells))
        return lines
