"""Which older partition tables could serve again with the storages
present, and up to which TID: the pure core of ``neoctl print pt_history``
and ``neoctl recover_pt PTID`` (the master's side is master/older_pt.py).

Each present storage reports its history (storage/pt_history.py): the
ptid of its current table, and entries ``(ptid, end, readable)`` oldest
first, an entry covering the tables from its ptid to the next entry's, the
last one to the current table; ``end`` is the TID up to which the storage
holds every transaction of those readable partitions.

For a table ``t``, a storage present *holds* partition ``p`` if an entry of
its history covering ``t`` lists ``p``; its copy is complete up to the
``end`` of the last entry of the run of consecutive entries, from that one
on, that keep listing ``p`` (the partition stayed readable there).  The
table is operational if every partition has a holder; the cluster can then
start from it once everything after ``bound`` is deleted, where ``bound``
is, over the partitions, the lowest of their best copy's completeness: the
greatest TID up to which *every* partition has a complete copy.  The new
table has one cell per holder: UP_TO_DATE if its copy is complete up to
``bound``, OUT_OF_DATE (replicated after the start) otherwise.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from neozodb.protocol import CellStates

#: Most entries a storage may report (it keeps 16).
MAX_REPORTED = 64

Entry = tuple[int, "int | None", frozenset]  # (ptid, end, readable partitions)


@dataclass(frozen=True)
class History:
    """What one present storage reported."""
    ptid: int | None                # its current table
    entries: tuple[Entry, ...]      # oldest first
    packed: int | None = None       # greatest TID a pack it applied went up to


@dataclass(frozen=True)
class OlderTable:
    ptid: int
    operational: bool
    #: truncate after it (None: not operational)
    bound: int | None
    #: present storages holding a readable copy of some partition
    storages: tuple[int, ...]
    #: partitions without a holder
    unreadable: tuple[int, ...]
    #: the new table: per partition, (nid, CellStates) (operational only)
    rows: tuple[tuple[tuple[int, CellStates], ...], ...] = ()
    #: greatest TID a pack applied on ``storages`` went up to: above
    #: ``bound``, truncating loses what that pack deleted
    packed: int | None = None


def check_history(num_partitions: int, ptid: int | None, entries: Sequence) -> str | None:
    """Why a storage's answer cannot be used, if so (from the network)."""
    if ptid is not None and ptid < 0:
        return "invalid ptid %r" % ptid
    if len(entries) > MAX_REPORTED:
        return "%d entries" % len(entries)
    previous = 0
    for entry_ptid, _, partitions in entries:
        if not previous < entry_ptid <= (ptid or 0):
            return "ptid %r out of order or after the current table" % entry_ptid
        previous = entry_ptid
        if len(set(partitions)) != len(partitions) or \
                any(not 0 <= p < num_partitions for p in partitions):
            return "invalid partitions in the entry of ptid %d" % entry_ptid
    return None


def _covering(history: History, ptid: int) -> int | None:
    """Index of the entry of ``history`` that covers table ``ptid``."""
    if history.ptid is None or ptid > history.ptid:
        return None  # the storage never had it (down by then)
    found = None
    for i, entry in enumerate(history.entries):
        if entry[0] > ptid:
            break
        found = i
    return found


def _complete(entries: Sequence[Entry], start: int, partition: int) -> int:
    """How far a copy readable in ``entries[start]`` is complete."""
    i = start
    while i + 1 < len(entries) and partition in entries[i + 1][2]:
        i += 1
    end = entries[i][1]
    return 0 if end is None else end  # nothing committed: complete up to nothing


def older_table(num_partitions: int, histories: Mapping[int, History], ptid: int
                ) -> OlderTable:
    """What table ``ptid`` is worth with the storages of ``histories``."""
    holders: list[dict[int, int]] = [{} for _ in range(num_partitions)]
    for nid, history in histories.items():
        index = _covering(history, ptid)
        if index is None:
            continue
        for p in history.entries[index][2]:
            holders[p][nid] = _complete(history.entries, index, p)
    unreadable = tuple(p for p, row in enumerate(holders) if not row)
    storages = tuple(sorted({nid for row in holders for nid in row}))
    packed = max((histories[nid].packed for nid in storages
                  if histories[nid].packed is not None), default=None)
    if unreadable:
        return OlderTable(ptid, False, None, storages, unreadable, packed=packed)
    bound = min(max(row.values()) for row in holders)
    rows = tuple(tuple((nid, CellStates.UP_TO_DATE if complete >= bound
                        else CellStates.OUT_OF_DATE) for nid, complete in sorted(row.items()))
                 for row in holders)
    return OlderTable(ptid, True, bound, storages, (), rows, packed)


def older_tables(num_partitions: int, histories: Mapping[int, History]) -> list[OlderTable]:
    """Every table where a present storage's readable partitions changed,
    newest first."""
    ptids = {entry[0] for h in histories.values() for entry in h.entries}
    return [older_table(num_partitions, histories, ptid) for ptid in sorted(ptids, reverse=True)]
