"""Where the partitions are, as the client sees them: the running
storages with a writable or readable cell of each partition, cached until
the partition table or a node's state changes (``cells_changed``).  A mixin
of ``ClientApp`` (client/app.py), which owns ``pt``, ``nm`` and the caches."""
from __future__ import annotations

import random
import time

from neozodb.protocol import NodeStates


class Cells:
    def running_storages(self) -> set[int]:
        return {n.nid for n in self.nm.storages(NodeStates.RUNNING)}

    def cells_changed(self) -> None:
        """The partition table or node states changed: recompute cells."""
        self._cells = {}
        self._readable = {}
        self._spread = None

    def spread(self) -> bool:
        """Whether the partitions are not all written to the same storages
        (more storages than copies): then where a transaction's TTID falls
        decides whether its metadata goes to a storage its objects do not
        (feature begin-partition).  Cached as writable_cells."""
        spread = self._spread
        if spread is None:
            pt = self.pt
            running = self.running_storages()
            spread = len({frozenset(n for n in pt.writable_nids(p) if n in running)
                          for p in range(pt.num_partitions)}) > 1
            self._spread = spread
        return spread

    def writable_cells(self, oid_or_tid: bytes) -> list[int]:
        """Running storages with a writable cell for this oid's (or tid's)
        partition; cached until the table or node states change."""
        # Taken before the table: it is replaced (not cleared) after every
        # change, so a result computed from an old table dies with it.
        cache = self._cells
        pt = self.pt
        partition = pt.partition(oid_or_tid)
        cells = cache.get(partition)
        if cells is None:
            running = self.running_storages()
            cells = cache[partition] = [
                n for n in pt.writable_nids(partition) if n in running]
        return cells

    def readable_nids_of(self, partition: int) -> list[int]:
        """Running storages with a readable cell of ``partition``, from a
        random one on (each replica first as often); not to be changed by
        the caller.  Cached as writable_cells: a load computes no set of
        nodes."""
        self.get_master()
        cache = self._readable  # before the table: see writable_cells
        nids = cache.get(partition)
        if nids is None:
            running = self.running_storages()
            nids = cache[partition] = [n for n in self.pt.readable_nids(partition)
                                       if n in running]
        if len(nids) < 2:
            return nids
        start = random.randrange(len(nids))
        return nids[start:] + nids[:start]

    def readable_nids(self, oid: bytes) -> list[int]:
        """readable_nids_of oid's partition, those that could not be reached
        lately last."""
        self.get_master()  # the table comes with the master
        nids = self.readable_nids_of(self.pt.partition(oid))
        if self._unreachable and len(nids) > 1:
            now = time.monotonic()
            nids.sort(key=lambda n: self._unreachable.get(n, 0.0) > now)
        return nids
