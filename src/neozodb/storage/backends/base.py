"""The interface every storage backend implements (``Backend``), with its
conventions and durability contract.  The methods of its background work
on whole partitions (replication, replica checks, pack) are declared in
``base_partitions.py``, which ``Backend`` inherits.

A backend is the storage node's database: node configuration, its copy of
the partition table, committed transactions (``trans``/``obj``), voted but
unfinished ones (``ttrans``/``tobj``) and content-addressed object data
(``data``).  It is synchronous, owns a single connection and is called from
the node's event loop thread only.

Conventions: OIDs, TIDs and TTIDs are ints below 2**63; checksums are 20-byte
SHA-1 digests of the (possibly compressed) stored bytes; the partition of an
oid is ``oid % num_partitions`` and of a tid (or ttid) ``tid % num_partitions``.

Durability contract (two-phase commit, see DESIGN.md principle 4):

* ``store_data`` writes are *not* durable by themselves; they become durable
  with the next durable commit (normally the vote of their transaction).
* ``store_transaction`` (vote) and ``lock_transaction`` (the commit point)
  are fsynced before they return.
* ``unlock_transaction`` and ``abort_transaction`` commit without fsync: a
  crash may undo them, and that is safe because the lock record is durable
  (verification replays it with ``validate_transaction``) and unfinished
  transactions are dropped at restart (``drop_unfinished``).
* Configuration and partition table changes are fsynced.

Any exception raised by a write method other than argument validation
(``ValueError``) leaves the backend in an unknown state: the caller must stop
using it; the database is recovered from disk on the next ``open``.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from .base_blobs import BlobMethods
from .base_partitions import PartitionMethods

# the record types live in records.py; importers of base keep working
from .records import (  # noqa: F401
    DISCARDED,
    ZERO_HASH,
    ObjectRecord,
    PackOrderRecord,
    PackProgress,
    PackRequest,
    PackStep,
    PartitionTableRecord,
    ReplicatedObject,
    ReplicatedTransaction,
    TransactionMetadata,
    TransactionRecord,
    Unsupported,
    revisions_to_delete,
)


class Backend(PartitionMethods, BlobMethods):
    """Abstract storage node database.

    Subclasses set :attr:`name` (the ``adapter`` name used in configuration)
    and implement every abstract method, those of :class:`PartitionMethods`
    (replication, replica checks, pack) included.  The configuration helpers
    (``get_nid`` ...) and ``validate_transaction`` are written in terms of
    the abstract methods and need not be overridden.
    """

    #: Adapter name, as given in configuration files (case-insensitive).
    name: str = ''

    #: The driver's exceptions: raised out of a write, they leave the
    #: database in an unknown state, and the storage node stops.
    errors: tuple[type[BaseException], ...] = ()
    #: Those of them that a bad value causes, the database intact (the
    #: statement undone): the request fails, the node goes on.
    input_errors: tuple[type[BaseException], ...] = ()

    # Configuration keys stored in the ``config`` table.
    CONFIG_NID = 'nid'
    CONFIG_NAME = 'name'
    CONFIG_PARTITIONS = 'partitions'
    CONFIG_PTID = 'ptid'
    CONFIG_REPLICAS = 'replicas'
    CONFIG_TRUNCATE_TID = 'truncate_tid'

    @abc.abstractmethod
    def __init__(self, database: str, **options: object) -> None:
        """Remember where the database is; do not connect yet.

        ``options`` are backend-specific; unknown ones raise ValueError so a
        typo in a configuration file is reported at startup.
        """

    #: whether store_data (and replication) reuse an identical data row
    deduplicates = True

    def _reject_options(self, options: dict[str, object]) -> None:
        """Raise ValueError for the ``options`` given (not None): for a
        backend that takes none."""
        unknown = sorted(k for k, v in options.items() if v is not None)
        if unknown:
            raise ValueError(f'unknown {self.name} backend option(s): {", ".join(unknown)}')

    # -- lifecycle --------------------------------------------------------

    @abc.abstractmethod
    def open(self, reset: bool = False) -> None:
        """Connect and create the schema if it is missing.

        With ``reset`` every table is dropped first (all data is lost).
        Raises ValueError if the database has an unsupported schema version.
        Durable when it returns.
        """

    # -- group commit -------------------------------------------------------
    # Durable points answered by the node only once synced: a backend that
    # can commit first and sync later lets one sync cover every durable
    # point of a batch (the storage node's group commit).
    defers_sync = False
    unsynced = False  # something committed inside sync_later() awaits sync()

    @contextmanager
    def sync_later(self) -> Iterator[None]:
        """Durable operations inside the block are committed but may not be
        on disk until ``sync()`` returns: the caller must call it before
        saying they are durable.  Without ``defers_sync`` they are durable
        at once (``sync()`` does nothing)."""
        yield

    def sync(self) -> None:  # noqa: B027 - durable at each commit by default
        """Make every operation committed so far durable."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection; idempotent.

        Writes that were not yet committed (``store_data`` rows not followed
        by a commit) are discarded, as a crash would.
        """

    @abc.abstractmethod
    def erase(self) -> None:
        """Drop every piece of data, configuration included, and recreate an
        empty schema (the master told this node it is UNKNOWN).  Durable."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for logs: backend name, version and database location."""

    # -- configuration ----------------------------------------------------

    @abc.abstractmethod
    def get_config(self, name: str) -> str | None:
        """Return the value stored under ``name``, or None if unset."""

    @abc.abstractmethod
    def set_config(self, name: str, value: str | None) -> None:
        """Store ``value`` under ``name`` (None deletes it).  Durable."""

    def get_nid(self) -> int | None:
        """This node's id as assigned by the master, or None."""
        value = self.get_config(self.CONFIG_NID)
        return None if value is None else int(value)

    def set_nid(self, nid: int | None) -> None:
        """Persist this node's id (None forgets it).  Durable."""
        self.set_config(self.CONFIG_NID, None if nid is None else str(int(nid)))

    def get_name(self) -> str | None:
        """Name of the cluster this database belongs to, or None."""
        return self.get_config(self.CONFIG_NAME)

    def set_name(self, name: str) -> None:
        """Persist the cluster name.  Durable."""
        self.set_config(self.CONFIG_NAME, name)

    def get_num_partitions(self) -> int | None:
        """Number of partitions, or None before the first partition table."""
        value = self.get_config(self.CONFIG_PARTITIONS)
        return None if value is None else int(value)

    def set_num_partitions(self, num_partitions: int) -> None:
        """Persist the number of partitions.  Durable.

        It is fixed for the life of a cluster: setting a different value
        than the stored one raises ValueError (``erase`` first).
        """
        num_partitions = int(num_partitions)
        if num_partitions <= 0:
            raise ValueError(f'invalid number of partitions: {num_partitions}')
        current = self.get_num_partitions()
        if current is not None and current != num_partitions:
            raise ValueError(
                f'number of partitions is {current}, cannot change it to {num_partitions}')
        if current is None:
            self.set_config(self.CONFIG_PARTITIONS, str(num_partitions))

    def get_truncate_tid(self) -> int | None:
        """The tid after which the master asked to truncate the database
        (``Truncate``), until ``truncate`` applies it; None if none is pending."""
        value = self.get_config(self.CONFIG_TRUNCATE_TID)
        return None if value is None else int(value)

    def set_truncate_tid(self, tid: int | None) -> None:
        """Persist a pending truncation (None forgets it).  Durable."""
        self.set_config(self.CONFIG_TRUNCATE_TID, None if tid is None else str(int(tid)))

    # -- partition table --------------------------------------------------

    @abc.abstractmethod
    def get_pt(self) -> PartitionTableRecord:
        """Return ``(ptid, num_replicas, rows)``.

        ``rows`` has one list per partition (``num_partitions`` of them, or
        none if it is unset), each a list of ``(nid, cell_state)`` sorted by
        nid.  ``ptid`` is None and ``num_replicas`` 0 when never saved.
        """

    @abc.abstractmethod
    def save_pt(self, ptid: int, num_replicas: int,
                rows: Sequence[Iterable[tuple[int, int]]]) -> None:
        """Replace the whole partition table.  Durable.

        ``rows[offset]`` lists the cells of a partition.  Sets the number of
        partitions to ``len(rows)`` if it was unset, else it must match
        (ValueError).
        """

    @abc.abstractmethod
    def change_pt(self, ptid: int, num_replicas: int,
                  changes: Iterable[tuple[int, int, int]]) -> None:
        """Apply ``(offset, nid, cell_state)`` changes and set ptid/replicas.

        A DISCARDED (4) state removes the cell; any other adds it or updates
        its state.  Durable.
        """

    # -- ids --------------------------------------------------------------

    @abc.abstractmethod
    def last_ids(self, partitions: Iterable[int] | None = None
                 ) -> tuple[int | None, int | None]:
        """Return ``(last_tid, last_oid)``.

        ``last_tid`` is the greatest tid of committed transactions (``trans``),
        committed object revisions (``obj``) and locked transactions
        (``ttrans`` with a tid); ``last_oid`` the greatest oid of ``obj`` and
        ``tobj``.  Restricted to ``partitions`` if given.  None when empty.
        """

    @abc.abstractmethod
    def first_tid(self) -> int | None:
        """Smallest committed tid (``trans`` and ``obj``), or None."""

    # -- reads --------------------------------------------------------------

    @abc.abstractmethod
    def get_object(self, oid: int, tid: int | None = None,
                   before_tid: int | None = None) -> ObjectRecord | None | bool:
        """Read a committed revision of ``oid``.

        At most one of ``tid`` (exact revision) and ``before_tid`` (latest
        revision strictly before it) may be given; with neither, the latest
        revision is read.  Returns:

        * None if ``oid`` has no committed revision at all (OID_DOES_NOT_EXIST);
        * False if it has some, but none matching (OID_NOT_FOUND);
        * else ``(serial, next_serial, compression, checksum, data,
          data_serial)``: ``next_serial`` is the tid of the next revision or
          None; ``data_serial`` is the undo back-pointer (the revision whose
          data this one reuses) or None.  A deletion or undone creation
          gives ``(serial, next_serial, 0, ZERO_HASH, b'', None)``.
        """

    @abc.abstractmethod
    def last_serial(self, oid: int) -> int | None:
        """Tid of the latest committed revision of ``oid``, or None.

        Called for every store (conflict detection): one indexed lookup.
        """

    #: whether ``store_data_many`` saves work over ``store_data`` (a
    #: database server: one round trip for a burst of stores)
    batched_data = False
    #: bursts of fewer stores than this take their rows one at a time
    batched_data_min = 1

    def store_data_many(self, items: list[tuple[bytes, int, bytes, int]]) -> list[int]:
        """``store_data(checksum, compression, data, oid)`` for each item, in
        order: each id is held once per item."""
        return [self.store_data(c, z, d, oid) for c, z, d, oid in items]

    def last_serials(self, oids: list[int]) -> dict[int, int | None]:
        """``last_serial`` of each of ``oids``, for a burst of stores: a
        backend on a database server answers it in one round trip."""
        return {oid: self.last_serial(oid) for oid in oids}

    @abc.abstractmethod
    def get_revision(self, oid: int, tid: int | None = None,
                     before_tid: int | None = None) -> tuple[int, int | None, int | None] | None:
        """Metadata of a committed revision of ``oid``: the one at ``tid``
        exactly, or the latest strictly before ``before_tid`` (one of the
        two must be given), as ``(serial, data_id, value_tid)``; ``data_id``
        is None for a deletion or undone creation, ``value_tid`` is the undo
        back-pointer (or None).  None if there is no such revision.  Used
        to compute undos without reading data."""

    @abc.abstractmethod
    def get_oids_from(self, partition: int, length: int, min_oid: int, tid: int
                      ) -> tuple[list[int], int | None]:
        """Objects of ``partition`` that exist at ``tid``: oids ``>= min_oid``
        whose latest revision ``<= tid`` is not a deletion, ascending.
        At most ``length`` oids are *examined* (deleted ones are skipped but
        counted): returns ``(oids, next_min_oid)``, ``next_min_oid`` being
        where to go on, or None when the partition is exhausted."""

    @abc.abstractmethod
    def load_data(self, data_id: int) -> tuple[bytes, int, bytes] | None:
        """Return ``(checksum, compression, data)`` of a data row, or None if
        it does not exist (used to send back stored data, e.g. on relock)."""

    # -- writes and two-phase commit ----------------------------------------

    @abc.abstractmethod
    def store_data(self, checksum: bytes, compression: int, data: bytes,
                   oid: int | None = None) -> int:
        """Store object data and return its data id.

        ``oid``, the object it is stored for, may place the row (NEO's
        MySQL schema allocates data ids per partition); backends may ignore it.

        A backend that ``deduplicates`` reuses an existing row with the same
        checksum, compression and bytes; one that does not (SQLite without
        ``dedup``, as NEO's storages without ``--dedup``) always inserts.
        The row is *held* (an in-memory reference) until
        ``store_transaction`` references it from ``tobj``, or it is released
        by ``abort_transaction``/``release_data``, so that aborting another
        transaction sharing it cannot delete it.  Not durable by itself: it
        becomes durable with the next durable commit.  ``checksum`` must be
        20 bytes and not ZERO_HASH (deletions have no data row): ValueError.
        """

    @abc.abstractmethod
    def hold_data(self, data_id: int) -> None:
        """Take one more hold on an existing data row, as ``store_data``
        does: an undo record reusing the data of an older revision (a
        back-pointer) keeps it from being pruned until its vote."""

    @abc.abstractmethod
    def release_data(self, data_ids: Iterable[int], prune: bool = False) -> None:
        """Drop one hold on each of ``data_ids`` (as taken by ``store_data``).

        With ``prune``, rows left unreferenced (no ``obj``/``tobj`` row, no
        hold) are deleted, e.g. when a client re-stores an object with other
        data.  Not durable by itself.
        """

    @abc.abstractmethod
    def store_transaction(self, ttid: int,
                          objects: Iterable[tuple[int, int | None, int | None]],
                          txn: TransactionMetadata | None,
                          pack: PackRequest | None = None, durable: bool = True) -> None:
        """Vote: record a transaction in the temporary tables.

        ``objects`` are ``(oid, data_id or None, value_tid or None)`` rows for
        ``tobj`` (data_id None = deletion or undone creation; value_tid = undo
        back-pointer).  ``txn``, given on nodes holding partition(ttid), is
        ``(oids, user, description, ext, packed)`` for ``ttrans``; ``pack``,
        with it, the pack order the transaction carries (not approved yet;
        it follows the transaction: lock, unlock, abort).  Holds on
        the listed data ids are released (``tobj`` now references them).
        Durable (fsynced) when it returns, with every earlier write; with
        ``durable`` false only pending, made durable by the next durable
        operation (a solo vote: its lock, storage/writes.py).
        """

    @abc.abstractmethod
    def lock_transaction(self, ttid: int, tid: int, pack_approved: bool = False) -> None:
        """Record the final ``tid`` of a voted transaction (``ttrans.tid``, if
        this node holds its metadata).  This is the commit point: durable
        when it returns.  ``pack_approved``: the master approved the pack
        order the transaction carries, if any."""

    def lock_bulk(self, ttids: list[int]) -> None:
        """Lock each of ``ttids`` (the transactions of a bulk copy, voted,
        in TID order) with its own TID (TTID = TID).  Durable when it
        returns, as ``lock_transaction``: in one commit where the backend
        can, else in order (a crash then leaves the first ones locked, which
        verification commits: the copy goes on from the last)."""
        for ttid in ttids:
            self.lock_transaction(ttid, ttid)

    @abc.abstractmethod
    def unlock_transaction(self, ttid: int, tid: int) -> None:
        """Finish a locked transaction: move ``ttrans`` to ``trans``, ``tobj``
        to ``obj`` and its pack order to the committed ones, with ``tid``.  Visible to reads at once, but may
        stay pending (not on disk) until the next durable write or
        ``commit_pending``: a crash may undo it and verification replays it
        (``validate_transaction``)."""

    @abc.abstractmethod
    def commit_pending(self) -> None:
        """Write out what non-durable operations left pending (the storage
        node calls it within a second of them)."""

    @abc.abstractmethod
    def abort_transaction(self, ttid: int, data_ids: Iterable[int] = ()) -> None:
        """Forget an unlocked transaction: delete its ``ttrans``/``tobj`` rows
        and pack order.

        ``data_ids`` are the ids ``store_data`` returned for it that were not
        voted yet: their holds are released.  Data rows of the transaction
        that end up referenced by no ``obj``/``tobj`` row and held by no
        other transaction are deleted.  Committed but not fsynced (a lost
        abort is redone by ``drop_unfinished``).  The caller must not abort
        a locked transaction.
        """

    def validate_transaction(self, ttid: int, tid: int) -> None:
        """Lock and unlock ``ttid`` as ``tid`` (verification after a crash
        found it committed elsewhere or locked here).  Durable once the lock
        part is done."""
        self.lock_transaction(ttid, tid)
        self.unlock_transaction(ttid, tid)

    @abc.abstractmethod
    def drop_unfinished(self) -> None:
        """Delete the transactions that are not locked here, and orphan data.

        A transaction is kept only if its ``ttrans`` row has a tid; ``ttrans``
        rows without one (and their pack orders) and ``tobj`` rows of any other ttid (including
        ttids whose metadata lives on another node: verification already
        validated those that were committed) are deleted.  Orphan data rows
        (referenced by no ``obj``/``tobj`` row: left by the dropped rows or
        stored before a crash for a transaction that never voted) are
        deleted too.  Call it only when no transaction is in progress
        (operation start).  Durable.
        """

    @abc.abstractmethod
    def get_locked_transactions(self) -> dict[int, int | None]:
        """Map every ttid present in ``ttrans`` or ``tobj`` to its locked tid,
        or None if this node has no lock record for it."""

    @abc.abstractmethod
    def get_final_tid(self, ttid: int) -> int | None:
        """Tid of the transaction whose ttid is ``ttid``: from ``trans`` if it
        is committed, else from a locked ``ttrans``; None if unknown here."""

    @abc.abstractmethod
    def prune_orphans(self) -> int:
        """Delete every data row referenced by no ``obj``/``tobj`` row and not
        held; return how many.  Scans the whole table (an admin operation)."""

    @abc.abstractmethod
    def truncate(self, tid: int) -> None:
        """Delete everything committed after ``tid`` (``neoctl truncate``).

        In every partition: ``trans`` and ``obj`` rows with a greater tid,
        and the data rows they leave unreferenced (and not held).  Unfinished
        transactions go too: ``ttrans`` rows not locked, or locked at a
        greater tid, and ``tobj`` rows of every ttid not locked here at
        ``tid`` or below, and pack orders of transactions after ``tid``.
        Replication resume points beyond ``tid`` are
        brought back to ``tid + 1`` (what is replicated after the truncation
        must be fetched again).  The pending truncation (``truncate_tid``)
        is forgotten in the same transaction.  Durable.
        """

    # -- metadata reads ------------------------------------------------------

    @abc.abstractmethod
    def get_transaction(self, tid: int) -> TransactionRecord | None:
        """Committed transaction ``tid`` as ``(oids, user, description, ext,
        packed, ttid)``, or None if this node does not have it."""

    @abc.abstractmethod
    def get_object_history(self, oid: int, offset: int, length: int
                           ) -> list[tuple[int, int]] | None:
        """Committed revisions of ``oid`` as ``(serial, size)``, newest first,
        skipping ``offset`` and returning at most ``length``.  ``size`` is the
        stored (possibly compressed) length, 0 for deletions.  None if the
        oid has no revision at all ([] if ``offset`` is past the end)."""

    @abc.abstractmethod
    def get_tids(self, offset: int, length: int, partitions: Iterable[int]) -> list[int]:
        """Committed tids of ``trans`` in ``partitions``, newest first,
        skipping ``offset``, at most ``length`` (undo log): pack
        transactions, and transactions of a partition up to the pack_tid of
        the last (non-partial) pack order applied to it, are left out."""

    @abc.abstractmethod
    def get_tids_from(self, min_tid: int, max_tid: int, length: int,
                      partitions: Iterable[int]) -> list[int]:
        """Committed tids of ``trans`` in ``partitions`` with
        ``min_tid <= tid <= max_tid``, ascending, at most ``length`` (iteration)."""
