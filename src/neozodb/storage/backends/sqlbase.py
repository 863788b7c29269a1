"""What the SQL backends share above their driver: ``SQLBackend`` runs the
logic of the ``sqlite_*`` mixins (reads, writes and two-phase commit,
replication, pack: written against SQLite's statements) and holds the
transaction control, configuration, partition table and ids written in
the same terms.  A subclass brings the connection: ``_connect`` opens it
(an object with sqlite3's ``execute``/``executemany``/``in_transaction``;
the PostgreSQL backend's translates the statements), ``_commit`` makes a
durable point durable (at once, or at ``sync()`` inside ``sync_later``),
``describe`` and ``sync``.

Transaction control (the durability contract of ``base.py``): one write
transaction is kept open; writes that need not be durable on their own
(``store_data``, unlock, abort, replication rows...) stay pending in it,
each operation in a savepoint so that its failure undoes only its own
writes; a durable operation commits it with everything pending.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from .base import DISCARDED, Backend, PartitionTableRecord
from .sqlite_pack import SQLitePack
from .sqlite_reads import SQLiteReads
from .sqlite_replication import SQLiteReplication
from .sqlite_schema import (
    _BEGIN,
    _CLEAR_PT,
    _COMMIT,
    _CONFIG_VERSION,
    _DEL_CELL,
    _DEL_CONFIG,
    _GET_CONFIG,
    _GET_PT,
    _HAS_CONFIG,
    _LOCKED_TTRANS_TIDS,
    _MAX_OBJ_OID,
    _MAX_OBJ_TID,
    _MAX_TRANS_TID,
    _MIN_OBJ_TID,
    _MIN_TRANS_TID,
    _RELEASE,
    _ROLLBACK,
    _ROLLBACK_TO,
    _SAVEPOINT,
    _SET_CELL,
    _SET_CONFIG,
    _TOBJ_MAX_OIDS,
    SCHEMA_VERSION,
)
from .sqlite_writes import SQLiteWrites


class SQLBackend(SQLiteReads, SQLiteWrites, SQLiteReplication, SQLitePack, Backend):
    """A backend on one SQL connection (see the module docstring)."""

    #: CREATE statements of the schema and DROP statements of every table
    _SCHEMA: Sequence[str] = ()
    _DROP: Sequence[str] = ()

    def __init__(self, database: str) -> None:
        self.database = database
        self._conn: Any = None
        self._np: int | None = None          # cached number of partitions
        self._keep_pending = False           # pending writes include unlocks/aborts
        self._floor: int | None = None       # cached orphan floor, None: not read yet
        self._floor_checked = 0              # last data id when it was last computed
        self._data_added = 0                 # rows store_data inserted since then
        # In-memory holds on data rows stored for transactions not voted yet.
        self._held: Counter[int] = Counter()
        self._defer = False                 # inside sync_later()
        self.unsynced = False

    # -- lifecycle ----------------------------------------------------------

    @property
    def connection(self) -> Any:
        """The open connection (for backend-specific tests and tools)."""
        if self._conn is None:
            raise RuntimeError('backend is not open')
        return self._conn

    def _connect(self) -> Any:  # pragma: no cover - every subclass has one
        """Open and set up a new connection, returned."""
        raise NotImplementedError

    def open(self, reset: bool = False) -> None:
        if self._conn is None:
            self._conn = self._connect()
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
            try:
                self._end(conn)
            finally:
                conn.close()
        self._forget()

    def _end(self, conn: Any) -> None:
        """Last words on a connection being closed: unlocks and aborts are
        kept; lone store_data rows (never voted) are not."""
        if conn.in_transaction:
            conn.execute(_COMMIT if self._keep_pending else _ROLLBACK)

    def _forget(self) -> None:
        """Drop the state cached from a closed connection."""
        self._held.clear()
        self._np = None
        self._floor = None

    def erase(self) -> None:
        with self._txn(durable=True):
            self._drop_tables()
            self._create_tables()
        self._forget()

    def _drop_tables(self) -> None:
        for sql in self._DROP:
            self._conn.execute(sql)

    def _create_tables(self) -> None:
        conn = self._conn
        for sql in self._SCHEMA:
            conn.execute(sql)
        if conn.execute(_GET_CONFIG, (_CONFIG_VERSION,)).fetchone() is None:
            conn.execute(_SET_CONFIG, (_CONFIG_VERSION, SCHEMA_VERSION))

    # -- transaction control -------------------------------------------------

    def _begin(self) -> None:
        """Make sure a write transaction is open.

        Writes that need not be durable on their own (store_data, unlock,
        abort) are left pending in the open transaction: the next durable
        commit (vote, lock, config) makes them durable with its own rows,
        and ``commit_pending`` bounds how long they wait."""
        conn = self._conn
        if conn is None:
            raise RuntimeError('backend is not open')
        if not conn.in_transaction:
            conn.execute(_BEGIN)

    def _commit(self) -> None:  # pragma: no cover - every subclass has one
        """Commit the open transaction durably (at once, or at the next
        ``sync()`` inside ``sync_later``)."""
        raise NotImplementedError

    # -- group commit --------------------------------------------------------

    defers_sync = True

    @contextmanager
    def sync_later(self) -> Iterator[None]:
        self._defer = True
        try:
            yield
        finally:
            self._defer = False

    @contextmanager
    def _txn(self, durable: bool) -> Iterator[Any]:
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
