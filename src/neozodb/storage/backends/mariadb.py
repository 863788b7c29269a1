"""MariaDB backend (MariaDB Connector/Python): NEO's MySQL schema, so that
a database of NEO's storage nodes is served in place (and the other way
round).  The schema, the ``-d`` syntax and every statement are in
``mariadb_schema``.

One connection, autocommit off, READ COMMITTED.  Durability is the
server's: with ``innodb_flush_log_at_trx_commit=1`` (checked at open; a
lower value is logged) a COMMIT is on disk when it returns.  As in the
SQLite backend, writes that need not be durable on their own
(``store_data``, unlock, abort, replication rows...) stay in the open
transaction, and the next durable point (vote, lock, configuration,
partition table, pack chunk) commits them with its own rows;
``commit_pending`` bounds how long they wait.  An operation of several
statements runs in a savepoint when earlier writes are pending, so that
its failure undoes its own writes only.  Each statement keeps a prepared
cursor of its own: one round trip per execution.

Two storage nodes on one database are refused: the connection holds
``GET_LOCK('<database>.neostorage')``, the lock NEO's nodes take, so a
NEO node and ours exclude each other too.

A lost connection: when nothing was pending (no uncommitted write), the
statement is retried on a new connection (re-taking the lock), as are
deadlocks and lock wait timeouts; otherwise the driver's error is raised
and the storage node stops (what was pending is lost with the server's
transaction, never half-written).

The rest is in mixins: ``mariadb_reads`` (reads and metadata reads),
``mariadb_writes`` (data rows, two-phase commit), ``mariadb_replication``
(replication, checks, truncation), ``mariadb_pack`` (pack) and
``mariadb_blobs`` (blob contents, in tables of our own).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from . import mariadb_blobs as B
from . import mariadb_schema as S
from .base import DISCARDED, Backend, PartitionTableRecord
from .mariadb_blobs import MariaDBBlobs
from .mariadb_pack import MariaDBPack
from .mariadb_reads import MariaDBReads
from .mariadb_replication import MariaDBReplication
from .mariadb_writes import MariaDBWrites

try:
    import mariadb as _driver
except ImportError:  # the node says so when this adapter is chosen
    _driver = None

log = logging.getLogger(__name__)

_OUT_OF_DATE = 0
# statements that change the database (SAVEPOINT, SELECT, SET... do not)
_WRITES = frozenset({'INSERT', 'REPLACE', 'DELETE', 'UPDATE', 'CREATE', 'DROP'})
_WRITE_CACHE: dict[str, bool] = {}


def _is_write(sql: str) -> bool:
    write = _WRITE_CACHE.get(sql)
    if write is None:
        write = _WRITE_CACHE[sql] = sql.split(None, 1)[0] in _WRITES
    return write


def _errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    if _driver is None:
        return (), ()
    return (_driver.Error,), (_driver.IntegrityError, _driver.DataError)


class MariaDBBackend(MariaDBBlobs, MariaDBReads, MariaDBWrites, MariaDBReplication, MariaDBPack,
                     Backend):
    """Storage backend on a MariaDB (or MySQL) database in NEO's schema."""

    name = 'MariaDB'
    errors, input_errors = _errors()

    def __init__(self, database: str, engine: str | None = None, dedup: bool | None = None,
                 **options: object) -> None:
        self._reject_options(options)
        if _driver is None:
            raise ValueError('the MariaDB adapter needs the mariadb driver'
                             ' (pip install neozodb[mariadb])')
        self.database = database
        self._args = S.parse_database(database)
        if engine is None:
            engine = 'InnoDB'
        for known in S.ENGINES:
            if engine.lower() == known.lower():
                engine = known
                break
        else:
            raise ValueError(f'unknown engine {engine!r} (available: {", ".join(S.ENGINES)})')
        self.engine = engine
        self.dedup = bool(dedup)
        self._conn = None
        self._cur = None
        self._stmts: dict = {}
        self._dirty = False          # uncommitted writes in the open transaction
        self._keep_pending = False   # they include unlocks/aborts (kept at close)
        self._np: int | None = None
        self._nid: int | None = None
        self._nid_known = False
        self._version = ''
        self._datadir: str | None = None
        # next data id of each partition (NEO allocates them per partition)
        self._next_data_id: dict[int, int] = {}
        self._held: Counter[int] = Counter()
        self._voted_pack_ttids: set[int] | None = None   # see _voted_packs

    # -- connection ------------------------------------------------------------

    @property
    def lock_name(self) -> str:
        return f'{self._args["database"]}.{S.LOCK_SUFFIX}'

    def _connect(self) -> None:
        conn = _driver.connect(autocommit=False, **self._args)
        try:
            cur = conn.cursor()
            cur.execute(S.SESSION)
            cur.execute(S.ISOLATION)
            cur.execute(S.GET_LOCK, (self.lock_name,))
            if not cur.fetchone()[0]:
                raise RuntimeError(f'database {self._args["database"]} is locked by another'
                                   ' storage node (NEO or neozodb)')
            cur.execute(S.FLUSH_SETTING)
            flush, packet, self._version, self._datadir = cur.fetchone()
            if int(flush) != 1:
                log.warning('MariaDB database %s: innodb_flush_log_at_trx_commit=%s: commits'
                            ' are not fsynced, a server crash may lose committed transactions',
                            self._args['database'], flush)
            self._max_packet = int(packet)
        except BaseException:
            conn.close()
            raise
        self._conn, self._cur = conn, cur
        self._stmts = {}
        self._dirty = self._keep_pending = False

    def _disconnect(self) -> None:
        conn, self._conn, self._cur = self._conn, None, None
        self._stmts = {}
        if conn is not None:
            try:
                conn.close()
            except _driver.Error:
                pass

    def _q(self, sql: str, params: Sequence = ()) -> list[tuple]:
        """Run a statement and return its rows ([] if none).  A transient
        failure is retried on a new connection when nothing was pending."""
        if self._conn is None:
            raise RuntimeError('backend is not open')
        write = _is_write(sql)
        retries = 2
        while True:
            clean = not self._dirty
            try:
                if write:
                    self._dirty = True
                if params:
                    # a cursor per statement keeps it prepared on the server:
                    # one round trip per execution (the driver would prepare
                    # it again each time on a shared cursor)
                    cur = self._stmts.get(sql)
                    if cur is None:
                        cur = self._stmts[sql] = self._conn.cursor(prepared=True)
                    cur.execute(sql, tuple(params))
                else:
                    cur = self._cur
                    cur.execute(sql)
                return cur.fetchall() if cur.description else []
            except _driver.Error as e:
                code = getattr(e, 'errno', None)
                if not (clean and retries and (code in S.GONE or code in S.RETRY)):
                    raise
                retries -= 1
                log.info('MariaDB database %s: %s; retrying on a new connection',
                         self._args['database'], e)
                self._dirty = False
                self._disconnect()
                self._connect()

    def _many(self, sql: str, rows: Sequence[Sequence]) -> None:
        if rows:
            self._dirty = True
            self._cur.executemany(sql, [tuple(r) for r in rows])

    def _scalar(self, sql: str, params: Sequence = ()):
        rows = self._q(sql, params)
        return rows[0][0] if rows else None

    # -- lifecycle ----------------------------------------------------------

    def open(self, reset: bool = False) -> None:
        if self._conn is None:
            self._connect()
        try:
            if reset:
                self._q(S.DROP)
                self._q(B.DROP)
            elif self._q(S.HAS_CONFIG):
                version = self.get_config('version')
                if version is not None and version != S.SCHEMA_VERSION:
                    raise ValueError(
                        f'{self._args["database"]}: NEO schema version {version}, expected'
                        f' {S.SCHEMA_VERSION} (let a NEO storage node of a recent version'
                        ' migrate it first)')
            self._create_tables()
            self._commit()
        except BaseException:
            self.close()
            raise
        self._reset_caches()
        self._np = self.get_num_partitions()

    def _reset_caches(self) -> None:
        self._np = None
        self._nid_known = False
        self._next_data_id.clear()
        self._held.clear()
        self._voted_pack_ttids = None
        self._next_blob = None

    def _create_tables(self) -> None:
        if self.engine != 'InnoDB':
            support = self._scalar(S.ENGINE_SUPPORT, (self.engine,))
            if support not in ('YES', 'DEFAULT'):
                raise ValueError(f'the server has no {self.engine} engine')
        fresh = not self._q(S.HAS_CONFIG)
        for _table, sql in S.schema(self.engine, self.dedup):
            self._q(sql)
        for sql in B.schema(self.engine):
            self._q(sql)
        if fresh:
            self._q(S.SET_CONFIG, ('version', S.SCHEMA_VERSION))
        if not self._q(S.HASH_INDEXES):
            # a database of NEO's without --dedup: an index to find
            # identical data rows that NEO does not take for its own
            self._q(S.ADD_HASH_INDEX)

    def close(self) -> None:
        if self._conn is not None:
            try:
                # unlocks and aborts are kept; lone store_data rows (never
                # voted) are not, as a crash would lose them
                if self._keep_pending:
                    self._conn.commit()
                else:
                    self._conn.rollback()
            except _driver.Error:
                pass
        self._disconnect()
        self._dirty = self._keep_pending = False
        self._reset_caches()

    def erase(self) -> None:
        # DDL commits implicitly: whatever was pending goes with the tables
        self._q(S.DROP)
        self._q(B.DROP)
        self._create_tables()
        self._commit()
        self._reset_caches()

    def device_path(self) -> str | None:
        """The server's data directory (NEO's topology path), when this
        machine sees it."""
        return self._datadir

    def describe(self) -> str:
        where = self._args.get('unix_socket') or '%s:%s' % (
            self._args.get('host', 'localhost'), self._args.get('port', 3306))
        return f'MariaDB {self._version} ({self.engine}) database' \
               f' {self._args["database"]!r} at {where}'

    # -- transaction control -------------------------------------------------

    def _commit(self) -> None:
        """Commit the open transaction; durable when it returns."""
        self._conn.commit()
        self._dirty = self._keep_pending = False

    @contextmanager
    def _txn(self, durable: bool, keep: bool = True) -> Iterator[None]:
        """One operation; on error only its own writes are undone (a
        savepoint), never the pending writes of earlier operations.  Not
        durable: committed by the next durable one, or at close if ``keep``
        (what a crash may lose but a clean stop keeps)."""
        if self._conn is None:
            raise RuntimeError('backend is not open')
        # nothing pending: a failure rolls the whole transaction back, no
        # savepoint needed (a savepoint of the same name replaces the last
        # one: none is ever released)
        was_dirty = self._dirty
        if was_dirty:
            self._q(S.SAVEPOINT)
        try:
            yield
        except BaseException:
            self._voted_pack_ttids = None   # read again: what it undid may have changed it
            if self._conn is not None:
                try:
                    if was_dirty:
                        self._cur.execute(S.ROLLBACK_TO)
                    else:
                        self._conn.rollback()
                        self._dirty = False
                except _driver.Error:
                    pass
            raise
        if durable:
            self._commit()
        elif keep:
            self._keep_pending = True

    def commit_pending(self) -> None:
        if self._conn is not None and self._dirty:
            self._commit()

    def _partitions(self) -> int:
        np = self._np
        if np is None:
            raise ValueError('number of partitions is not set')
        return np

    # -- configuration ---------------------------------------------------------

    def get_config(self, name: str) -> str | None:
        value = self._scalar(S.GET_CONFIG, (name,))
        return None if value is None else bytes(value).decode()

    def set_config(self, name: str, value: str | None) -> None:
        with self._txn(durable=True):
            self._set_config(name, value)

    def _set_config(self, name: str, value: str | None) -> None:
        if value is None:
            self._q(S.DEL_CONFIG, (name,))
        else:
            self._q(S.SET_CONFIG, (name, str(value)))
        if name == self.CONFIG_PARTITIONS:
            self._np = None if value is None else int(value)
        elif name == self.CONFIG_NID:
            self._nid_known = False
            if value is not None:
                # NEO wants a pack id on each cell of its own
                self._q(S.OWN_PACK_DEFAULT, (int(value),))

    def _own_nid(self) -> int | None:
        if not self._nid_known:
            self._nid = self.get_nid()
            self._nid_known = True
        return self._nid

    def get_num_partitions(self) -> int | None:
        if self._conn is not None and self._np is not None:
            return self._np
        value = self.get_config(self.CONFIG_PARTITIONS)
        if value is not None:
            return int(value)
        # NEO's databases: one more than the greatest partition of pt
        top = self._scalar(S.MAX_PARTITION)
        return None if top is None else top + 1

    # NEO writes these two tids as 16 hex digits
    def get_truncate_tid(self) -> int | None:
        value = self.get_config(self.CONFIG_TRUNCATE_TID)
        return None if value is None else int(value, 16)

    def set_truncate_tid(self, tid: int | None) -> None:
        self.set_config(self.CONFIG_TRUNCATE_TID, None if tid is None else '%016x' % tid)

    # -- partition table -------------------------------------------------------

    def get_pt(self) -> PartitionTableRecord:
        ptid = self.get_config(self.CONFIG_PTID)
        replicas = self.get_config(self.CONFIG_REPLICAS)
        rows: list[list[tuple[int, int]]] = [[] for _ in range(self._np or 0)]
        for offset, nid, tid in self._q(S.GET_PT):
            if offset < len(rows):
                rows[offset].append((nid, max(0, -tid)))
        return (None if ptid is None else int(ptid),
                0 if replicas is None else int(replicas), rows)

    def _write_cell(self, offset: int, nid: int, state: int, own: int | None) -> None:
        if nid != own:
            self._q(S.SET_CELL, (offset, nid, -state, None))
            return
        done = self._pack_done(offset)
        if state == _OUT_OF_DATE:
            tid = self._replication_mirror(offset)
            self._q(S.SET_OWN_OOD_CELL, (offset, nid, tid, done))
        else:
            self._q(S.SET_CELL, (offset, nid, -state, done))

    def save_pt(self, ptid: int, num_replicas: int,
                rows: Sequence[Iterable[tuple[int, int]]]) -> None:
        np = self._np
        if np is not None and len(rows) != np:
            raise ValueError(f'partition table has {len(rows)} rows, expected {np}')
        if not rows:
            raise ValueError('empty partition table')
        cells = {(offset, int(nid)): int(state)
                 for offset, row in enumerate(rows) for nid, state in row}
        own = self._own_nid()
        with self._txn(durable=True):
            for offset, nid, _ in self._q(S.GET_PT):
                if (offset, nid) not in cells:
                    self._q(S.DEL_CELL, (offset, nid))
            for (offset, nid), state in sorted(cells.items()):
                self._write_cell(offset, nid, state, own)
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
        own = self._own_nid()
        with self._txn(durable=True):
            for offset, nid, state in changes:
                if state == DISCARDED:
                    self._q(S.DEL_CELL, (offset, nid))
                else:
                    self._write_cell(offset, nid, state, own)
            self._set_config(self.CONFIG_PTID, str(int(ptid)))
            self._set_config(self.CONFIG_REPLICAS, str(int(num_replicas)))

    def _own_cell(self, partition: int) -> tuple[int, int | None] | None:
        """(tid, pack) of this node's cell of ``partition``, None if none."""
        own = self._own_nid()
        if own is None:
            return None
        rows = self._q(S.OWN_CELL, (partition, own))
        return (rows[0][0], rows[0][1]) if rows else None

    # -- ids -----------------------------------------------------------------

    def last_ids(self, partitions: Iterable[int] | None = None
                 ) -> tuple[int | None, int | None]:
        np = self._np
        if np is None:
            return None, None
        wanted = set(range(np) if partitions is None else partitions)
        tids: list[int] = []
        oids: list[int] = []
        # one indexed MAX per partition and table
        for p in wanted:
            for sql, out in ((S.MAX_TRANS_TID, tids), (S.MAX_OBJ_TID, tids),
                             (S.MAX_OBJ_OID, oids)):
                value = self._scalar(sql, (p,))
                if value is not None:
                    out.append(value)
        tids += [tid for p, tid in self._q(S.LOCKED_TTRANS_TIDS) if p in wanted]
        oids += [oid for p, oid in self._q(S.TOBJ_MAX_OIDS) if p in wanted]
        return max(tids, default=None), max(oids, default=None)

    def first_tid(self) -> int | None:
        tids = []
        for p in range(self._np or 0):
            for sql in (S.MIN_TRANS_TID, S.MIN_OBJ_TID):
                value = self._scalar(sql, (p,))
                if value is not None:
                    tids.append(value)
        return min(tids, default=None)
