"""Importer backend: a SQLite or PostgreSQL backend that starts over an
existing ZODB storage (the *source*, e.g. a FileStorage) and copies it in the background.

``-a Importer -d importer.conf``: the INI file's first section describes
the real backend (``adapter = SQLite`` or ``PostgreSQL``; ``database``,
its file or DSN), the next one the source::

    [neo]
    adapter = SQLite
    database = /var/lib/neo/s1.sqlite
    writeback = false

    [root]
    storage = <filestorage>
        path /var/lib/zope/Data.fs
        read-only true
      </filestorage>

The cluster is usable at once.  The source's transactions are copied in
TID order (``read_source`` then ``import_transactions``, a slice at a time
in the node's loop, see ``neozodb/storage/importer.py``); ``import_tid``, the last
copied transaction, is written in the same database transaction as the rows,
so a restart resumes exactly after it.  Until the copy is done, reads merge
what this database has with the source's revisions not copied yet: the
*gap* ``(import_tid, source_tid]``.  New commits get TIDs after the
source's last one (``last_ids`` includes it), so they never fall in the gap.

Blobs (a source with a ``blob-dir``): a blob revision's record gets its
tail (the content's SHA-256 and size) and its content is copied from the
source's file into the database's chunks, a chunk at a time
(``import_blobs``, which the import task runs a step at a time between
client requests), under a new blob id that ``import_transactions``
attaches to the record's data row in the same database transaction as
``import_tid``: a crash before leaves chunks attached to nothing, which
the next start deletes (``drop_unattached_blobs``), and the transaction
is imported again.  Until then, reads serve the content from the
source's file (``importer_reads``).

While importing, what would need to list the gap is refused with
``Unsupported`` (the node answers BACKEND_NOT_IMPLEMENTED): iterating
transactions or objects past ``import_tid``, the undo log beyond the
transactions committed since the import started, undoing a transaction of
the gap, and serving replication or replica checks.  Loads, history and
transaction metadata work.

This module holds the ``Importer`` mixin (``ImporterBackend`` is it over
SQLite, ``importer_postgresql`` over PostgreSQL): opening the source, the
import state, the copy (``import_transactions``), what writeback reads
(``new_transactions``) and ids.  The rest is in ``importer_config`` (the INI
file), ``importer_source`` (reading the source) and ``importer_reads``
(merged reads and refusals, a mixin).  They need ZODB (the source is opened
with ``ZODB.config``): they are imported only when the Importer adapter is
selected.
"""
from __future__ import annotations

import hashlib
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

from ZODB.utils import u64

from neozodb.protocol.blobs import BLOB_FLAG, add_tail, split_tail

from .base import ZERO_HASH
from .importer_config import ImporterConfig
from .importer_reads import _MAX_TID, ImporterReads
from .importer_source import (
    FileStorageView,
    GenericView,
    ImportRecord,
    ImportTransaction,
    SourceDamaged,
    has_blobs,
    pack_record,
    read_chunks,
    read_source,
    source_view,
)
from .sqlbase import SQLBackend
from .sqlite import (
    _ADD_OBJ,
    _ADD_TRANS,
    SQLiteBackend,
    _pack_oids,
)

CONFIG_SOURCE_TID = 'import_source_tid'    # last tid of the source to import
CONFIG_SOURCE_OID = 'import_source_oid'    # greatest oid of the source
CONFIG_FIRST_TID = 'import_first_tid'      # first tid of the source
CONFIG_IMPORT_TID = 'import_tid'           # last tid imported
CONFIG_IMPORT_COUNT = 'import_count'       # transactions imported so far
CONFIG_SOURCE = 'import_source'            # the source's configuration


class Importer(ImporterReads):
    """The import (a mixin before a SQL backend, ``SQLBackend``): serving
    a ZODB storage until it has copied it."""

    name = 'Importer'

    def __init__(self, database: str, **options: object) -> None:
        self._reject_options(options)
        self.config = ImporterConfig(database)
        super().__init__(self.config.database)
        self.config_path = database
        self.writeback = self.config.writeback
        self.source = None
        self._view: FileStorageView | GenericView | None = None
        self.source_tid = 0          # last tid of the source to import
        self.source_oid: int | None = None
        self.source_first_tid: int | None = None
        self.import_tid = 0          # last tid imported
        self.import_count = 0        # transactions imported (all runs)
        #: called after each commit (unlock) of a new transaction: writeback
        self.on_commit = None
        # blob revisions served from the source: (oid, tid) -> (digest,
        # size) and checksum -> file (importer_reads)
        self._gap_tails: OrderedDict[tuple[int, int], tuple[bytes, int]] = OrderedDict()
        self._gap_files: OrderedDict[bytes, str] = OrderedDict()

    # -- lifecycle ----------------------------------------------------------------------------

    def open(self, reset: bool = False) -> None:
        super().open(reset)
        try:
            if self.source is None:
                self.source = self.config.open_source()
                self._view = source_view(self.source)
            if has_blobs(self.source) and not self.blobs:
                raise ValueError(
                    f'{self.config.path}: [{self.config.source_name}] has blobs (blob-dir)'
                    f' and the {self.config.adapter} backend keeps no blob contents: import'
                    ' into a backend with blobs (SQLite)')
            self._load_import_state()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        super().close()
        source, self.source = self.source, None
        if source is not None:
            source.close()

    def erase(self) -> None:
        super().erase()
        self._load_import_state()

    def _load_import_state(self) -> None:
        if self.get_config(CONFIG_SOURCE_TID) is None:
            self._start_import()
        get = self.get_config
        self.source_tid = int(get(CONFIG_SOURCE_TID))
        oid = get(CONFIG_SOURCE_OID)
        self.source_oid = None if oid is None else int(oid)
        first = get(CONFIG_FIRST_TID)
        self.source_first_tid = None if first is None else int(first)
        self.import_tid = int(get(CONFIG_IMPORT_TID) or 0)
        self.import_count = int(get(CONFIG_IMPORT_COUNT) or 0)
        if get(CONFIG_SOURCE) != self.config.storage:
            import logging
            logging.getLogger('neozodb.storage').warning(
                'the source configuration changed since the import started: it must be the'
                ' same database')
            self.set_config(CONFIG_SOURCE, self.config.storage)

    def _start_import(self) -> None:
        """First open over this database: note what is to be imported."""
        if SQLBackend.last_ids(self)[0] is not None:
            raise ValueError(f'{self.database}: the database already has transactions and no'
                             ' import was started in it: use an empty database')
        source = self.source
        last = u64(source.lastTransaction())
        first = None
        iterator = source.iterator()
        try:
            for txn in iterator:
                first = u64(txn.tid)
                break
        finally:
            close = getattr(iterator, 'close', None)
            if close is not None:
                close()
        max_oid = getattr(source, '_oid', None)   # FileStorage, MappingStorage
        if isinstance(max_oid, bytes) and len(max_oid) == 8:
            max_oid = u64(max_oid)
        else:
            max_oid = max((u64(r.oid) for t in source.iterator() for r in t), default=None)
        with self._txn(durable=True):
            self._set_config(CONFIG_SOURCE_TID, str(last if first is not None else 0))
            self._set_config(CONFIG_SOURCE_OID, None if not max_oid else str(max_oid))
            self._set_config(CONFIG_FIRST_TID, None if first is None else str(first))
            self._set_config(CONFIG_IMPORT_TID, '0')
            self._set_config(CONFIG_IMPORT_COUNT, '0')
            self._set_config(CONFIG_SOURCE, self.config.storage)

    def describe(self) -> str:
        state = ('importing: up to %#x of %#x imported' % (self.import_tid, self.source_tid)
                 if self.importing else 'import finished')
        name = self.source.getName() if self.source is not None else '?'
        return (f'Importer from {name} ({state}) into {self.config.adapter} database'
                f' {self.database!r}'
                + (' with writeback' if self.writeback else ''))

    def native_options(self) -> str:
        """``neostorage`` options serving this database once the import is
        done (no password shown)."""
        database = self.database
        if self.config.adapter == 'PostgreSQL':
            from .postgresql import public_dsn
            database = repr(public_dsn(database))
        return f'-a {self.config.adapter} -d {database}'

    @property
    def importing(self) -> bool:
        """Whether some transactions of the source are not copied yet."""
        return self.import_tid < self.source_tid

    # -- the import ------------------------------------------------------------------------------

    def read_source(self, stop: Callable[[], bool] = lambda: False
                    ) -> Iterator[tuple[ImportTransaction, float | None]]:
        """``read_source`` over what is left to import."""
        return read_source(self.source, self.import_tid, self.source_tid,
                           self.config.compress, stop)

    def import_blobs(self, txns: list[ImportTransaction]) -> Iterator[int]:
        """Copy the contents of the blob revisions of ``txns`` (records
        whose blob is a file of the source) into new blobs of the database,
        a chunk at a time: a generator yielding the bytes of each chunk
        written, so that the caller may let others run between two.  Each
        such record becomes the stored record with its tail and the id of
        its blob (what ``import_transactions`` attaches), in place.  An
        undo's content already imported with the revision it points to is
        not copied again.  SourceDamaged if a file cannot be read (the
        transactions before keep their copies: ``copied``)."""
        for tid, _, _, _, records in txns:
            for i, (oid, compression, _, data, data_txn, blob) in enumerate(records):
                if not isinstance(blob, str):
                    continue
                same = self._imported_blob(oid, data_txn, data)
                if same is not None:
                    records[i] = (oid, *same, data_txn, None)
                    continue
                blob_id = self.new_blob()
                hasher = hashlib.sha256()
                size = 0
                try:
                    for n, chunk in enumerate(read_chunks(blob)):
                        self.store_blob_chunk(blob_id, n, chunk)
                        hasher.update(chunk)
                        size += len(chunk)
                        yield len(chunk)
                except OSError as e:
                    self.drop_blob(blob_id)
                    raise SourceDamaged('cannot read the blob of %#x in transaction %#x (%s):'
                                        ' %s' % (oid, tid, blob, e.strerror or e)) from e
                except BaseException:
                    self.drop_blob(blob_id)
                    raise
                compression, stored = add_tail(compression, data, hasher.digest(), size)
                records[i] = (oid, compression, hashlib.sha1(stored).digest(), stored,
                              data_txn, blob_id)

    def _imported_blob(self, oid: int, data_txn: int | None, data: bytes
                       ) -> tuple[int, bytes, bytes] | None:
        """(compression, checksum, stored) of the imported revision
        ``data_txn`` of ``oid`` if it is this record's with its content."""
        if data_txn is None or data_txn > self.import_tid:
            return None
        found = SQLBackend.fetch_object(self, oid, data_txn)
        if found is None or not found[0] & BLOB_FLAG:
            return None
        compression, checksum, stored, _ = found
        if split_tail(compression, stored)[1] != data or self.blob_missing(checksum):
            return None
        return compression, checksum, stored

    @staticmethod
    def copied(txns: list[ImportTransaction]) -> list[ImportTransaction]:
        """The first transactions of ``txns`` whose blob contents are all
        copied (``import_blobs`` stopped by an error)."""
        done = []
        for txn in txns:
            if any(isinstance(r[5], str) for r in txn[4]):
                break
            done.append(txn)
        return done

    def drop_import_blobs(self, txns: list[ImportTransaction]) -> None:
        """Delete the copies of blob contents of ``txns`` (not imported)."""
        for txn in txns:
            for record in txn[4]:
                if isinstance(record[5], int):
                    self.drop_blob(record[5])

    def import_transactions(self, txns: list[ImportTransaction]) -> None:
        """Copy source transactions, in TID order, each after ``import_tid``
        (others are skipped), and advance ``import_tid`` in the same database
        transaction.  Not durable by itself (``commit_pending``).  Blob
        contents not copied yet (``import_blobs``) are copied first."""
        skipped = [t for t in txns if not self.import_tid < t[0] <= self.source_tid]
        if skipped:
            self.drop_import_blobs(skipped)
        txns = [t for t in txns if self.import_tid < t[0] <= self.source_tid]
        if not txns:
            return
        for _ in self.import_blobs(txns):
            pass
        np = self._partitions()
        with self._txn(durable=False) as conn:
            last = self.import_tid
            for tid, user, description, ext, records in txns:
                if tid <= last:
                    raise ValueError('transactions out of order: %#x after %#x' % (tid, last))
                last = tid
                for oid, compression, checksum, data, data_txn, blob in records:
                    data_id = (None if data is None
                               else self._find_or_insert_data(checksum, compression, data)[0])
                    if blob is not None:
                        # False: that row has its content already (dropped)
                        self.attach_blob(data_id, blob)
                    conn.execute(_ADD_OBJ, (oid % np, oid, tid, data_id, data_txn))
                conn.execute(_ADD_TRANS, (tid % np, tid, False,
                                          _pack_oids([r[0] for r in records]),
                                          user, description, ext, tid))
            self._set_config(CONFIG_IMPORT_TID, str(last))
            self._set_config(CONFIG_IMPORT_COUNT, str(self.import_count + len(txns)))
        self.import_tid = last
        self.import_count += len(txns)

    def new_transactions(self, after: int, limit: int, max_records: int = 1000) -> list:
        """Up to ``limit`` committed transactions after ``after`` and after
        the source's history (fewer once they hold ``max_records`` records),
        with their records, for writeback:
        ``(tid, user, description, ext, [(oid, data or None, data_txn)])``;
        none at or after a transaction that is locked and not unlocked yet
        (TID order)."""
        np = self._np
        if np is None:
            return []
        after = max(after, self.source_tid)
        locked = [tid for tid in self.get_locked_transactions().values() if tid is not None]
        high = min(locked, default=_MAX_TID + 1) - 1
        result = []
        records_count = 0
        for tid in SQLBackend.get_tids_from(self, after + 1, high, limit, range(np)):
            if records_count >= max_records:
                break
            oids, user, description, ext, _, _ = SQLBackend.get_transaction(self, tid)
            records = []
            for oid in oids:
                compression, checksum, data, data_serial = SQLBackend.fetch_object(
                    self, oid, tid)
                if compression & BLOB_FLAG:
                    # the record alone: the source has no blob-dir (with
                    # one, writeback is refused: importer_config)
                    compression, data = split_tail(compression, data)[:2]
                if checksum == ZERO_HASH and not data:
                    value = None
                elif compression == 1:
                    value = zlib.decompress(data)
                else:
                    value = data
                records.append((oid, value, data_serial))
            result.append((tid, user, description, ext, records))
            records_count += len(records)
        return result

    # -- writes ------------------------------------------------------------------------------------

    def unlock_transaction(self, ttid: int, tid: int) -> None:
        super().unlock_transaction(ttid, tid)
        if self.on_commit is not None:
            self.on_commit()

    def truncate(self, tid: int) -> None:
        """Truncating into the source's history while importing: what was
        not imported yet after ``tid`` is forgotten too (the import stops at
        ``tid``)."""
        tid = int(tid)
        if tid < self.source_tid:
            with self._txn(durable=False):
                self._set_config(CONFIG_SOURCE_TID, str(tid))
                if self.import_tid > tid:
                    self._set_config(CONFIG_IMPORT_TID, str(tid))
            self.source_tid = tid
            self.import_tid = min(self.import_tid, tid)
        super().truncate(tid)

    # -- ids -----------------------------------------------------------------------------------------

    def last_ids(self, partitions: Iterable[int] | None = None
                 ) -> tuple[int | None, int | None]:
        last_tid, last_oid = super().last_ids(partitions)
        if self.source_tid:
            last_tid = max(last_tid or 0, self.source_tid)
        if self.source_oid is not None:
            last_oid = max(last_oid or 0, self.source_oid)
        return last_tid, last_oid

    def first_tid(self) -> int | None:
        first = super().first_tid()
        if self.importing and self.source_first_tid is not None:
            return min(first or self.source_first_tid, self.source_first_tid)
        return first


class ImporterBackend(Importer, SQLiteBackend):
    """The import into a SQLite database."""


def importer_backend(database: str, **options: object) -> Importer:
    """The Importer adapter (``-a Importer -d importer.conf``): an
    ``Importer`` over the backend its configuration names."""
    if ImporterConfig(database).adapter == 'PostgreSQL':
        from .importer_postgresql import PostgreSQLImporterBackend
        return PostgreSQLImporterBackend(database, **options)
    return ImporterBackend(database, **options)


def import_all(backend: Importer, chunk: int = 100) -> None:
    """Import everything at once (tests, tools): no event loop."""
    batch: list[ImportTransaction] = []
    for txn, _ in backend.read_source():
        batch.append(txn)
        if len(batch) >= chunk:
            backend.import_transactions(batch)
            batch = []
    backend.import_transactions(batch)
    backend.commit_pending()


# what moved to importer_source.py stays importable from here
__all__ = ['FileStorageView', 'GenericView', 'ImportRecord', 'ImportTransaction',
           'Importer', 'ImporterBackend', 'importer_backend', 'ImporterConfig', 'SourceDamaged', 'import_all', 'pack_record',
           'read_source']
