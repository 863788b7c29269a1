"""The client's object cache: a Multi-Queue (MQ) cache of object revisions.

Why MQ rather than plain LRU: a ZODB client mixes a small hot working set
(root, catalogs, BTree inner nodes, read on every transaction) with scans
(iteration, reindexing, exports) that touch many objects once.  Under LRU a
scan flushes the hot set; MQ ranks items by access frequency and lets
frequency decay with time, so a scan only churns the lowest queue.

How it works (after Zhou, Philbin and Li, "The Multi-Queue Replacement
Algorithm for Second Level Buffer Caches"):

- Each revision is an item ``(oid, serial, next_serial, data)`` with an
  access ``counter``.  Its level is ``counter.bit_length()`` (1 + log2) capped
  at ``_MAX_LEVEL``; each level >= 1 is an LRU queue of items holding data.
- A logical clock ticks on every access.  An accessed item gets
  ``expire = clock + life_time``; at each access the head of every queue
  above level 1 is checked and, if expired, demoted one level (its counter
  lowered to that level's floor so that frequency actually decays).
- When the data held exceeds ``max_size``, items are evicted from the head
  (least recently used) of the lowest non-empty level.  An evicted item
  keeps its metadata in level 0, the *history queue* (bounded to
  ``max_history`` entries), so that when it is loaded again its frequency
  is remembered and it comes back at a higher level.

Revisions of one oid live in a small list sorted by serial (TIDs are 8-byte
big-endian bytes, so bytes order is numeric order).  A revision is valid for
reads "before" ``t`` when ``serial < t`` and ``next_serial`` is either None
(current) or ``>= t``; the current revision, if cached, is always the last
of its list.  All operations are O(1) amortised, plus O(log r) bisection
over the r revisions of an oid and O(levels) queue checks.

No threads: the client storage calls this under its own lock.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict

__all__ = ["ClientCache"]

# Counters beyond 2**15 rank no higher: past that, a demotion would take
# too many life times to bring an item that stopped being used back down.
_MAX_LEVEL = 16


class _Item:
    __slots__ = ("oid", "serial", "next_serial", "data", "counter", "level", "expire")

    def __init__(
        self, oid: bytes, serial: bytes, next_serial: bytes | None, data: bytes | None
    ) -> None:
        self.oid = oid
        self.serial = serial
        self.next_serial = next_serial
        self.data = data  # None for a history (level 0) entry
        self.counter = 0
        self.level = 0
        self.expire = 0

    def __repr__(self) -> str:
        return "<_Item %s@%s next=%s level=%d counter=%d %s>" % (
            self.oid.hex(),
            self.serial.hex(),
            self.next_serial and self.next_serial.hex(),
            self.level,
            self.counter,
            "history" if self.data is None else "%d bytes" % len(self.data),
        )


def _serial_key(item: _Item) -> bytes:
    return item.serial


class ClientCache:
    """Bounded cache of ``(data, serial, next_serial)`` per oid; see module docstring."""

    def __init__(
        self,
        max_size: int = 20 << 20,
        *,
        life_time: int = 10000,
        max_history: int | None = None,
    ) -> None:
        if max_size < 0:
            raise ValueError("max_size must not be negative")
        self.max_size = max_size
        self.life_time = life_time
        # A history entry costs a couple hundred bytes of metadata; bound the
        # history so it stays small next to the data it describes (NEO's
        # fixed 100000 would be ~20 MB on its own).
        if max_history is None:
            max_history = min(100000, max(1000, max_size >> 8))
        self.max_history = max_history
        self.clear()

    def clear(self) -> None:
        """Forget everything (including the history, the counters and stats)."""
        self._oids: dict[bytes, list[_Item]] = {}
        # _queues[0] is the history (metadata only); items hold data above.
        self._queues: list[OrderedDict[_Item, None]] = [
            OrderedDict() for _ in range(_MAX_LEVEL + 1)
        ]
        self._clock = 0
        self._top = 1  # no queue above this level holds anything
        self._count = 0  # items holding data
        self.size = 0  # bytes of data held
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return "<ClientCache %d revisions, %d/%d bytes, %d hits, %d misses>" % (
            self._count,
            self.size,
            self.max_size,
            self.hits,
            self.misses,
        )

    # -- lookups -----------------------------------------------------------

    def _find(self, oid: bytes, before_tid: bytes | None) -> _Item | None:
        items = self._oids.get(oid)
        if not items:
            return None
        if before_tid is None:
            item = items[-1]
            return item if item.next_serial is None else None
        i = bisect_left(items, before_tid, key=_serial_key)
        if not i:
            return None
        # Only the latest revision older than before_tid can be the one: any
        # earlier one ends (next_serial) at or before that revision.
        item = items[i - 1]
        if item.next_serial is None or item.next_serial >= before_tid:
            return item
        return None

    def load(
        self, oid: bytes, before_tid: bytes | None = None
    ) -> tuple[bytes, bytes, bytes | None] | None:
        """``(data, serial, next_serial)`` of the cached revision, or None.

        ``before_tid`` None asks for the current revision; otherwise for the
        revision visible just before ``before_tid``.  A revision still
        current (``next_serial`` None) answers any ``before_tid`` above its
        serial: the caller never asks beyond ``last_tid + 1``, and every
        invalidation up to ``last_tid`` has been applied here.
        """
        item = self._find(oid, before_tid)
        if item is None or item.data is None:
            self.misses += 1
            return None
        self.hits += 1
        self._access(item)
        return item.data, item.serial, item.next_serial

    # -- updates -----------------------------------------------------------

    def store(self, oid: bytes, data: bytes, serial: bytes, next_serial: bytes | None) -> None:
        """Cache a revision just loaded from a storage.

        A revision already cached is left alone (except that learning its
        ``next_serial`` is kept).  Data larger than half the cache is not
        cached: it would flush most of the cache for one object.
        """
        if next_serial is not None and next_serial <= serial:
            raise ValueError("next_serial must be greater than serial")
        items = self._oids.get(oid)
        if items is None:
            items = self._oids[oid] = []
        i = bisect_left(items, serial, key=_serial_key)
        item = items[i] if i < len(items) and items[i].serial == serial else None
        if item is not None and item.data is not None:
            if item.next_serial is None and next_serial is not None:
                item.next_serial = next_serial
            return
        last = items[-1] if items else None
        if last is not None and last.serial > serial:
            if next_serial is None:
                # Claims to be current, but a newer revision is cached: the
                # caller's view is stale; don't record it.
                self._drop_empty(oid, items)
                return
        elif last is not None and last is not item and last.next_serial is None:
            # A newer revision exists, so `last` is not current any more and
            # its real end is unknown: drop it rather than guess.
            self._remove(last)
            items.pop()
        if len(data) > self.max_size >> 1:
            if item is not None:
                self._remove(item)
                items.remove(item)
            self._drop_empty(oid, items)
            return
        if item is None:
            item = _Item(oid, serial, next_serial, data)
            items.insert(bisect_left(items, serial, key=_serial_key), item)
        else:
            # Revive a history entry: its counter says how often it was used.
            del self._queues[0][item]
            item.data = data
            # An invalidation seen since may have told us more than the caller.
            if next_serial is not None:
                item.next_serial = next_serial
            item.level = 0
        self._count += 1
        self.size += len(data)
        self._access(item)
        self._evict()

    def invalidate(self, oid: bytes, tid: bytes) -> None:
        """A transaction ``tid`` modified ``oid``: its current revision ends at ``tid``."""
        items = self._oids.get(oid)
        if items:
            item = items[-1]
            if item.next_serial is None:
                if item.serial < tid:
                    item.next_serial = tid
                else:
                    # Cannot happen with a consistent caller; never serve it.
                    self._remove(item)
                    items.pop()
                    self._drop_empty(oid, items)

    def committed(self, tid: bytes, stored: dict) -> None:
        """Our own transaction ``tid`` committed ``stored`` (oid -> data,
        None for a deletion): each oid's current revision ends at ``tid``
        and the new one is cached as current.  The same as ``invalidate``
        then ``store`` for each, evicting once at the end: a commit of
        thousands of objects waits for this in ``tpc_finish``."""
        oids = self._oids
        half = self.max_size >> 1
        access = self._access
        added = 0
        for oid, data in stored.items():
            items = oids.get(oid)
            if items:
                last = items[-1]
                if last.serial >= tid:
                    # a revision at or past ours already (a load that raced
                    # with our finish): the careful way
                    self.invalidate(oid, tid)
                    if data is not None:
                        self.store(oid, data, tid, None)
                    continue
                if last.next_serial is None:
                    last.next_serial = tid
                if data is None or len(data) > half:
                    continue
            elif data is None or len(data) > half:
                continue
            else:
                items = oids[oid] = []
            item = _Item(oid, tid, None, data)
            items.append(item)
            self._count += 1
            added += len(data)
            access(item)
        self.size += added
        self._evict()

    def forget(self, oid: bytes) -> None:
        """Drop every revision of ``oid`` (it was garbage collected)."""
        for item in self._oids.pop(oid, ()):
            self._remove(item)

    def drop_history(self, pack_tid: bytes) -> None:
        """Drop the revisions a pack up to ``pack_tid`` removes from the
        storages: those that stopped being current by then."""
        for oid in list(self._oids):
            items = self._oids[oid]
            kept = [i for i in items if i.next_serial is None or i.next_serial > pack_tid]
            if len(kept) != len(items):
                for item in items:
                    if item not in kept:
                        self._remove(item)
                items[:] = kept
                self._drop_empty(oid, items)

    def clear_current(self) -> None:
        """Drop every current revision (invalidations may have been missed)."""
        for oid in list(self._oids):
            items = self._oids[oid]
            if items[-1].next_serial is None:
                self._remove(items.pop())
                self._drop_empty(oid, items)

    # -- internals -----------------------------------------------------------

    def _drop_empty(self, oid: bytes, items: list[_Item]) -> None:
        if not items:
            del self._oids[oid]

    def _remove(self, item: _Item) -> None:
        """Unlink ``item`` from its queue and the accounting (not from its oid list)."""
        del self._queues[item.level][item]
        if item.data is not None:
            self._count -= 1
            self.size -= len(item.data)
            item.data = None

    def _access(self, item: _Item) -> None:
        self._clock = clock = self._clock + 1
        queues = self._queues
        # Demote expired heads one level; one check per queue per access
        # keeps this O(levels) while every queue still drains over time.
        # The queues above _top are empty: not looked at.
        top = self._top
        while top > 1 and not queues[top]:
            top -= 1
        for level in range(2, top + 1):
            queue = queues[level]
            if queue:
                head = next(iter(queue))
                if head.expire < clock and head is not item:
                    del queue[head]
                    head.level = level - 1
                    head.counter = 1 << (level - 2)
                    head.expire = clock + self.life_time
                    queues[level - 1][head] = None
        if item.counter < 1 << (_MAX_LEVEL - 1):
            item.counter += 1
        level = item.counter.bit_length()
        if level == item.level:
            queues[level].move_to_end(item)
        else:
            if item.level:
                del queues[item.level][item]
            item.level = level
            queues[level][item] = None
        self._top = level if level > top else top
        item.expire = clock + self.life_time

    def _evict(self) -> None:
        queues = self._queues
        level = 1
        while self.size > self.max_size:
            queue = queues[level]
            if not queue:
                level += 1
                continue
            item, _ = queue.popitem(last=False)
            self._count -= 1
            self.size -= len(item.data)
            # Keep the metadata so the frequency survives eviction.
            item.data = None
            item.level = 0
            queues[0][item] = None
        history = queues[0]
        while len(history) > self.max_history:
            item, _ = history.popitem(last=False)
            items = self._oids[item.oid]
            items.remove(item)
            self._drop_empty(item.oid, items)

    def _check(self) -> None:
        """Verify internal invariants (for tests)."""
        count = size = 0
        seen = 0
        for oid, items in self._oids.items():
            assert items, oid
            serials = [item.serial for item in items]
            assert serials == sorted(set(serials)), items
            for item in items[:-1]:
                assert item.next_serial is not None, items
            for item in items:
                assert item.oid == oid
                assert item in self._queues[item.level], item
                if item.data is None:
                    assert item.level == 0, item
                else:
                    assert item.level >= 1, item
                    count += 1
                    size += len(item.data)
                seen += 1
        assert seen == sum(len(q) for q in self._queues)
        assert count == self._count and size == self.size, (count, size)
        assert size <= self.max_size
        assert len(self._queues[0]) <= self.max_history
        assert not any(self._queues[self._top + 1:]), self._top
