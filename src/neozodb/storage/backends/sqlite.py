"""SQLite backend (stdlib ``sqlite3``): the embedded default.

One connection in autocommit mode (``isolation_level=None``) with explicit
``BEGIN IMMEDIATE``/``COMMIT``, so that commit points are exactly the ones
the interface documents.  WAL journal: readers never block and a commit is
an append to one file, so one fdatasync of the WAL makes every earlier
commit durable as well.  This is how durability is made cheap:

* the connection runs with ``synchronous=NORMAL``: SQLite writes each
  commit to the WAL but never syncs it (it still syncs the WAL before a
  checkpoint copies it, and the database file after);
* writes that need not be durable on their own (``store_data``, unlock,
  abort, replication rows...) run in a savepoint of one open write
  transaction and stay uncommitted (``commit_pending`` commits and syncs
  them; the storage node calls it within a second of such writes);
* a durable operation (vote, lock, config, partition table, replication
  resume point, pack chunk) commits that transaction with its own rows, then
  ``sync()`` fdatasyncs the WAL file through a descriptor of our own.
  That is exactly what ``synchronous=FULL`` does at each commit; doing it
  ourselves lets the storage node commit several durable points and sync
  them once (``sync_later``: group commit).

See "Durability" in docs/design.md.

Every SQL statement is a module constant, so ``sqlite3``'s statement cache
prepares it once per connection; values are always bound parameters.

This module holds ``SQLiteBackend`` itself: the connection, closing it
and the sync of the WAL; the rest is shared with the other SQL backends
(``sqlbase.SQLBackend``: transaction control, configuration, partition
table, ids) and in its mixins: ``sqlite_schema`` (schema and SQL),
``sqlite_reads`` (reads and metadata reads), ``sqlite_writes`` (writes and
two-phase commit), ``sqlite_replication`` (replication and replica
checks) and ``sqlite_pack`` (pack).
"""

from __future__ import annotations

import os
import sqlite3
import threading

from neozodb.protocol.blobs import BLOB_FLAG

from .base import ZERO_HASH
from .sqlbase import SQLBackend
from .sqlite_blobs import BLOB_SCHEMA, BLOB_TABLES, SQLiteBlobs
from .sqlite_schema import (
    _ADD_OBJ,
    _ADD_TRANS,
    _BLOB_DATA_HASH_INDEX,
    _CACHE_SIZE,
    _COMMIT,
    _DATA_HASH_INDEX,
    _DROP,
    _HAS_DATA_HASH_INDEX,
    _SCHEMA,
    _SYNC_NORMAL,
    SCHEMA_VERSION,
    _insert_rows,
    _pack_oids,
)

# _ADD_OBJ to _pack_oids: importer.py imports them from here
__all__ = ['SQLiteBackend', 'SCHEMA_VERSION', '_ADD_OBJ', '_ADD_TRANS', '_pack_oids']


class SQLiteBackend(SQLiteBlobs, SQLBackend):
    """Storage backend on a SQLite file (``database`` is its path)."""

    name = 'SQLite'
    errors = (sqlite3.Error,)
    input_errors = (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.DataError,
                    sqlite3.ProgrammingError)
    # blob contents (sqlite_blobs.py) beside the shared tables
    _SCHEMA = (*_SCHEMA, *BLOB_SCHEMA)
    _DROP = (*_DROP, *(f"DROP TABLE IF EXISTS {table}" for table in BLOB_TABLES))

    def __init__(self, database: str, dedup: bool | None = None, **options: object) -> None:
        self._reject_options(options)
        super().__init__(database)
        # Without it (the default, as NEO's storages without --dedup) no data
        # row is looked up by hash: the index that finds them costs a store
        # more than the insert itself (bench/README.md, "Deduplication").
        # A database that has the index (made with it, or before it was an
        # option) keeps deduplicating.
        self._want_dedup = bool(dedup)
        self.deduplicates = self._want_dedup
        # group commit: the WAL file's descriptor, opened at the first sync
        self._wal_fd: int | None = None
        self._wal_lock = threading.Lock()  # sync() may run in another thread

    # -- lifecycle ----------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.database, isolation_level=None,
                               check_same_thread=False, cached_statements=256)
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != 'wal' and self.database != ':memory:':
                raise RuntimeError(f'cannot use WAL journal on {self.database!r}: {mode}')
            conn.execute(_SYNC_NORMAL)
            conn.execute("PRAGMA foreign_keys=OFF")
            conn.execute(_CACHE_SIZE)
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        super().close()
        with self._wal_lock:
            fd, self._wal_fd = self._wal_fd, None
            if fd is not None:
                os.close(fd)

    def describe(self) -> str:
        return (f'SQLite {sqlite3.sqlite_version} database {self.database!r}'
                + (', data deduplicated' if self.deduplicates else ''))

    def _drop_tables(self) -> None:
        super()._drop_tables()
        self._next_blob = None
        self._tpack_ttids = None

    def _forget(self) -> None:
        super()._forget()
        self._tpack_ttids = None

    def _create_tables(self) -> None:
        super()._create_tables()
        conn = self._conn
        if self._want_dedup:
            conn.execute(_DATA_HASH_INDEX)
        self.deduplicates = conn.execute(_HAS_DATA_HASH_INDEX).fetchone() is not None
        if not self.deduplicates:
            conn.execute(_BLOB_DATA_HASH_INDEX)

    # -- bulk writes ---------------------------------------------------------

    def _insert_many(self, sql: str, rows: list[tuple]) -> None:
        _insert_rows(self._conn, sql, rows)

    @property
    def batched_data(self) -> bool:
        # without deduplication, a burst's data rows go in with one
        # statement per 100 instead of one each (storage/writes.py, prefetch)
        return not self.deduplicates

    #: smaller bursts are stored one row at a time: allocating the ids
    #: costs two statements
    batched_data_min = 8

    def store_data_many(self, items: list[tuple[bytes, int, bytes, int]]) -> list[int]:
        if self.deduplicates or len(items) < self.batched_data_min or any(
                compression & BLOB_FLAG for _, compression, _, _ in items):
            return [self.store_data(c, z, d, oid) for c, z, d, oid in items]
        for checksum, _, _, _ in items:
            if len(checksum) != 20 or checksum == ZERO_HASH:
                raise ValueError('invalid checksum for a data row')
        self._begin()
        ids = self._insert_data([(checksum, compression, data)
                                 for checksum, compression, data, _ in items])
        self._data_added += len(ids)
        held = self._held
        for data_id in ids:
            held[data_id] += 1
        return list(ids)

    def _commit(self) -> None:
        self._conn.execute(_COMMIT)
        self._keep_pending = False
        if self._defer:
            self.unsynced = True
        else:
            self.sync()

    # -- group commit --------------------------------------------------------

    def sync(self) -> None:
        """fdatasync the WAL: every commit written before the call is
        durable when it returns.  Thread-safe (one descriptor of our own,
        not SQLite's connection)."""
        self.unsynced = False
        if self.database == ':memory:':
            return
        with self._wal_lock:
            fd = self._wal_fd
            if fd is not None and os.fstat(fd).st_nlink == 0:
                # the WAL was deleted (SQLite does when the last connection
                # to the database closes: not ours, but never sync a
                # file that no longer holds the commits)
                os.close(fd)
                fd = self._wal_fd = None
            if fd is None:
                if self._conn is None:
                    # closing the last connection checkpoints the WAL
                    # into the database file and syncs both
                    return
                # the WAL lives as long as our connection: one descriptor
                # for the node's life; its directory entry made durable once
                fd = os.open(self.database + '-wal', os.O_RDONLY)
                try:
                    dir_fd = os.open(os.path.dirname(os.path.abspath(self.database)),
                                     os.O_RDONLY)
                    try:
                        os.fsync(dir_fd)
                    finally:
                        os.close(dir_fd)
                except BaseException:
                    os.close(fd)
                    raise
                self._wal_fd = fd
            os.fdatasync(fd)
