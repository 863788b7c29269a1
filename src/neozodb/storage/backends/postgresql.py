"""PostgreSQL backend (psycopg 3): a storage node's database on a
PostgreSQL server; ``database`` is a libpq connection string
(``host=... dbname=...``) or URI (``postgresql://user@host/dbname``).

It runs the same logic as the SQLite backend (``sqlbase.SQLBackend`` and
its mixins) on one connection whose statements are translated into
PostgreSQL's dialect (``postgresql_schema``), with explicit transactions
(the connection is in autocommit mode and sends BEGIN/COMMIT itself):

* writes that need not be durable on their own (``store_data``, unlock,
  abort, replication rows) stay pending in the open transaction, each
  operation in a savepoint;
* a durable point (vote, lock, configuration, partition table, resume
  point, pack chunk) commits it with ``synchronous_commit`` on: PostgreSQL
  answers the COMMIT once its WAL is flushed.  Inside ``sync_later`` (the
  storage node's group commit, whose answers wait for ``sync()``), the
  durable points are left in the open transaction too, and ``sync()``
  commits them all at once: one COMMIT and one WAL flush for the batch.

Each statement is a round trip to the server, so where the shared logic
sends one statement per row or several per operation, this backend sends
one: ``store_data`` (find or insert), unlock, the pruning of orphan data,
the lookup of replicated data rows, and every ``executemany`` of inserts
or deletes (one statement over arrays, ``unnest``).  (Pipelining the
statements of an operation was measured slower on loopback than sending
them one by one.)

One storage node per database: the connection holds a session-level
advisory lock, so a second node is refused at ``open``, once it waited
``LOCK_WAIT`` seconds for it (PostgreSQL drops the lock with the
connection, a crash included, but a session just closed may still be
ending on the server).

Errors: a lost connection, or any other error out of a write, raises a
``psycopg.Error`` (``errors``): the storage node stops, and what was not
committed is rolled back by the server (nothing half-written is ever
read back).  An integer parameter out of bigint's range raises
OverflowError before anything is sent (as sqlite3 does); a bad value that
the server refuses inside an operation's savepoint (``input_errors``)
undoes that operation only; outside one, it would have aborted the whole
pending transaction, so it is raised as an OperationalError and the node
stops.  No statement is retried: this node is the only writer of its
database (no serialization failure or deadlock to wait out), and after a
lost connection the pending writes are gone, which only a restart
(verification) can repair.  ``neostorage --wait`` retries the connection
at startup.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
from psycopg import conninfo
from psycopg.pq import TransactionStatus

from .base import ZERO_HASH
from .postgresql_schema import (
    _DROP,
    _SCHEMA,
    CHUNKS_AT_ONCE,
    CHUNKS_FROM,
    COLUMN_TYPES,
    DELETE_ORPHANS,
    FIND_DATA_ANY,
    FIND_OR_INSERT_DATA,
    FIND_OR_INSERT_DATA_MANY,
    LOCK,
    LOCK_HOLDER,
    LOCK_KEY,
    NEW_DATA_IDS,
    RESET_LOCK_TIMEOUT,
    SET_LOCK_TIMEOUT,
    UNLOCK,
    bulk,
    translate,
)
from .sqlbase import SQLBackend
from .sqlite_blobs import SQLiteBlobs
from .sqlite_schema import _COMMIT, _RELEASE, _SAVEPOINT

__all__ = ['PostgreSQLBackend', 'public_dsn']

_MIN, _MAX = -1 << 63, (1 << 63) - 1
_IDLE = TransactionStatus.IDLE
# seconds a node waits for the database's lock before refusing to start
LOCK_WAIT = 3.0
_INERROR = TransactionStatus.INERROR
_translated: dict[str, str] = {}
# executemany statement -> bulk()'s translation, None: row by row
_bulk: dict[str, tuple[str, tuple[int, ...] | None] | None] = {}


class _Connection(psycopg.Connection):
    """A psycopg connection with the interface of sqlite3's that the
    shared SQL logic uses: ``execute`` (translating the statement, binary
    parameters and results), ``executemany`` and ``in_transaction``."""

    savepoints = 0   # operations (SQLBackend._txn) open
    types: dict[str, dict[str, str]] | None = None  # COLUMN_TYPES, read once

    def execute(self, query, params=None, *, prepare=None, binary=True):
        sql = _translated.get(query)
        if sql is None:
            sql = _translated[query] = translate(query)
        if params:
            for value in params:
                if value.__class__ is int and not _MIN <= value <= _MAX:
                    raise OverflowError('Python int too large to convert to bigint')
        if query is _SAVEPOINT:
            self.savepoints += 1
        elif query is _RELEASE:
            self.savepoints -= 1
        try:
            return super().execute(sql, params or None, prepare=prepare, binary=binary)
        except psycopg.Error as e:
            self._failed(e)
            raise

    def executemany(self, query, rows) -> None:
        rows = list(rows)
        if len(rows) <= 1:
            # (psycopg's executemany pipelines: slower for a single row)
            for row in rows:
                self.execute(query, row)
            return
        found = _bulk.get(query, False)
        if found is False:
            if self.types is None:
                self.types = {}
                for table, column, kind in super().execute(COLUMN_TYPES):
                    self.types.setdefault(table, {})[column] = kind
            found = _bulk[query] = bulk(query, self.types)
        if found is not None:
            sql, keys = found
            if keys is not None:
                # INSERT OR REPLACE row by row: the last row of a key wins
                rows = list({tuple(row[i] for i in keys): row for row in rows}.values())
            self.execute(sql, [list(column) for column in zip(*rows, strict=True)])
            return
        sql = _translated.get(query)
        if sql is None:
            sql = _translated[query] = translate(query)
        with self.cursor() as cursor:
            try:
                cursor.executemany(sql, rows)
            except psycopg.Error as e:
                self._failed(e)
                raise

    def _failed(self, error: psycopg.Error) -> None:
        """An error outside any savepoint aborted the pending transaction
        (PostgreSQL refuses everything but ROLLBACK after it): whatever it
        was, the backend cannot go on."""
        if self.info.transaction_status == _INERROR and not self.savepoints:
            raise psycopg.OperationalError(
                f'pending transaction aborted by {type(error).__name__}: {error}') from error

    @property
    def in_transaction(self) -> bool:
        return self.info.transaction_status != _IDLE


def public_dsn(dsn: str) -> str:
    """``dsn`` as a connection string without its password (for logs)."""
    try:
        params = conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return '(invalid DSN)'
    params.pop('password', None)
    return conninfo.make_conninfo(**params)


def _one_line(error: BaseException) -> str:
    return ' '.join(str(error).split())


class PostgreSQLBackend(SQLiteBlobs, SQLBackend):
    """Storage backend on a PostgreSQL database (see the module docstring)."""

    name = 'PostgreSQL'
    errors = (psycopg.Error,)
    input_errors = (psycopg.DataError, psycopg.IntegrityError)
    _SCHEMA = _SCHEMA
    _DROP = _DROP

    def __init__(self, database: str, **options: object) -> None:
        self._reject_options(options)
        try:
            conninfo.conninfo_to_dict(database)
        except psycopg.Error as e:
            raise ValueError(f'invalid PostgreSQL DSN: {_one_line(e)}') from None
        super().__init__(database)

    # -- lifecycle ----------------------------------------------------------

    def _connect(self) -> _Connection:
        try:
            conn = _Connection.connect(self.database, autocommit=True, connect_timeout=10)
        except psycopg.Error as e:
            raise ConnectionError(f'cannot connect: {_one_line(e)}') from None
        try:
            # A previous node's session may still be ending on the server
            # (a client's close does not wait for it): wait a little, as
            # MariaDB's GET_LOCK does (3 s), before calling it another node.
            conn.execute(SET_LOCK_TIMEOUT, ('%dms' % (LOCK_WAIT * 1000),))
            try:
                conn.execute(LOCK, (LOCK_KEY,))
            except psycopg.errors.LockNotAvailable:
                holder = conn.execute(LOCK_HOLDER, (LOCK_KEY,)).fetchone()
                raise RuntimeError(
                    'database in use by another storage node (advisory lock %d held by'
                    ' server process %s)' % (LOCK_KEY, holder[0] if holder else '?')) from None
            conn.execute(RESET_LOCK_TIMEOUT)
        except BaseException:
            conn.close()
            raise
        return conn

    def _end(self, conn: _Connection) -> None:
        try:
            if conn.info.transaction_status != _INERROR:
                super()._end(conn)        # a synchronous commit, if any
        except psycopg.Error:
            pass  # connection lost: the server rolled back what was pending
        self.unsynced = False

    def _drop_tables(self) -> None:
        super()._drop_tables()
        self._next_blob = None

    def describe(self) -> str:
        version = ''
        if self._conn is not None:
            number = self._conn.info.server_version
            version = f' {number // 10000}.{number % 10000}'
        return f'PostgreSQL{version} database {public_dsn(self.database)!r}'

    def _commit(self) -> None:
        conn = self._conn
        if conn.info.transaction_status == _INERROR:
            # COMMIT would answer ROLLBACK without an error
            raise psycopg.OperationalError('pending transaction aborted by an earlier error')
        if self._defer:
            # group commit: the durable points of this event-loop iteration
            # stay in the open transaction; sync() commits them together
            self.unsynced = True
            self._keep_pending = True
            return
        conn.execute(_COMMIT)
        self._keep_pending = False

    def sync(self) -> None:
        """Commit what ``sync_later`` left pending, synchronously: COMMIT
        returns once PostgreSQL has flushed its WAL up to it (one flush
        for every durable point of the batch).  Nothing to do if a commit
        since (``commit_pending``) did it already."""
        if not self.unsynced or self._conn is None:
            return
        conn = self._conn
        if conn.in_transaction:
            if conn.info.transaction_status == _INERROR:
                raise psycopg.OperationalError('pending transaction aborted by an earlier error')
            conn.execute(_COMMIT)
            self._keep_pending = False
        self.unsynced = False

    # -- fewer round trips than the shared logic's statements ---------------------

    def _new_data_ids(self, conn, count: int) -> list[int]:
        return [row[0] for row in conn.execute(NEW_DATA_IDS, (count,))]

    def _data_rows(self, conn, hashes: list[bytes]) -> Iterator[tuple[int, bytes, int, bytes]]:
        return conn.execute(FIND_DATA_ANY, (hashes,)) if hashes else iter(())

    def _delete_orphans(self, candidates: list[int]) -> int:
        return self._conn.execute(DELETE_ORPHANS, (candidates,)).rowcount

    def _find_or_insert_data(self, checksum: bytes, compression: int, data: bytes
                             ) -> tuple[int, bool]:
        params = (checksum, compression, data)
        return self._conn.execute(FIND_OR_INSERT_DATA, params + params).fetchone()

    # a burst of stores takes its data rows in one round trip (storage/writes.py)
    batched_data = True

    def store_data_many(self, items: list[tuple[bytes, int, bytes, int]]) -> list[int]:
        if not items:
            return []
        for checksum, _, _, _ in items:
            if len(checksum) != 20 or checksum == ZERO_HASH:
                raise ValueError('invalid checksum for a data row')
        self._begin()
        columns = [list(c) for c in zip(*((c, z, d) for c, z, d, _ in items), strict=True)]
        rows = self._conn.execute(FIND_OR_INSERT_DATA_MANY, columns).fetchall()
        held = self._held
        added = set()
        for data_id, inserted in rows:
            held[data_id] += 1
            if inserted:
                added.add(data_id)
        self._data_added += len(added)
        return [data_id for data_id, _ in rows]

    def _blob_chunks(self, blob_id: int) -> Iterator[bytes]:
        conn = self.connection
        n = 0
        while True:
            rows = conn.execute(CHUNKS_FROM, (blob_id, n, CHUNKS_AT_ONCE)).fetchall()
            for _, chunk in rows:
                yield chunk
            if len(rows) < CHUNKS_AT_ONCE:
                return
            n = rows[-1][0] + 1

    def unlock_transaction(self, ttid: int, tid: int) -> None:
        self._begin()
        self._conn.execute(UNLOCK, (ttid, ttid, ttid, tid, tid, tid))
        self._keep_pending = True
