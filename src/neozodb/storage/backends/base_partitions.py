"""The part of the storage backend interface that works on whole
partitions, chunk by chunk, in the storage node's background tasks:
replication between storage nodes (``storage/replicator.py``,
``storage/peers.py``), replica checks (``storage/checker.py``) and pack
(``storage/pack.py``).

:class:`~neozodb.storage.backends.base.Backend` inherits it; the
conventions and the durability contract it follows are in ``base.py``.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator, Sequence

from .records import (
    PackOrderRecord,
    PackProgress,
    PackStep,
    ReplicatedObject,
    ReplicatedTransaction,
)


class PartitionMethods(abc.ABC):
    """Abstract methods (and chunked defaults) of a backend for replication,
    replica checks and pack."""

    # -- replication (storage to storage) ------------------------------------
    #
    # A replicating node copies a partition from a readable replica in
    # chunks: first the transactions (``trans``), then the object revisions
    # (``obj``) ordered by (tid, oid).  The source reads with ``fetch_*``,
    # the destination writes with ``add_*``/``delete_*`` (not durable) and
    # persists its resume point with ``set_replication``, in the same
    # database transaction as the chunk's rows (durable at once, or with
    # them at the next durable point).

    @abc.abstractmethod
    def fetch_tids(self, partition: int, length: int, min_tid: int, max_tid: int) -> list[int]:
        """Committed tids of ``partition`` with ``min_tid <= tid <= max_tid``,
        ascending, at most ``length``."""

    @abc.abstractmethod
    def fetch_object_keys(self, partition: int, length: int, min_tid: int, max_tid: int,
                          min_oid: int) -> list[tuple[int, int]]:
        """Committed revisions of ``partition`` as ``(tid, oid)``, ascending,
        from ``(min_tid, min_oid)`` included up to ``tid <= max_tid``, at most
        ``length``."""

    @abc.abstractmethod
    def fetch_object(self, oid: int, tid: int) -> tuple[int, bytes, bytes, int | None] | None:
        """Revision ``tid`` of ``oid`` as ``(compression, checksum, data,
        data_serial)`` (ZERO_HASH and b'' for a deletion), or None."""

    @abc.abstractmethod
    def add_transaction(self, tid: int, oids: Sequence[int], user: bytes, description: bytes,
                        ext: bytes, packed: bool, ttid: int) -> None:
        """Write a committed transaction received by replication (replaces
        an existing one).  Not durable by itself."""

    @abc.abstractmethod
    def add_object(self, oid: int, tid: int, compression: int, checksum: bytes, data: bytes,
                   data_serial: int | None) -> None:
        """Write a committed object revision received by replication
        (ZERO_HASH and no data: a deletion).  Not durable by itself."""

    def fetch_objects(self, partition: int, keys: Sequence[tuple[int, int]]
                      ) -> Iterator[ReplicatedObject]:
        """The revisions ``(tid, oid)`` of ``partition`` listed in ``keys``
        (ascending, as ``fetch_object_keys`` gives them), in that order;
        revisions that do not exist are skipped.  One ``fetch_object`` each
        here: backends override it to read a chunk at once."""
        for tid, oid in keys:
            row = self.fetch_object(oid, tid)
            if row is not None:
                yield (oid, tid, *row)

    def add_transactions(self, records: Sequence[ReplicatedTransaction]) -> None:
        """``add_transaction`` for each record (backends override it to
        write a chunk at once).  Not durable by itself."""
        for tid, oids, user, description, ext, packed, ttid in records:
            self.add_transaction(tid, oids, user, description, ext, packed, ttid)

    def add_objects(self, partition: int, records: Sequence[ReplicatedObject]) -> None:
        """``add_object`` for each record, all of ``partition`` (backends
        override it to write a chunk at once).  Not durable by itself."""
        for record in records:
            self.add_object(*record)

    @abc.abstractmethod
    def delete_transactions(self, partition: int, tids: Iterable[int]) -> None:
        """Delete committed transactions of ``partition`` (the source does
        not have them), with their pack orders.  Not durable by itself."""

    @abc.abstractmethod
    def delete_objects(self, partition: int, keys: Iterable[tuple[int, int]]) -> None:
        """Delete committed revisions ``(tid, oid)`` of ``partition`` and the
        data rows left unreferenced.  Not durable by itself."""

    @abc.abstractmethod
    def get_replication(self, partition: int) -> tuple[int, int, int] | None:
        """Resume point of an OUT_OF_DATE cell: ``(next_tid, next_obj_tid,
        next_obj_oid)``: transactions below ``next_tid`` and revisions below
        ``(next_obj_tid, next_obj_oid)`` are replicated.  None if unset."""

    @abc.abstractmethod
    def set_replication(self, partition: int, point: tuple[int, int, int] | None,
                        durable: bool = True) -> None:
        """Persist (or, with None, forget) the resume point of ``partition``.
        Durable, with every earlier write; with ``durable=False`` it is
        written in the same database transaction as the earlier writes not
        made durable yet, and becomes durable with them (the next durable
        write or ``commit_pending``): a crash may lose both, never keep the
        point without the rows it covers."""

    @abc.abstractmethod
    def last_tid_of(self, partition: int) -> int | None:
        """Greatest committed tid of ``partition`` in ``trans`` and ``obj``."""

    @abc.abstractmethod
    def drop_partition(self, partition: int, length: int) -> bool:
        """Delete up to ``length`` committed revisions and transactions of
        ``partition`` (a DISCARDED cell, or a corrupted one to replicate
        again) with their orphan data; True if some remain.  Not durable."""

    # -- replica checks --------------------------------------------------------

    @abc.abstractmethod
    def check_tid_range(self, partition: int, length: int, min_tid: int, max_tid: int
                        ) -> tuple[int, bytes, int]:
        """Digest of at most ``length`` transactions of ``partition`` from
        ``min_tid`` to ``max_tid``: ``(count, sha1, last_tid)``; the SHA-1
        covers each tid and its metadata (user, description, extension,
        packed flag, oids).  ``(0, ZERO_HASH, min_tid)`` when there are none."""

    @abc.abstractmethod
    def check_serial_range(self, partition: int, length: int, min_tid: int, max_tid: int,
                           min_oid: int) -> tuple[int, bytes, int, bytes, int]:
        """Digest of at most ``length`` revisions ``(tid, oid)`` of
        ``partition`` from ``(min_tid, min_oid)`` up to ``max_tid``:
        ``(count, tid_sha1, last_tid, oid_sha1, last_oid)``; ``oid_sha1``
        covers each oid with its data checksum and undo back-pointer.
        ``(0, ZERO_HASH, min_tid, ZERO_HASH, min_oid)`` when there are none."""

    # -- pack -------------------------------------------------------------------
    #
    # Pack orders travel with their transaction (vote, lock, unlock,
    # replication); the storage node applies them partition by partition in
    # chunks, with ``pack_partition``, recording its progress in the same
    # database transaction as the deletions.

    @abc.abstractmethod
    def get_pack_orders(self, min_tid: int = 0, max_tid: int | None = None,
                        max_oids: int | None = None) -> list[PackOrderRecord]:
        """Committed pack orders with ``min_tid <= tid <= max_tid``, ascending;
        with ``max_oids``, the first ones until their oids add up to more
        than that (at least one)."""

    @abc.abstractmethod
    def add_pack_order(self, order: PackOrderRecord) -> None:
        """Record a committed pack order received by replication (replaces
        an existing one).  Not durable by itself."""

    @abc.abstractmethod
    def sign_pack_orders(self, tids: Iterable[int], approved: bool) -> None:
        """Set the approval of committed pack orders.  Not durable by itself."""

    @abc.abstractmethod
    def get_pack_progress(self, partition: int) -> PackProgress | None:
        """Pack progress of ``partition``, None if it never packed."""

    @abc.abstractmethod
    def set_pack_progress(self, partition: int, progress: PackProgress | None) -> None:
        """Set (None: forget) the pack progress of ``partition``.  Not
        durable by itself."""

    @abc.abstractmethod
    def pack_partition(self, partition: int, steps: Sequence[PackStep], min_oid: int,
                       length: int, progress: PackProgress) -> tuple[int | None, int, int]:
        """Apply ``steps`` (see ``revisions_to_delete``) to about ``length``
        objects of ``partition`` from ``min_oid``: delete the revisions they
        doom and the data rows left unreferenced (data still used by a kept
        revision stays), and record ``progress`` with the oid to resume from.
        When every step is partial, only their listed oids are visited.
        Returns ``(next_oid or None when the partition is done, objects
        visited, revisions deleted)``.  Durable (with every earlier write):
        the fsync of a later commit does not have to flush it."""
