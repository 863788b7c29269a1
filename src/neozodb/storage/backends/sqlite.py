"""SQLite backend (stdlib ``sqlite3``): the embedded default.

One connection in autocommit mode (``isolation_level=None``) with explicit
``BEGIN IMMEDIATE``/``COMMIT``, so that commit points are exactly the ones
the interface documents.  WAL journal: readers never block and a commit is
an append to one file, so one fsync of the WAL makes every earlier commit
durable as well.  This is how durability is made cheap:

* ``store_data`` writes are left in an open transaction running with
  ``synchronous=NORMAL`` (batched, not fsynced);
* durable operations (vote, lock, config, partition table) first commit
  that pending transaction (no fsync), then run their own transaction with
  ``synchronous=FULL``, whose fsync also covers the pending rows;
* unlock and abort commit with ``synchronous=NORMAL``.

``PRAGMA synchronous`` cannot change inside a transaction, hence the
level is switched only between transactions and set back to FULL after each
non-durable commit.

Every SQL statement is a module constant, so ``sqlite3``'s statement cache
prepares it once per connection; values are always bound parameters.
"""

from __future__ import annotations

import hashlib
import heapq
import sqlite3
import struct
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from .base import (
    DISCARDED,
    ZERO_HASH,
    Backend,
    ObjectRecord,
    PackOrderRecord,
    PackProgress,
    PackRequest,
    PackStep,
    PartitionTableRecord,
    TransactionMetadata,
    TransactionRecord,
    revisions_to_delete,
)

SCHEMA_VERSION = '1'

# Data rows are never referenced below this id without being referenced by
# obj/tobj (see drop_unfinished): it bounds the orphan scan at startup.
_CONFIG_ORPHAN_FLOOR = 'orphan_floor'
# Votes and replication chunks raise the floor every this many new data
# ids: the scan after a crash covers about that many rows, plus those still
# held, instead of everything written since the last start.
_FLOOR_STEP = 1000
_CONFIG_VERSION = 'version'

_TABLES = ('config', 'pt', 'trans', 'obj', 'data', 'ttrans', 'tobj', 'replication',
           'pack', 'tpack', 'pack_progress')

# obj and tobj rows are small: WITHOUT ROWID keeps each of them in a single
# b-tree ordered by the primary key used by every read.  trans/ttrans rows
# carry the oid list, too big for that.  data ids use AUTOINCREMENT so an id
# is never reused, which makes the orphan floor meaningful.
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS config (
        name TEXT NOT NULL PRIMARY KEY, value TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS pt (
        partition INTEGER NOT NULL, nid INTEGER NOT NULL, state INTEGER NOT NULL,
        PRIMARY KEY (partition, nid)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS trans (
        partition INTEGER NOT NULL, tid INTEGER NOT NULL, packed BOOLEAN NOT NULL,
        oids BLOB NOT NULL, user BLOB NOT NULL, description BLOB NOT NULL,
        ext BLOB NOT NULL, ttid INTEGER NOT NULL,
        PRIMARY KEY (partition, tid))""",
    """CREATE TABLE IF NOT EXISTS obj (
        partition INTEGER NOT NULL, oid INTEGER NOT NULL, tid INTEGER NOT NULL,
        data_id INTEGER, value_tid INTEGER,
        PRIMARY KEY (partition, oid, tid)) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS obj_tid ON obj (partition, tid, oid)",
    "CREATE INDEX IF NOT EXISTS obj_data_id ON obj (data_id)",
    """CREATE TABLE IF NOT EXISTS data (
        id INTEGER PRIMARY KEY AUTOINCREMENT, hash BLOB NOT NULL,
        compression INTEGER NOT NULL, value BLOB NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS data_hash ON data (hash, compression)",
    """CREATE TABLE IF NOT EXISTS ttrans (
        partition INTEGER NOT NULL, tid INTEGER, packed BOOLEAN NOT NULL,
        oids BLOB NOT NULL, user BLOB NOT NULL, description BLOB NOT NULL,
        ext BLOB NOT NULL, ttid INTEGER NOT NULL PRIMARY KEY)""",
    """CREATE TABLE IF NOT EXISTS tobj (
        partition INTEGER NOT NULL, oid INTEGER NOT NULL, tid INTEGER NOT NULL,
        data_id INTEGER, value_tid INTEGER,
        PRIMARY KEY (tid, oid)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS replication (
        partition INTEGER NOT NULL PRIMARY KEY, next_tid INTEGER NOT NULL,
        next_obj_tid INTEGER NOT NULL, next_obj_oid INTEGER NOT NULL)""",
    # pack orders of committed transactions (by tid) and of voted ones (by
    # ttid); oids NULL: all objects
    """CREATE TABLE IF NOT EXISTS pack (
        tid INTEGER NOT NULL PRIMARY KEY, approved BOOLEAN, partial BOOLEAN NOT NULL,
        oids BLOB, pack_tid INTEGER NOT NULL, gc BOOLEAN NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS tpack (
        ttid INTEGER NOT NULL PRIMARY KEY, approved BOOLEAN, partial BOOLEAN NOT NULL,
        oids BLOB, pack_tid INTEGER NOT NULL, gc BOOLEAN NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS pack_progress (
        partition INTEGER NOT NULL PRIMARY KEY, done INTEGER NOT NULL, target INTEGER,
        next_oid INTEGER NOT NULL)""",
)
_DROP = tuple(f"DROP TABLE IF EXISTS {table}" for table in _TABLES)
_HAS_CONFIG = "SELECT 1 FROM sqlite_master WHERE type='table' AND name='config'"

_BEGIN = "BEGIN IMMEDIATE"
_COMMIT = "COMMIT"
_ROLLBACK = "ROLLBACK"
_SYNC_FULL = "PRAGMA synchronous=FULL"
_SAVEPOINT = "SAVEPOINT op"
_ROLLBACK_TO = "ROLLBACK TO op"
_RELEASE = "RELEASE op"

_GET_CONFIG = "SELECT value FROM config WHERE name=?"
_SET_CONFIG = "INSERT OR REPLACE INTO config (name, value) VALUES (?, ?)"
_DEL_CONFIG = "DELETE FROM config WHERE name=?"

_GET_PT = "SELECT partition, nid, state FROM pt ORDER BY partition, nid"
_CLEAR_PT = "DELETE FROM pt"
_SET_CELL = "INSERT OR REPLACE INTO pt (partition, nid, state) VALUES (?, ?, ?)"
_DEL_CELL = "DELETE FROM pt WHERE partition=? AND nid=?"

_MAX_TRANS_TID = "SELECT MAX(tid) FROM trans WHERE partition=?"
_MAX_OBJ_TID = "SELECT MAX(tid) FROM obj WHERE partition=?"
_MAX_OBJ_OID = "SELECT MAX(oid) FROM obj WHERE partition=?"
_MIN_TRANS_TID = "SELECT MIN(tid) FROM trans WHERE partition=?"
_MIN_OBJ_TID = "SELECT MIN(tid) FROM obj WHERE partition=?"
_LOCKED_TTRANS_TIDS = "SELECT partition, tid FROM ttrans WHERE tid IS NOT NULL"
_TOBJ_MAX_OIDS = "SELECT partition, MAX(oid) FROM tobj GROUP BY partition"

_OBJ_COLUMNS = ("SELECT o.tid, o.value_tid, d.compression, d.hash, d.value"
                " FROM obj AS o LEFT JOIN data AS d ON d.id = o.data_id"
                " WHERE o.partition=? AND o.oid=?")
_GET_LATEST = _OBJ_COLUMNS + " ORDER BY o.tid DESC LIMIT 1"
_GET_AT = _OBJ_COLUMNS + " AND o.tid=?"
_GET_BEFORE = _OBJ_COLUMNS + " AND o.tid<? ORDER BY o.tid DESC LIMIT 1"
_REVISION_AT = "SELECT tid, data_id, value_tid FROM obj WHERE partition=? AND oid=? AND tid=?"
_REVISION_BEFORE = ("SELECT tid, data_id, value_tid FROM obj WHERE partition=? AND oid=?"
                    " AND tid<? ORDER BY tid DESC LIMIT 1")
# With a single MAX() aggregate, SQLite takes the bare columns (data_id)
# from the row holding the maximum: the latest revision up to tid.
_OIDS_FROM = ("SELECT oid, MAX(tid), data_id FROM obj WHERE partition=? AND oid>=?"
              " AND tid<=? GROUP BY oid ORDER BY oid LIMIT ?")
_NEXT_SERIAL = "SELECT MIN(tid) FROM obj WHERE partition=? AND oid=? AND tid>?"
_OID_EXISTS = "SELECT 1 FROM obj WHERE partition=? AND oid=? LIMIT 1"
_LAST_SERIAL = "SELECT MAX(tid) FROM obj WHERE partition=? AND oid=?"
_LOAD_DATA = "SELECT hash, compression, value FROM data WHERE id=?"

_FIND_DATA = "SELECT id FROM data WHERE hash=? AND compression=? AND value=?"
_INSERT_DATA = "INSERT INTO data (hash, compression, value) VALUES (?, ?, ?)"
_DEL_DATA = "DELETE FROM data WHERE id=?"
_DATA_IN_OBJ = "SELECT 1 FROM obj WHERE data_id=? LIMIT 1"
_TOBJ_DATA_IDS = "SELECT DISTINCT data_id FROM tobj WHERE data_id IS NOT NULL"
_MAX_DATA_ID = "SELECT MAX(id) FROM data"
_DATA_NOT_IN_OBJ = ("SELECT id FROM data AS d WHERE id>?"
                    " AND NOT EXISTS (SELECT 1 FROM obj WHERE obj.data_id=d.id)")

_INSERT_TOBJ = ("INSERT OR REPLACE INTO tobj (partition, oid, tid, data_id, value_tid)"
                " VALUES (?, ?, ?, ?, ?)")
_INSERT_TTRANS = ("INSERT OR REPLACE INTO ttrans"
                  " (partition, tid, packed, oids, user, description, ext, ttid)"
                  " VALUES (?, NULL, ?, ?, ?, ?, ?, ?)")
_LOCK = "UPDATE ttrans SET tid=? WHERE ttid=?"
_MOVE_TRANS = ("INSERT OR REPLACE INTO trans"
               " (partition, tid, packed, oids, user, description, ext, ttid)"
               " SELECT partition, ?, packed, oids, user, description, ext, ttid"
               " FROM ttrans WHERE ttid=?")
_MOVE_OBJ = ("INSERT OR REPLACE INTO obj (partition, oid, tid, data_id, value_tid)"
             " SELECT partition, oid, ?, data_id, value_tid FROM tobj WHERE tid=?")
_DEL_TTRANS = "DELETE FROM ttrans WHERE ttid=?"
_DEL_TOBJ = "DELETE FROM tobj WHERE tid=?"
_TOBJ_DATA_IDS_OF = "SELECT data_id FROM tobj WHERE tid=? AND data_id IS NOT NULL"

_GET_TTRANS = "SELECT ttid, tid FROM ttrans"
_GET_TOBJ_TTIDS = "SELECT DISTINCT tid FROM tobj"
_LOCKED_TTID = "SELECT tid FROM ttrans WHERE ttid=?"
# TIDs are allocated after their TTID (tid >= ttid), so the search is a
# short primary-key range scan for the recent transactions it is used for.
_FINAL_TID = "SELECT tid FROM trans WHERE partition=? AND tid>=? AND ttid=? LIMIT 1"
_UNFINISHED_DATA_IDS = ("SELECT data_id FROM tobj WHERE data_id IS NOT NULL AND tid NOT IN"
                        " (SELECT ttid FROM ttrans WHERE tid IS NOT NULL)")
_DROP_UNFINISHED_TOBJ = ("DELETE FROM tobj WHERE tid NOT IN"
                         " (SELECT ttid FROM ttrans WHERE tid IS NOT NULL)")
_DROP_UNFINISHED_TTRANS = "DELETE FROM ttrans WHERE tid IS NULL"

_GET_TRANS = ("SELECT oids, user, description, ext, packed, ttid FROM trans"
              " WHERE partition=? AND tid=?")
_HISTORY = ("SELECT o.tid, IFNULL(LENGTH(d.value), 0)"
            " FROM obj AS o LEFT JOIN data AS d ON d.id = o.data_id"
            " WHERE o.partition=? AND o.oid=? ORDER BY o.tid DESC LIMIT ? OFFSET ?")
# the undo log: neither pack transactions nor what a pack of the partition
# made undoable no more (up to the pack_tid of the last order applied)
_UNDO_TIDS_DESC = ("SELECT tid FROM trans WHERE partition=? AND tid>? AND tid NOT IN"
                   " (SELECT tid FROM pack) ORDER BY tid DESC LIMIT ?")
_PACKED_UP_TO = ("SELECT MAX(pack_tid) FROM pack WHERE NOT partial AND tid<="
                 " (SELECT done FROM pack_progress WHERE partition=?)")
_TIDS_FROM = ("SELECT tid FROM trans WHERE partition=? AND tid>=? AND tid<=?"
              " ORDER BY tid LIMIT ?")

_FETCH_TIDS = ("SELECT tid FROM trans WHERE partition=? AND tid>=? AND tid<=?"
               " ORDER BY tid LIMIT ?")
# (tid, oid) >= (min_tid, min_oid): a row-value comparison walks obj_tid
_FETCH_OBJ_KEYS = ("SELECT tid, oid FROM obj WHERE partition=? AND (tid, oid)>=(?, ?)"
                   " AND tid<=? ORDER BY tid, oid LIMIT ?")
_FETCH_OBJ = ("SELECT o.value_tid, d.compression, d.hash, d.value"
              " FROM obj AS o LEFT JOIN data AS d ON d.id = o.data_id"
              " WHERE o.partition=? AND o.oid=? AND o.tid=?")
_ADD_TRANS = ("INSERT OR REPLACE INTO trans"
              " (partition, tid, packed, oids, user, description, ext, ttid)"
              " VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_OBJ_DATA_ID = "SELECT data_id FROM obj WHERE partition=? AND oid=? AND tid=?"
_ADD_OBJ = ("INSERT OR REPLACE INTO obj (partition, oid, tid, data_id, value_tid)"
            " VALUES (?, ?, ?, ?, ?)")
_DEL_TRANS = "DELETE FROM trans WHERE partition=? AND tid=?"
_DEL_OBJ = "DELETE FROM obj WHERE partition=? AND oid=? AND tid=?"
_GET_REPLICATION = ("SELECT next_tid, next_obj_tid, next_obj_oid FROM replication"
                    " WHERE partition=?")
_SET_REPLICATION = ("INSERT OR REPLACE INTO replication"
                    " (partition, next_tid, next_obj_tid, next_obj_oid) VALUES (?, ?, ?, ?)")
_DEL_REPLICATION = "DELETE FROM replication WHERE partition=?"
_PARTITION_OBJ_CHUNK = ("SELECT oid, tid, data_id FROM obj WHERE partition=?"
                        " ORDER BY tid, oid LIMIT ?")
_PARTITION_TRANS_CHUNK = "SELECT tid FROM trans WHERE partition=? ORDER BY tid LIMIT ?"
# truncate: per partition, on the (partition, tid) keys of trans and obj_tid
_TRUNCATE_DATA_IDS = ("SELECT data_id FROM obj WHERE partition=? AND tid>?"
                      " AND data_id IS NOT NULL")
_TRUNCATE_OBJ = "DELETE FROM obj WHERE partition=? AND tid>?"
_TRUNCATE_TRANS = "DELETE FROM trans WHERE partition=? AND tid>?"
_TRUNCATE_TTRANS = "DELETE FROM ttrans WHERE tid IS NULL OR tid>?"
_TRUNCATE_REPLICATION_TRANS = "UPDATE replication SET next_tid=? WHERE next_tid>?"
_TRUNCATE_REPLICATION_OBJ = ("UPDATE replication SET next_obj_tid=?, next_obj_oid=0"
                             " WHERE (next_obj_tid, next_obj_oid)>(?, 0)")
# pack
_INSERT_TPACK = ("INSERT OR REPLACE INTO tpack (ttid, approved, partial, oids, pack_tid, gc)"
                 " VALUES (?, NULL, ?, ?, ?, ?)")
_APPROVE_TPACK = "UPDATE tpack SET approved=1 WHERE ttid=?"
_MOVE_PACK = ("INSERT OR REPLACE INTO pack (tid, approved, partial, oids, pack_tid, gc)"
              " SELECT ?, approved, partial, oids, pack_tid, gc FROM tpack WHERE ttid=?")
_DEL_TPACK = "DELETE FROM tpack WHERE ttid=?"
_DROP_UNFINISHED_TPACK = ("DELETE FROM tpack WHERE ttid NOT IN"
                          " (SELECT ttid FROM ttrans WHERE tid IS NOT NULL)")
_TRUNCATE_PACK = "DELETE FROM pack WHERE tid>?"
_GET_PACK_ORDERS = ("SELECT tid, approved, partial, oids, pack_tid, gc FROM pack"
                    " WHERE tid>=? AND tid<=? ORDER BY tid")
_ADD_PACK = ("INSERT OR REPLACE INTO pack (tid, approved, partial, oids, pack_tid, gc)"
             " VALUES (?, ?, ?, ?, ?, ?)")
_SIGN_PACK = "UPDATE pack SET approved=? WHERE tid=?"
_DEL_PACK = "DELETE FROM pack WHERE tid=?"
_GET_PACK_PROGRESS = "SELECT done, target, next_oid FROM pack_progress WHERE partition=?"
_SET_PACK_PROGRESS = ("INSERT OR REPLACE INTO pack_progress (partition, done, target, next_oid)"
                      " VALUES (?, ?, ?, ?)")
_DEL_PACK_PROGRESS = "DELETE FROM pack_progress WHERE partition=?"
_PACK_ROWS = ("SELECT oid, tid, data_id FROM obj WHERE partition=? AND oid>=?"
              " ORDER BY oid, tid LIMIT ?")
_OID_ROWS = "SELECT tid, data_id FROM obj WHERE partition=? AND oid=? ORDER BY tid"
_CHECK_TRANS = ("SELECT tid, packed, oids, user, description, ext FROM trans"
                " WHERE partition=? AND tid>=? AND tid<=? ORDER BY tid LIMIT ?")
_CHECK_OBJ = ("SELECT o.tid, o.oid, o.value_tid, d.hash"
              " FROM obj AS o LEFT JOIN data AS d ON d.id = o.data_id"
              " WHERE o.partition=? AND (o.tid, o.oid)>=(?, ?) AND o.tid<=?"
              " ORDER BY o.tid, o.oid LIMIT ?")
_U64 = struct.Struct('>Q')


def _pack_oids(oids: Sequence[int]) -> bytes:
    return struct.pack(f'>{len(oids)}Q', *oids)


def _unpack_oids(blob: bytes) -> list[int]:
    return list(struct.unpack(f'>{len(blob) // 8}Q', blob))


class SQLiteBackend(Backend):
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
        # In-memory holds on data rows stored for transactions not voted yet.
        self._held: Counter[int] = Counter()

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
                conn.execute(_SYNC_FULL)
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
        except BaseException:
            self.close()
            raise
        self._commit()
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

    def _create_tables(self) -> None:
        conn = self._conn
        for sql in _SCHEMA:
            conn.execute(sql)
        if conn.execute(_GET_CONFIG, (_CONFIG_VERSION,)).fetchone() is None:
            conn.execute(_SET_CONFIG, (_CONFIG_VERSION, SCHEMA_VERSION))

    # -- transaction control -------------------------------------------------

    def _begin(self) -> None:
        """Make sure a write transaction is open.

        The connection stays at synchronous=FULL.  Writes that need not be
        durable on their own (store_data, unlock, abort) are left pending in
        the open transaction: the next durable commit (vote, lock, config)
        fsyncs them with its own rows, and ``commit_pending`` bounds how long
        they wait.  One fsync per durable point, no other commit."""
        conn = self._conn
        if conn is None:
            raise RuntimeError('backend is not open')
        if not conn.in_transaction:
            conn.execute(_BEGIN)

    def _commit(self) -> None:
        self._conn.execute(_COMMIT)
        self._keep_pending = False

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

    # -- reads ---------------------------------------------------------------

    def get_object(self, oid: int, tid: int | None = None,
                   before_tid: int | None = None) -> ObjectRecord | None | bool:
        np = self._np
        if np is None:
            return None
        conn = self.connection
        p = oid % np
        if tid is None and before_tid is None:
            row = conn.execute(_GET_LATEST, (p, oid)).fetchone()
            if row is None:
                return None
            next_serial = None      # the latest revision has no successor
        else:
            if tid is None:
                row = conn.execute(_GET_BEFORE, (p, oid, before_tid)).fetchone()
            elif before_tid is None:
                row = conn.execute(_GET_AT, (p, oid, tid)).fetchone()
            else:
                raise ValueError('tid and before_tid are mutually exclusive')
            if row is None:
                return False if conn.execute(_OID_EXISTS, (p, oid)).fetchone() else None
            next_serial = conn.execute(_NEXT_SERIAL, (p, oid, row[0])).fetchone()[0]
        serial, value_tid, compression, checksum, data = row
        if checksum is None:            # data_id NULL: deletion / undone creation
            return serial, next_serial, 0, ZERO_HASH, b'', None
        return serial, next_serial, compression, checksum, data, value_tid

    def get_revision(self, oid: int, tid: int | None = None,
                     before_tid: int | None = None) -> tuple[int, int | None, int | None] | None:
        np = self._np
        if np is None:
            return None
        if (tid is None) == (before_tid is None):
            raise ValueError('give exactly one of tid and before_tid')
        if tid is None:
            row = self.connection.execute(_REVISION_BEFORE, (oid % np, oid, before_tid)).fetchone()
        else:
            row = self.connection.execute(_REVISION_AT, (oid % np, oid, tid)).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def get_oids_from(self, partition: int, length: int, min_oid: int, tid: int
                      ) -> tuple[list[int], int | None]:
        if length <= 0:
            raise ValueError('length must be positive')
        rows = self.connection.execute(_OIDS_FROM, (partition, min_oid, tid, length)).fetchall()
        oids = [oid for oid, _, data_id in rows if data_id is not None]
        return oids, (rows[-1][0] + 1 if len(rows) == length else None)

    def last_serial(self, oid: int) -> int | None:
        np = self._np
        if np is None:
            return None
        return self._scalar(_LAST_SERIAL, (oid % np, oid))

    def load_data(self, data_id: int) -> tuple[bytes, int, bytes] | None:
        row = self.connection.execute(_LOAD_DATA, (data_id,)).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    # -- writes and two-phase commit -------------------------------------------

    def store_data(self, checksum: bytes, compression: int, data: bytes) -> int:
        if len(checksum) != 20 or checksum == ZERO_HASH:
            raise ValueError('invalid checksum for a data row')
        self._begin()
        conn = self._conn
        params = (checksum, compression, data)
        row = conn.execute(_FIND_DATA, params).fetchone()
        data_id = row[0] if row is not None else conn.execute(_INSERT_DATA, params).lastrowid
        self._held[data_id] += 1
        return data_id

    def hold_data(self, data_id: int) -> None:
        self._held[data_id] += 1

    def _release(self, data_ids: Iterable[int]) -> None:
        held = self._held
        for data_id in data_ids:
            count = held.get(data_id)
            if count is not None:
                if count > 1:
                    held[data_id] = count - 1
                else:
                    del held[data_id]

    def _prune(self, candidates: Iterable[int]) -> int:
        """Delete candidate data rows that nothing references; must run
        inside a write transaction."""
        candidates = [d for d in set(candidates) if d not in self._held]
        if not candidates:
            return 0
        conn = self._conn
        # tobj holds only unfinished transactions: read its references once.
        in_tobj = {row[0] for row in conn.execute(_TOBJ_DATA_IDS)}
        orphans = [(d,) for d in candidates
                   if d not in in_tobj and conn.execute(_DATA_IN_OBJ, (d,)).fetchone() is None]
        conn.executemany(_DEL_DATA, orphans)
        return len(orphans)

    def release_data(self, data_ids: Iterable[int], prune: bool = False) -> None:
        data_ids = list(data_ids)
        self._release(data_ids)
        if prune:
            with self._txn(durable=False):
                self._prune(data_ids)

    def store_transaction(self, ttid: int,
                          objects: Iterable[tuple[int, int | None, int | None]],
                          txn: TransactionMetadata | None,
                          pack: PackRequest | None = None) -> None:
        np = self._partitions()
        rows = [(oid % np, oid, ttid, data_id, value_tid)
                for oid, data_id, value_tid in objects]
        with self._txn(durable=True) as conn:
            conn.executemany(_INSERT_TOBJ, rows)
            if txn is not None:
                oids, user, description, ext, packed = txn
                conn.execute(_INSERT_TTRANS, (ttid % np, bool(packed), _pack_oids(oids),
                                              user, description, ext, ttid))
                if pack is not None:
                    partial, pack_oids, pack_tid, gc = pack
                    conn.execute(_INSERT_TPACK, (
                        ttid, bool(partial), None if pack_oids is None else _pack_oids(pack_oids),
                        pack_tid, bool(gc)))
            self._advance_floor(_FLOOR_STEP)
        # Only now that tobj references them durably are the holds useless.
        self._release(row[3] for row in rows if row[3] is not None)

    def lock_transaction(self, ttid: int, tid: int, pack_approved: bool = False) -> None:
        with self._txn(durable=True) as conn:
            conn.execute(_LOCK, (tid, ttid))
            if pack_approved:
                conn.execute(_APPROVE_TPACK, (ttid,))

    def unlock_transaction(self, ttid: int, tid: int) -> None:
        with self._txn(durable=False) as conn:
            conn.execute(_MOVE_TRANS, (tid, ttid))
            conn.execute(_DEL_TTRANS, (ttid,))
            conn.execute(_MOVE_OBJ, (tid, ttid))
            conn.execute(_DEL_TOBJ, (ttid,))
            conn.execute(_MOVE_PACK, (tid, ttid))
            conn.execute(_DEL_TPACK, (ttid,))

    def abort_transaction(self, ttid: int, data_ids: Iterable[int] = ()) -> None:
        data_ids = list(data_ids)
        self._release(data_ids)
        with self._txn(durable=False) as conn:
            # A client may send any 8 bytes as its TTID; one beyond SQLite's
            # integers never got a row (its vote failed), and the abort runs
            # when the client is gone: raising here took the storage out.
            if ttid < 1 << 63:
                data_ids += [row[0] for row in conn.execute(_TOBJ_DATA_IDS_OF, (ttid,))]
                conn.execute(_DEL_TTRANS, (ttid,))
                conn.execute(_DEL_TOBJ, (ttid,))
                conn.execute(_DEL_TPACK, (ttid,))
            self._prune(data_ids)

    def drop_unfinished(self) -> None:
        with self._txn(durable=True) as conn:
            candidates = [row[0] for row in conn.execute(_UNFINISHED_DATA_IDS)]
            conn.execute(_DROP_UNFINISHED_TOBJ)
            conn.execute(_DROP_UNFINISHED_TPACK)
            conn.execute(_DROP_UNFINISHED_TTRANS)
            # Rows stored before a crash for transactions that never voted
            # are referenced by nothing; they can only be above the floor.
            candidates += [row[0] for row in conn.execute(_DATA_NOT_IN_OBJ, (self._get_floor(),))]
            self._prune(candidates)
            self._advance_floor(0)

    def _get_floor(self) -> int:
        if self._floor is None:
            self._floor = self._floor_checked = int(self.get_config(_CONFIG_ORPHAN_FLOOR) or 0)
        return self._floor

    def _advance_floor(self, step: int) -> None:
        """Raise the orphan floor, in a write transaction about to be made
        durable, once ``step`` data rows were added since the last time:
        below the oldest data row held for a transaction that has not voted
        (or above the last row when none is held), every row is referenced
        by obj or tobj, since releases, aborts and deletions prune what they
        leave unreferenced (see _prune; a ``release_data`` without prune
        leaves its orphan to ``prune_orphans``).  A crash cannot leave an
        orphan below it."""
        floor = self._get_floor()
        last = self._scalar(_MAX_DATA_ID, ()) or 0
        if last - self._floor_checked < step:
            return  # cheap: no scan of the holds
        self._floor_checked = last
        new_floor = min(self._held) - 1 if self._held else last
        if new_floor > floor:
            self._set_config(_CONFIG_ORPHAN_FLOOR, str(new_floor))
            self._floor = new_floor

    def prune_orphans(self) -> int:
        with self._txn(durable=False) as conn:
            count = self._prune([row[0] for row in conn.execute(_DATA_NOT_IN_OBJ, (0,))])
        return count

    def get_locked_transactions(self) -> dict[int, int | None]:
        conn = self.connection
        locked: dict[int, int | None] = {ttid: None for (ttid,) in conn.execute(_GET_TOBJ_TTIDS)}
        locked.update(conn.execute(_GET_TTRANS))
        return locked

    def get_final_tid(self, ttid: int) -> int | None:
        conn = self.connection
        np = self._np
        if np is not None:
            row = conn.execute(_FINAL_TID, (ttid % np, ttid, ttid)).fetchone()
            if row is not None:
                return row[0]
        row = conn.execute(_LOCKED_TTID, (ttid,)).fetchone()
        return None if row is None else row[0]

    # -- metadata reads ----------------------------------------------------------

    def get_transaction(self, tid: int) -> TransactionRecord | None:
        np = self._np
        if np is None:
            return None
        row = self.connection.execute(_GET_TRANS, (tid % np, tid)).fetchone()
        if row is None:
            return None
        oids, user, description, ext, packed, ttid = row
        return _unpack_oids(oids), user, description, ext, bool(packed), ttid

    def get_object_history(self, oid: int, offset: int, length: int
                           ) -> list[tuple[int, int]] | None:
        np = self._np
        if np is None:
            return None
        conn = self.connection
        p = oid % np
        history = conn.execute(_HISTORY, (p, oid, length, offset)).fetchall()
        if not history and conn.execute(_OID_EXISTS, (p, oid)).fetchone() is None:
            return None
        return [(serial, size) for serial, size in history]

    def get_tids(self, offset: int, length: int, partitions: Iterable[int]) -> list[int]:
        if length <= 0:
            return []
        conn = self.connection
        # Each partition is a descending primary-key range; merging the
        # first offset+length of each avoids sorting the union in SQL.
        limit = offset + length
        runs = [[row[0] for row in conn.execute(
                    _UNDO_TIDS_DESC, (p, self._scalar(_PACKED_UP_TO, (p,)) or -1, limit))]
                for p in set(partitions)]
        merged = heapq.merge(*runs, reverse=True)
        return list(merged)[offset:limit]

    def get_tids_from(self, min_tid: int, max_tid: int, length: int,
                      partitions: Iterable[int]) -> list[int]:
        if length <= 0:
            return []
        conn = self.connection
        runs = [[row[0] for row in conn.execute(_TIDS_FROM, (p, min_tid, max_tid, length))]
                for p in set(partitions)]
        return list(heapq.merge(*runs))[:length]

    # -- replication -------------------------------------------------------------

    def fetch_tids(self, partition: int, length: int, min_tid: int, max_tid: int) -> list[int]:
        rows = self.connection.execute(_FETCH_TIDS, (partition, min_tid, max_tid, length))
        return [row[0] for row in rows]

    def fetch_object_keys(self, partition: int, length: int, min_tid: int, max_tid: int,
                          min_oid: int) -> list[tuple[int, int]]:
        return self.connection.execute(
            _FETCH_OBJ_KEYS, (partition, min_tid, min_oid, max_tid, length)).fetchall()

    def fetch_object(self, oid: int, tid: int) -> tuple[int, bytes, bytes, int | None] | None:
        row = self.connection.execute(_FETCH_OBJ, (oid % self._partitions(), oid, tid)).fetchone()
        if row is None:
            return None
        value_tid, compression, checksum, data = row
        if checksum is None:
            return 0, ZERO_HASH, b'', None
        return compression, checksum, data, value_tid

    def add_transaction(self, tid: int, oids: Sequence[int], user: bytes, description: bytes,
                        ext: bytes, packed: bool, ttid: int) -> None:
        np = self._partitions()
        with self._txn(durable=False) as conn:
            conn.execute(_ADD_TRANS, (tid % np, tid, bool(packed), _pack_oids(oids), user,
                                      description, ext, ttid))

    def add_object(self, oid: int, tid: int, compression: int, checksum: bytes, data: bytes,
                   data_serial: int | None) -> None:
        p = oid % self._partitions()
        with self._txn(durable=False) as conn:
            old = conn.execute(_OBJ_DATA_ID, (p, oid, tid)).fetchone()
            if checksum == ZERO_HASH and not data:
                data_id = None
            else:
                params = (checksum, compression, data)
                row = conn.execute(_FIND_DATA, params).fetchone()
                data_id = row[0] if row is not None else conn.execute(_INSERT_DATA, params).lastrowid
            conn.execute(_ADD_OBJ, (p, oid, tid, data_id, data_serial))
            if old is not None and old[0] is not None and old[0] != data_id:
                self._prune([old[0]])

    def delete_transactions(self, partition: int, tids: Iterable[int]) -> None:
        tids = list(tids)
        with self._txn(durable=False) as conn:
            conn.executemany(_DEL_TRANS, [(partition, tid) for tid in tids])
            conn.executemany(_DEL_PACK, [(tid,) for tid in tids])

    def delete_objects(self, partition: int, keys: Iterable[tuple[int, int]]) -> None:
        with self._txn(durable=False) as conn:
            candidates = []
            for tid, oid in keys:
                row = conn.execute(_OBJ_DATA_ID, (partition, oid, tid)).fetchone()
                if row is not None:
                    conn.execute(_DEL_OBJ, (partition, oid, tid))
                    if row[0] is not None:
                        candidates.append(row[0])
            self._prune(candidates)

    def get_replication(self, partition: int) -> tuple[int, int, int] | None:
        row = self.connection.execute(_GET_REPLICATION, (partition,)).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def set_replication(self, partition: int, point: tuple[int, int, int] | None) -> None:
        with self._txn(durable=True) as conn:
            if point is None:
                conn.execute(_DEL_REPLICATION, (partition,))
            else:
                conn.execute(_SET_REPLICATION, (partition, *point))
            self._advance_floor(_FLOOR_STEP)

    def last_tid_of(self, partition: int) -> int | None:
        tids = [self._scalar(sql, (partition,)) for sql in (_MAX_TRANS_TID, _MAX_OBJ_TID)]
        return max((t for t in tids if t is not None), default=None)

    def truncate(self, tid: int) -> None:
        tid = int(tid)
        with self._txn(durable=True) as conn:
            candidates = []
            for p in range(self._np or 0):
                candidates += [row[0] for row in conn.execute(_TRUNCATE_DATA_IDS, (p, tid))]
                conn.execute(_TRUNCATE_OBJ, (p, tid))
                conn.execute(_TRUNCATE_TRANS, (p, tid))
            # what is left of ttrans is locked at tid or below: the tobj rows
            # of any other ttid are unfinished (as in drop_unfinished)
            conn.execute(_TRUNCATE_TTRANS, (tid,))
            candidates += [row[0] for row in conn.execute(_UNFINISHED_DATA_IDS)]
            conn.execute(_DROP_UNFINISHED_TOBJ)
            conn.execute(_DROP_UNFINISHED_TPACK)
            conn.execute(_TRUNCATE_PACK, (tid,))
            self._prune(candidates)
            conn.execute(_TRUNCATE_REPLICATION_TRANS, (tid + 1, tid + 1))
            conn.execute(_TRUNCATE_REPLICATION_OBJ, (tid + 1, tid + 1))
            self._set_config(self.CONFIG_TRUNCATE_TID, None)

    def drop_partition(self, partition: int, length: int) -> bool:
        with self._txn(durable=False) as conn:
            rows = conn.execute(_PARTITION_OBJ_CHUNK, (partition, length)).fetchall()
            conn.executemany(_DEL_OBJ, [(partition, oid, tid) for oid, tid, _ in rows])
            self._prune(data_id for _, _, data_id in rows if data_id is not None)
            tids = conn.execute(_PARTITION_TRANS_CHUNK, (partition, length)).fetchall()
            conn.executemany(_DEL_TRANS, [(partition, tid) for (tid,) in tids])
        return len(rows) == length or len(tids) == length

    # -- pack ---------------------------------------------------------------------

    def get_pack_orders(self, min_tid: int = 0, max_tid: int | None = None,
                        max_oids: int | None = None) -> list[PackOrderRecord]:
        if max_tid is None:
            max_tid = (1 << 63) - 1
        orders: list[PackOrderRecord] = []
        count = 0
        for tid, approved, partial, oids, pack_tid, gc in self.connection.execute(
                _GET_PACK_ORDERS, (min_tid, max_tid)):
            orders.append((tid, None if approved is None else bool(approved), bool(partial),
                           None if oids is None else _unpack_oids(oids), pack_tid, bool(gc)))
            count += len(oids or b'') // 8
            if max_oids is not None and count > max_oids:
                break
        return orders

    def add_pack_order(self, order: PackOrderRecord) -> None:
        tid, approved, partial, oids, pack_tid, gc = order
        with self._txn(durable=False) as conn:
            conn.execute(_ADD_PACK, (tid, approved, bool(partial),
                                     None if oids is None else _pack_oids(oids),
                                     pack_tid, bool(gc)))

    def sign_pack_orders(self, tids: Iterable[int], approved: bool) -> None:
        with self._txn(durable=False) as conn:
            conn.executemany(_SIGN_PACK, [(bool(approved), tid) for tid in tids])

    def get_pack_progress(self, partition: int) -> PackProgress | None:
        row = self.connection.execute(_GET_PACK_PROGRESS, (partition,)).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def set_pack_progress(self, partition: int, progress: PackProgress | None) -> None:
        with self._txn(durable=False) as conn:
            if progress is None:
                conn.execute(_DEL_PACK_PROGRESS, (partition,))
            else:
                conn.execute(_SET_PACK_PROGRESS, (partition, *progress))

    def _pack_candidates(self, partition: int, steps: Sequence[PackStep], min_oid: int,
                         length: int) -> tuple[dict[int, list], bool]:
        """Revisions of the next objects to pack: ({oid: [(tid, data_id)]},
        whether the partition has more)."""
        conn = self._conn
        np = self._partitions()
        if all(partial for _, partial, _, _ in steps):
            # partial packs only: the listed oids of this partition
            wanted = sorted({oid for _, _, oids, _ in steps for oid in oids or ()
                             if oid % np == partition and oid >= min_oid})
            chunk = wanted[:length]
            revisions = {oid: conn.execute(_OID_ROWS, (partition, oid)).fetchall()
                         for oid in chunk}
            return revisions, len(wanted) > length
        rows = conn.execute(_PACK_ROWS, (partition, min_oid, length)).fetchall()
        revisions: dict[int, list] = {}
        for oid, tid, data_id in rows:
            revisions.setdefault(oid, []).append((tid, data_id))
        more = len(rows) == length
        if more:
            # the last object may have more revisions than the chunk holds
            last = rows[-1][0]
            if len(revisions) == 1:
                revisions[last] = conn.execute(_OID_ROWS, (partition, last)).fetchall()
            else:
                del revisions[last]
        return revisions, more

    def pack_partition(self, partition: int, steps: Sequence[PackStep], min_oid: int,
                       length: int, progress: PackProgress) -> tuple[int | None, int, int]:
        # durable: its own fsync flushes what it wrote, which the next
        # commit's fsync would otherwise have to
        # durable: its own fsync flushes what it wrote, which the next
        # commit's fsync would otherwise have to
        with self._txn(durable=True) as conn:
            revisions, more = self._pack_candidates(partition, steps, min_oid, length)
            doomed = []
            candidates = []
            for oid, revs in revisions.items():
                tids = revisions_to_delete(oid, revs, steps)
                if tids:
                    gone = set(tids)
                    doomed += [(partition, oid, tid) for tid in tids]
                    candidates += [d for t, d in revs if t in gone and d is not None]
            conn.executemany(_DEL_OBJ, doomed)
            self._prune(candidates)
            next_oid = max(revisions) + 1 if more and revisions else None
            done, target, _ = progress
            conn.execute(_SET_PACK_PROGRESS, (partition, done, target,
                                              min_oid if next_oid is None else next_oid))
        return next_oid, len(revisions), len(doomed)

    # -- replica checks -----------------------------------------------------------

    def check_tid_range(self, partition: int, length: int, min_tid: int, max_tid: int
                        ) -> tuple[int, bytes, int]:
        digest = hashlib.sha1()
        count, last = 0, min_tid
        pack = _U64.pack
        for tid, packed, oids, user, description, ext in self.connection.execute(
                _CHECK_TRANS, (partition, min_tid, max_tid, length)):
            count += 1
            last = tid
            digest.update(pack(tid))
            for blob in (oids, user, description, ext):
                digest.update(pack(len(blob)))
                digest.update(blob)
            digest.update(b'\1' if packed else b'\0')
        return count, (digest.digest() if count else ZERO_HASH), last

    def check_serial_range(self, partition: int, length: int, min_tid: int, max_tid: int,
                           min_oid: int) -> tuple[int, bytes, int, bytes, int]:
        tid_digest, oid_digest = hashlib.sha1(), hashlib.sha1()
        count, last_tid, last_oid = 0, min_tid, min_oid
        pack = _U64.pack
        for tid, oid, value_tid, checksum in self.connection.execute(
                _CHECK_OBJ, (partition, min_tid, min_oid, max_tid, length)):
            count += 1
            last_tid, last_oid = tid, oid
            tid_digest.update(pack(tid))
            oid_digest.update(pack(oid))
            oid_digest.update(checksum or ZERO_HASH)
            oid_digest.update(pack(value_tid or 0))
        if not count:
            return 0, ZERO_HASH, min_tid, ZERO_HASH, min_oid
        return count, tid_digest.digest(), last_tid, oid_digest.digest(), last_oid
