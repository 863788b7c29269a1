"""A storage's durable memory of the partition tables it was given, for
``neoctl print pt_history`` and ``recover_pt`` (master/older_tables.py).

What is kept is what the master needs to tell whether an older table
could serve again with the storages present, and up to which TID: a list
of *entries* ``(ptid, end, readable)``, oldest first.  An entry starts
when our set of readable partitions (UP_TO_DATE or FEEDING cells) changes;
it covers every table from its ``ptid`` to the next entry's (or to our
current table).  ``end`` is the TID up to which our copies of ``readable``
are complete (None for the current entry: measured when asked).

Why ``end`` is the greatest committed TID of our readable partitions:
while a cell is readable, every transaction touching its partition is
locked here, in TID order, and the master unlocks them in that order, so
having committed TID X means having every earlier one of those partitions.
It is a lower bound: transactions after X that touched none of them are
not counted, which only makes a truncation deeper than it had to be.

The entries always describe data we still hold:

- a partition that is no longer ours (DISCARDED: its data is dropped) or
  CORRUPTED (erased and replicated again) leaves every entry;
- a truncation brings every ``end`` down to its TID.

Stored through the backend's configuration only (no schema of its own):
a configuration value may be limited to 255 bytes (MariaDB's ``config``
table, as NEO's), so the encoded history is cut into chunks, written under
keys of one generation out of two, then the pointer key names the new
generation: a crash in between leaves the previous history whole.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import NamedTuple

log = logging.getLogger("neozodb.storage")

#: Entries kept: each is a change of our readable partitions (a lost or
#: returning storage, a tweak, a replication finished).
MAX_ENTRIES = 16
POINTER_KEY = "pt_history"       # "<generation> <number of chunks>"
CHUNK_KEY = "pt_history.%d.%d"   # generation parity, chunk index
CHUNK_SIZE = 200                 # characters, under 255 with room to spare


class Entry(NamedTuple):
    ptid: int
    end: int | None
    readable: frozenset[int]


def encode(entries: Iterable[Entry]) -> str:
    """``ptid,end,bitmap`` per entry (hexadecimal; an empty end is None),
    separated by ``;``: about P/4 characters per entry for P partitions."""
    parts = []
    for ptid, end, readable in entries:
        bitmap = sum(1 << p for p in readable)
        parts.append("%x,%s,%x" % (ptid, "" if end is None else "%x" % end, bitmap))
    return ";".join(parts)


def decode(text: str, num_partitions: int) -> list[Entry]:
    """The entries of ``encode``; ValueError if the text is not one."""
    entries: list[Entry] = []
    if not text:
        return entries
    for part in text.split(";"):
        ptid_text, end_text, bitmap_text = part.split(",")
        bitmap = int(bitmap_text, 16)
        if bitmap >> num_partitions:
            raise ValueError("partition out of range in %r" % part)
        readable = frozenset(p for p in range(num_partitions) if bitmap >> p & 1)
        entries.append(Entry(int(ptid_text, 16), int(end_text, 16) if end_text else None,
                             readable))
    if any(a.ptid >= b.ptid for a, b in zip(entries, entries[1:], strict=False)):
        raise ValueError("partition table ids not increasing")
    return entries


def updated(entries: list[Entry], ptid: int, readable: frozenset[int],
            held: frozenset[int], end_of: Callable[[frozenset[int]], int | None]
            ) -> list[Entry]:
    """The history once we are given table ``ptid`` where our readable
    partitions are ``readable`` and those whose data we keep (every cell
    but CORRUPTED ones) are ``held``.  ``end_of(partitions)``: the greatest
    committed TID we have in them, now."""
    new = [Entry(e.ptid, e.end, e.readable & held) for e in entries if e.ptid <= ptid]
    if new and new[-1].ptid == ptid:  # the same table again (a new master)
        new[-1] = Entry(ptid, None, readable)
    elif not new or new[-1].readable != readable:
        if new:
            last = new[-1]
            new[-1] = Entry(last.ptid, end_of(last.readable), last.readable)
        new.append(Entry(ptid, None, readable))
    else:
        new[-1] = Entry(new[-1].ptid, None, new[-1].readable)
    return new[-MAX_ENTRIES:]


def packed_up_to(backend, partitions: Iterable[int]) -> int | None:
    """The greatest TID up to which an approved pack order applied (or
    being applied) to ``partitions`` packed: truncating below it loses what
    that pack deleted (revisions superseded, garbage) at the new end."""
    upto = 0
    for p in partitions:
        progress = backend.get_pack_progress(p)
        if progress is not None:
            upto = max(upto, progress[0] if progress[1] is None else progress[1])
    packed = None
    min_tid = 0
    while min_tid <= upto:  # pages: a GC order may list many oids
        orders = backend.get_pack_orders(min_tid, upto, max_oids=100000)
        if not orders:
            break
        for _tid, approved, _, _, pack_tid, _ in orders:
            if approved and (packed is None or pack_tid > packed):
                packed = pack_tid
        min_tid = orders[-1][0] + 1
    return packed


def clamped(entries: list[Entry], tid: int) -> list[Entry]:
    """The history once everything committed after ``tid`` is deleted."""
    return [Entry(e.ptid, None if e.end is None else min(e.end, tid), e.readable)
            for e in entries]


class PartitionHistory:
    """The entries, kept in the backend's configuration."""

    def __init__(self, backend, label: Callable[[], str]) -> None:
        self.backend = backend
        self.label = label
        self.generation = 0
        self.entries: list[Entry] = self._load()

    def _load(self) -> list[Entry]:
        backend = self.backend
        pointer = backend.get_config(POINTER_KEY)
        if pointer is None:
            return []
        try:
            generation, count = map(int, pointer.split())
            chunks = [backend.get_config(CHUNK_KEY % (generation % 2, i)) for i in range(count)]
            if any(c is None for c in chunks):
                raise ValueError("chunk missing")
            entries = decode("".join(chunks), backend.get_num_partitions() or 0)
        except ValueError as e:
            # advisory data: without it only older tables are not offered
            log.warning("%s: partition table history unreadable (%s): started again",
                        self.label(), e)
            return []
        self.generation = generation
        return entries

    def _save(self, entries: list[Entry]) -> None:
        if entries == self.entries:
            return
        text = encode(entries)
        chunks = [text[i:i + CHUNK_SIZE] for i in range(0, len(text), CHUNK_SIZE)]
        generation = self.generation + 1
        for i, chunk in enumerate(chunks):
            self.backend.set_config(CHUNK_KEY % (generation % 2, i), chunk)
        self.backend.set_config(POINTER_KEY, "%d %d" % (generation, len(chunks)))
        self.generation = generation
        self.entries = entries

    def table_changed(self, ptid: int, readable: frozenset[int], held: frozenset[int]) -> None:
        self._save(updated(self.entries, ptid, readable, held, self.end_of))

    def truncated(self, tid: int) -> None:
        self._save(clamped(self.entries, tid))

    def end_of(self, partitions: frozenset[int]) -> int | None:
        ends = [self.backend.last_tid_of(p) for p in partitions]
        return max((e for e in ends if e is not None), default=None)

    def report(self) -> list[Entry]:
        """The entries, the current one's end measured now."""
        entries = list(self.entries)
        if entries:
            last = entries[-1]
            entries[-1] = Entry(last.ptid, self.end_of(last.readable), last.readable)
        return entries
