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

This module holds ``SQLiteBackend`` itself: lifecycle, transaction
control, configuration, partition table and ids.  The rest is in mixins:
``sqlite_schema`` (schema and SQL), ``sqlite_reads`` (reads and metadata
reads), ``sqlite_writes`` (writes and two-phase commit),
``sqlite_replication`` (replication and replica checks) and
``sqlite_pack`` (pack).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from .base import DISCARDED, Backend, PartitionTableRecord
from .sqlite_blobs import BLOB_SCHEMA, BLOB_TABLES, SQLiteBlobs
from .sqlite_pack import SQLitePack
from .sqlite_reads import SQLiteReads
from .sqlite_replication import SQLiteReplication
from .sqlite_schema import (
    _ADD_OBJ,
    _ADD_TRANS,
    _BEGIN,
    _CLEAR_PT,
    _COMMIT,
    _CONFIG_VERSION,
    _DEL_CELL,
    _DEL_CONFIG,
    _DROP,
    _FIND_DATA,
    _GET_CONFIG,
    _GET_PT,
    _HAS_CONFIG,
    _INSERT_DATA,
    _LOCKED_TTRANS_TIDS,
    _MAX_OBJ_OID,
    _MAX_OBJ_TID,
    _MAX_TRANS_TID,
    _MIN_OBJ_TID,
    _MIN_TRANS_TID,
    _NEXT_SERIAL,
    _RELEASE,
    _ROLLBACK,
    _ROLLBACK_TO,
    _SAVEPOINT,
    _SCHEMA,
    _SET_CELL,
    _SET_CONFIG,
    _SYNC_NORMAL,
    _TOBJ_MAX_OIDS,
    SCHEMA_VERSION,
    _pack_oids,
)
from .sqlite_writes import SQLiteWrites

# _ADD_OBJ to _pack_oids: importer.py imports them from here
__all__ = ['SQLiteBackend', 'SCHEMA_VERSION', '_ADD_OBJ', '_ADD_TRANS', '_FIND_DATA',
           '_INSERT_DATA', '_NEXT_SERIAL', '_pack_oids']


class SQLiteBackend(SQLiteReads, SQLiteWrites, SQLiteReplication, SQLitePack, SQLiteBlobs,
                    Backend):
    """Storage backend on a SQLite file (``database`` is its path)."""

    name = 'SQLite'
    errors = (sqlite3.Error,)
    input_errors = (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.DataError,
                    sqlite3.ProgrammingError)

    def __init__(self, database: str, **options: object) -> None:
        self._reject_options(options)
        self.database = database
        self._conn: sqlite3.Connection | None = None
        self._np: int | None = None          # cached number of partitions
        self._keep_pending = False           # pending writes include unlocks/aborts
        self._floor: int | None = None       # cached orphan floor, None: not read yet
        self._floor_checked = 0              # last data id when it was last computed
        self._data_added = 0                 # rows store_data inserted since then
        # In-memory holds on data rows stored for transactions not voted yet.
        self._held: Counter[int] = Counter()
        # group commit: the WAL file's descriptor, opened at the first sync
        self._wal_fd: int | None = None
        self._wal_lock = threading.Lock()  # sync() may run in another thread
        self._defer = False                 # inside sync_later()
        self.unsynced = False

    # -- lifecycle ----------------------------------------------------------

    @property
    def connection(self) -> sqlite3.Connection:
        """The open connection (for SQLite-specific tests and tools)."""
        if self._conn is None:
            raise RuntimeError('backend is not open')
        return self._conn

    def open(self, reset: bool = False) -> None:
        if self._conn is None:
            conn = sqlite3.connect(self.database, isolation_level=None,
                                   check_same_thread=False, cached_statements=256)
            try:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode != 'wal' and self.database != ':memory:':
                    raise RuntimeError(f'cannot use WAL journal on {self.database!r}: {mode}')
                conn.execute(_SYNC_NORMAL)
                conn.execute("PRAGMA foreign_keys=OFF")
            except BaseException:
                conn.close()
                raise
            self._conn = conn
            self._keep_pending = False
            self._held.clear()
        try:
            self._begin()
            if reset:
                self._drop_tables()
                self._held.clear()
            elif self._conn.execute(_HAS_CONFIG).fetchone():
                row = self._conn.execute(_GET_CONFIG, (_CONFIG_VERSION,)).fetchone()
                if row is not None and row[0] != SCHEMA_VERSION:
                    raise ValueError(f'{self.database!r}: unsupported schema version {row[0]}'
                                     f' (expected {SCHEMA_VERSION})')
            self._create_tables()
            self._commit()
        except BaseException:
            self.close()
            raise
        self._np = None
        self._np = self.get_num_partitions()
        self._floor = None

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            if conn.in_transaction:
                # unlocks and aborts are kept; lone store_data rows (never
                # voted) are not
                conn.execute(_COMMIT if self._keep_pending else _ROLLBACK)
            conn.close()
        with self._wal_lock:
            fd, self._wal_fd = self._wal_fd, None
            if fd is not None:
                os.close(fd)
        self._held.clear()
        self._np = None
        self._floor = None

    def erase(self) -> None:
        with self._txn(durable=True):
            self._drop_tables()
            self._create_tables()
        self._held.clear()
        self._np = None
        self._floor = None

    def describe(self) -> str:
        return f'SQLite {sqlite3.sqlite_version} database {self.database!r}'

    def _drop_tables(self) -> None:
        for sql in _DROP:
            self._conn.execute(sql)
        for table in BLOB_TABLES:
            self._conn.execute(f"DROP TABLE IF EXISTS {table}")
        self._next_blob = None

    def _create_tables(self) -> None:
        conn = self._conn
        for sql in (*_SCHEMA, *BLOB_SCHEMA):
            conn.execute(sql)
        if conn.execute(_GET_CONFIG, (_CONFIG_VERSION,)).fetchone() is None:
            conn.execute(_SET_CONFIG, (_CONFIG_VERSION, SCHEMA_VERSION))

    # -- transaction control -------------------------------------------------

    def _begin(self) -> None:
        """Make sure a write transaction is open.

        Writes that need not be durable on their own (store_data, unlock,
        abort) are left pending in the open transaction: the next durable
        commit (vote, lock, config) syncs them with its own rows, and
        ``commit_pending`` bounds how long they wait.  One sync per durable
        point (or per group of them), no other commit."""
        conn = self._conn
        if conn is None:
            raise RuntimeError('backend is not open')
        if not conn.in_transaction:
            conn.execute(_BEGIN)

    def _commit(self) -> None:
        """Commit the open transaction durably (at once, or at the next
        ``sync()`` inside ``sync_later``)."""
        self._conn.execute(_COMMIT)
        self._keep_pending = False
        if self._defer:
            self.unsynced = True
        else:
            self.sync()

    # -- group commit --------------------------------------------------------

    defers_sync = True

    @contextmanager
    def sync_later(self) -> Iterator[None]:
        self._defer = True
        try:
            yield
        finally:
            self._defer = False

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

    @contextmanager
    def _txn(self, durable: bool) -> Iterator[sqlite3.Connection]:
        """One operation; on error only its own writes are undone (a
        savepoint), never the pending writes of earlier operations."""
        self._begin()
        conn = self._conn
        conn.execute(_SAVEPOINT)
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute(_ROLLBACK_TO)
                conn.execute(_RELEASE)
            raise
        conn.execute(_RELEASE)
        if durable:
            self._commit()
        else:
            self._keep_pending = True

    def commit_pending(self) -> None:
        if self._conn is not None and self._conn.in_transaction:
            self._commit()

    def _rollback(self) -> None:
        conn = self._conn
        if conn is not None and conn.in_transaction:
            conn.execute(_ROLLBACK)

    def _partitions(self) -> int:
        np = self._np
        if np is None:
            raise ValueError('number of partitions is not set')
        return np

    # -- configuration ---------------------------------------------------------

    def get_config(self, name: str) -> str | None:
        row = self.connection.execute(_GET_CONFIG, (name,)).fetchone()
        return None if row is None else row[0]

    def set_config(self, name: str, value: str | None) -> None:
        with self._txn(durable=True):
            self._set_config(name, value)

    def _set_config(self, name: str, value: str | None) -> None:
        if value is None:
            self._conn.execute(_DEL_CONFIG, (name,))
        else:
            self._conn.execute(_SET_CONFIG, (name, str(value)))
        if name == self.CONFIG_PARTITIONS:
            self._np = None if value is None else int(value)

    def get_num_partitions(self) -> int | None:
        if self._conn is not None and self._np is not None:
            return self._np
        return super().get_num_partitions()

    # -- partition table -------------------------------------------------------

    def get_pt(self) -> PartitionTableRecord:
        ptid = self.get_config(self.CONFIG_PTID)
        replicas = self.get_config(self.CONFIG_REPLICAS)
        rows: list[list[tuple[int, int]]] = [[] for _ in range(self._np or 0)]
        for offset, nid, state in self.connection.execute(_GET_PT):
            rows[offset].append((nid, state))
        return (None if ptid is None else int(ptid),
                0 if replicas is None else int(replicas), rows)

    def save_pt(self, ptid: int, num_replicas: int,
                rows: Sequence[Iterable[tuple[int, int]]]) -> None:
        np = self._np
        if np is not None and len(rows) != np:
            raise ValueError(f'partition table has {len(rows)} rows, expected {np}')
        if not rows:
            raise ValueError('empty partition table')
        cells = [(offset, int(nid), int(state))
                 for offset, row in enumerate(rows) for nid, state in row]
        with self._txn(durable=True) as conn:
            conn.execute(_CLEAR_PT)
            conn.executemany(_SET_CELL, cells)
            if np is None:
                self._set_config(self.CONFIG_PARTITIONS, str(len(rows)))
            self._set_config(self.CONFIG_PTID, str(int(ptid)))
            self._set_config(self.CONFIG_REPLICAS, str(int(num_replicas)))

    def change_pt(self, ptid: int, num_replicas: int,
                  changes: Iterable[tuple[int, int, int]]) -> None:
        np = self._partitions()
        changes = [(int(o), int(n), int(s)) for o, n, s in changes]
        for offset, _, _ in changes:
            if not 0 <= offset < np:
                raise ValueError(f'invalid partition {offset}')
        with self._txn(durable=True) as conn:
            for offset, nid, state in changes:
                if state == DISCARDED:
                    conn.execute(_DEL_CELL, (offset, nid))
                else:
                    conn.execute(_SET_CELL, (offset, nid, state))
            self._set_config(self.CONFIG_PTID, str(int(ptid)))
            self._set_config(self.CONFIG_REPLICAS, str(int(num_replicas)))

    # -- ids -----------------------------------------------------------------

    def _scalar(self, sql: str, params: tuple) -> int | None:
        """Value of an aggregate query (MIN/MAX always return one row)."""
        return self.connection.execute(sql, params).fetchone()[0]

    def last_ids(self, partitions: Iterable[int] | None = None
                 ) -> tuple[int | None, int | None]:
        np = self._np
        if np is None:
            return None, None
        wanted = set(range(np) if partitions is None else partitions)
        tids: list[int] = []
        oids: list[int] = []
        # One indexed MAX per partition and table: a global MAX could not
        # use the (partition, ...) indexes.
        for p in wanted:
            for sql, out in ((_MAX_TRANS_TID, tids), (_MAX_OBJ_TID, tids), (_MAX_OBJ_OID, oids)):
                value = self._scalar(sql, (p,))
                if value is not None:
                    out.append(value)
        conn = self.connection
        tids += [tid for p, tid in conn.execute(_LOCKED_TTRANS_TIDS) if p in wanted]
        oids += [oid for p, oid in conn.execute(_TOBJ_MAX_OIDS) if p in wanted]
        return max(tids, default=None), max(oids, default=None)

    def first_tid(self) -> int | None:
        tids = []
        for p in range(self._np or 0):
            for sql in (_MIN_TRANS_TID, _MIN_OBJ_TID):
                value = self._scalar(sql, (p,))
                if value is not None:
                    tids.append(value)
        return min(tids, default=None)
