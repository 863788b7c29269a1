"""SQLite backend: the shared conformance tests plus SQLite specifics
(connection settings, schema, durability across a real process crash)."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from neozodb.storage.backends import Backend, open_backend
from neozodb.storage.backends.sqlite import SQLiteBackend

try:  # tests/unit may or may not become a package
    from .backend_conformance import NP, BackendConformance
except ImportError:
    from backend_conformance import NP, BackendConformance

pytestmark = pytest.mark.timeout(60)

SRC = str(Path(__file__).resolve().parents[2] / 'src')


def h(data: bytes) -> bytes:
    return hashlib.sha1(data).digest()


def pragma(backend: SQLiteBackend, name: str):
    return backend.connection.execute(f'PRAGMA {name}').fetchone()[0]


class TestSQLiteBackend(BackendConformance):

    def make_backend(self, tmp_path) -> Backend:
        return SQLiteBackend(str(tmp_path / 'storage.sqlite'))

    # -- SQLite specifics ------------------------------------------------------

    def test_a_burst_of_data_rows_takes_ids_never_used(self, db):
        """``store_data_many`` of a burst (without deduplication): one row
        per item, in order, under ids above every id ever allocated (a
        pruned row's too), each held once."""
        if db.deduplicates:
            assert not db.batched_data  # rows are looked up one at a time
            return
        assert db.batched_data
        gone = db.store_data(h(b'gone'), 0, b'gone', 1)
        db.release_data([gone], prune=True)
        assert db.load_data(gone) is None
        items = [(h(b'%d' % i), i % 2, b'%d' % i, i) for i in range(db.batched_data_min + 150)]
        ids = db.store_data_many(items)
        assert ids == list(range(gone + 1, gone + 1 + len(items)))
        assert [db.load_data(i) for i in ids] == [item[:3] for item in items]
        db.release_data(ids[:10], prune=True)
        assert [db.load_data(i) for i in ids[:11]] == [None] * 10 + [items[10][:3]]
        assert db.store_data(h(b'next'), 0, b'next', 1) == ids[-1] + 1

    def test_connection_settings(self, db):
        assert pragma(db, 'journal_mode') == 'wal'
        assert pragma(db, 'synchronous') == 1          # NORMAL: we sync the WAL
        assert pragma(db, 'foreign_keys') == 0
        assert db.connection.isolation_level is None
        assert not db.connection.in_transaction

    def test_durable_points_sync_the_wal(self, db, monkeypatch):
        synced = []
        real = os.fdatasync

        def fdatasync(fd):
            synced.append(os.readlink('/proc/self/fd/%d' % fd))
            real(fd)
        monkeypatch.setattr(os, 'fdatasync', fdatasync)
        data_id = db.store_data(h(b'x'), 0, b'x')
        assert synced == []
        db.store_transaction(8, [(1, data_id, None)], ([1], b'', b'', b'', False))
        assert synced == [os.path.realpath(db.database) + '-wal']
        # group commit: committed at once, synced when asked
        with db.sync_later():
            db.lock_transaction(8, 12)
        assert not db.connection.in_transaction and len(synced) == 1
        db.sync()
        assert len(synced) == 2
        db.unlock_transaction(8, 12)
        assert len(synced) == 2

    def test_non_durable_writes_wait_for_the_next_durable_point(self, db, opener):
        data_id = db.store_data(h(b'x'), 0, b'x')
        # store_data leaves the write transaction open (nothing fsynced)
        assert db.connection.in_transaction
        db.store_transaction(8, [(1, data_id, None)], ([1], b'', b'', b'', False))
        assert not db.connection.in_transaction
        db.lock_transaction(8, 12)
        assert not db.connection.in_transaction
        db.unlock_transaction(8, 12)
        # visible at once, on disk later
        assert db.connection.in_transaction
        assert db.get_object(1)[:2] == (12, None)
        db.commit_pending()
        assert not db.connection.in_transaction
        assert pragma(db, 'synchronous') == 1          # never changed
        # a graceful close keeps a pending unlock
        db.store_data(h(b'y'), 0, b'y')
        db.store_transaction(16, [(2, db.store_data(h(b'y'), 0, b'y'), None)],
                             ([2], b'', b'', b'', False))
        db.lock_transaction(16, 20)
        db.unlock_transaction(16, 20)
        db = self.reopen(db, opener)
        assert db.get_object(2)[:2] == (20, None)

    def test_commit_points(self, db):
        # One COMMIT (then a sync of the WAL) per durable point,
        # including whatever was pending; none for unlock and abort.
        statements: list[str] = []
        db.connection.set_trace_callback(statements.append)

        def commits() -> list[list[str]]:
            """The statements of each committed transaction."""
            out, current = [], []
            for sql in statements:
                if sql == 'COMMIT':
                    out.append(current)
                    current = []
                elif not sql.startswith(('BEGIN', 'SAVEPOINT', 'RELEASE')):
                    current.append(sql)
            statements.clear()
            return out

        pending = db.store_data(h(b'other txn'), 0, b'other txn')
        data_id = db.store_data(h(b'x'), 0, b'x')
        db.store_transaction(8, [(1, data_id, None)], ([1], b'', b'', b'', False))
        (vote,) = commits()
        assert any(sql.startswith('INSERT INTO data') for sql in vote)  # pending rows
        assert any(sql.startswith('INSERT OR REPLACE INTO tobj') for sql in vote)
        db.lock_transaction(8, 12)
        (lock,) = commits()
        assert any(sql.startswith('UPDATE ttrans') for sql in lock)
        db.unlock_transaction(8, 12)
        db.abort_transaction(16)
        assert db.connection.in_transaction  # not committed
        db.set_config('k', 'v')
        (config,) = commits()  # the unlock went with it
        assert any(sql.startswith('INSERT OR REPLACE INTO trans') for sql in config)
        assert any('config' in sql for sql in config)
        db.connection.set_trace_callback(None)
        assert pragma(db, 'synchronous') == 1          # NORMAL: durability by our sync
        assert db.load_data(pending) is not None

    def test_failed_operation_keeps_earlier_pending_writes(self, db, opener):
        self.commit(db, 24, {3: b'kept'})  # its unlock is pending
        assert db.connection.in_transaction
        with pytest.raises(RuntimeError):
            with db._txn(durable=True) as conn:
                conn.execute('DELETE FROM obj')
                raise RuntimeError('operation failed half way')
        assert db.get_object(3)[:2] == (24, None)  # only the failed part undone
        db.commit_pending()
        db = self.reopen(db, opener)
        assert db.get_object(3)[:2] == (24, None)

    def test_schema(self, db):
        conn = db.connection
        tables = {name for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table'")}
        assert {'config', 'pt', 'trans', 'obj', 'data', 'ttrans', 'tobj'} <= tables
        indexes = {name for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='index' AND sql IS NOT NULL")}
        assert {'obj_tid', 'obj_data_id'} <= indexes
        # the hash index that finds identical rows only with dedup; without,
        # the partial one of blob revisions
        assert ('data_hash' in indexes) is db.deduplicates
        assert ('data_blob_hash' in indexes) is not db.deduplicates
        columns = [row[1] for row in conn.execute('PRAGMA table_info(trans)')]
        assert columns == ['partition', 'tid', 'packed', 'oids', 'user', 'description',
                           'ext', 'ttid']
        assert db.get_config('version') == '1'

    def test_reads_use_indexes(self, db):
        # The hot paths must be index searches, never scans.
        conn = db.connection
        for sql, params in [
            ('SELECT MAX(tid) FROM obj WHERE partition=? AND oid=?', (1, 1)),
            ('SELECT o.tid FROM obj AS o LEFT JOIN data AS d ON d.id = o.data_id'
             ' WHERE o.partition=? AND o.oid=? ORDER BY o.tid DESC LIMIT 1', (1, 1)),
            ('SELECT MAX(tid) FROM obj WHERE partition=?', (1,)),
        ]:
            plan = ' '.join(row[3] for row in conn.execute('EXPLAIN QUERY PLAN ' + sql, params))
            assert 'SCAN' not in plan, plan

    def test_oids_blob_format(self, db):
        self.commit(db, 20, {1: b'a', 258: b'b'})
        (blob,) = db.connection.execute('SELECT oids FROM trans').fetchone()
        assert blob == (1).to_bytes(8, 'big') + (258).to_bytes(8, 'big')

    def test_unsupported_schema_version(self, tmp_path, opener):
        db = opener(reset=True)
        db.set_config('version', '999')
        db.close()
        with pytest.raises(ValueError, match='schema version'):
            opener()
        db = opener(reset=True)
        assert db.get_config('version') == '1'

    def test_uncommitted_store_data_is_discarded_on_close(self, opener, db):
        data_id = db.store_data(h(b'pending'), 0, b'pending')
        db = self.reopen(db, opener)
        assert db.load_data(data_id) is None

    def test_committed_data_survives_reopen(self, opener, db):
        self.commit(db, 24, {3: b'persistent'})
        db = self.reopen(db, opener)
        assert db.get_object(3) == (24, None, 0, h(b'persistent'), b'persistent', None)
        assert db.get_num_partitions() == NP

    def test_votes_raise_the_orphan_floor(self, opener, db):
        """drop_unfinished looks for orphans above the orphan floor; votes
        raise it (every 1000 new ids), so that a start after a crash does
        not scan every data row written since the previous start."""
        self.commit(db, 100, {oid: b'v%d' % oid for oid in range(1, 1201)})  # ids 1..1200
        assert db.get_config('orphan_floor') is None  # all held during that vote
        lost = db.store_data(h(b'never voted'), 0, b'never voted')
        self.commit(db, 104, {oid: b'w%d' % oid for oid in range(1, 1001)})  # durable: `lost` too
        assert int(db.get_config('orphan_floor')) == lost - 1 == 1200  # `lost` is held
        db = self.reopen(db, opener)  # as after a crash: `lost` was never voted
        db.drop_unfinished()
        assert db.load_data(lost) is None
        assert db.get_object(1)[4] == b'w1' and db.get_object(1200)[4] == b'v1200'
        assert db.prune_orphans() == 0

    def test_process_crash_after_lock(self, tmp_path):
        # Kill the process right after lock_transaction returns, without
        # closing the connection: the lock (and the vote) must be on disk.
        path = tmp_path / 'crash.sqlite'
        script = textwrap.dedent(f"""
            import hashlib, os
            from neozodb.storage.backends import open_backend
            db = open_backend('sqlite', {str(path)!r})
            db.set_num_partitions(4)
            d = db.store_data(hashlib.sha1(b'v').digest(), 0, b'v')
            db.store_transaction(8, [(5, d, None)], ([5], b'u', b'', b'', False))
            db.lock_transaction(8, 12)
            os._exit(0)
        """)
        env = dict(os.environ, PYTHONPATH=SRC)
        subprocess.run([sys.executable, '-c', script], check=True, env=env, timeout=30)
        db = open_backend('SQLite', str(path))
        try:
            assert db.get_locked_transactions() == {8: 12}
            assert db.get_final_tid(8) == 12
            db.drop_unfinished()
            db.validate_transaction(8, 12)
            assert db.get_object(5) == (12, None, 0, h(b'v'), b'v', None)
        finally:
            db.close()

    def test_replicated_chunk_never_reuses_a_data_id(self, db):
        """add_objects allocates data ids itself: never one given before,
        even when the row that had it (the last one) was deleted."""
        self.commit(db, 100, {1: b'a', 5: b'b'})
        ids = dict(db.connection.execute('SELECT value, id FROM data'))
        db.delete_objects(1, [(100, 5)])  # b'b', the highest id, goes
        assert b'b' not in dict(db.connection.execute('SELECT value, id FROM data'))
        db.add_objects(1, [(9, 104, 0, h(b'c'), b'c', None), (13, 104, 0, h(b'a'), b'a', None)])
        after = dict(db.connection.execute('SELECT value, id FROM data'))
        if db.deduplicates:
            assert after[b'a'] == ids[b'a']
        else:
            assert after[b'a'] > ids[b'b']  # a row of its own, never an old id
        assert after[b'c'] > ids[b'b']
        assert self.commit(db, 108, {17: b'd'})[17] > after[b'c']

    def test_resume_point_not_durable_goes_with_its_rows(self, db, tmp_path):
        """set_replication(durable=False) writes the point in the pending
        transaction of the chunk's rows: another reader (what a restart
        after a crash would find) sees neither until they are committed,
        then both."""
        db.set_replication(1, (0, 0, 0))
        db.add_objects(1, [(5, 100, 0, h(b'x'), b'x', None)])
        db.set_replication(1, (0, 101, 0), durable=False)
        assert db.connection.in_transaction
        other = sqlite3.connect(str(tmp_path / 'storage.sqlite'))
        try:
            def seen():
                return (other.execute('SELECT next_obj_tid FROM replication').fetchall(),
                        other.execute('SELECT COUNT(*) FROM obj').fetchone()[0])
            assert seen() == ([(0,)], 0)
            db.commit_pending()
            assert seen() == ([(101,)], 1)
        finally:
            other.close()

    def test_connection_usable_from_another_thread(self, db):
        self.commit(db, 28, {1: b'threaded'})
        result = []
        thread = threading.Thread(target=lambda: result.append(db.get_object(1)))
        thread.start()
        thread.join(10)
        assert result and result[0][4] == b'threaded'

    def test_close_is_idempotent_and_reads_fail_when_closed(self, db):
        db.close()
        db.close()
        with pytest.raises(RuntimeError):
            db.get_config('name')

    def test_describe(self, db):
        assert 'SQLite' in db.describe()
        assert 'storage.sqlite' in db.describe()
        assert SQLiteBackend.name == 'SQLite'


def test_open_backend_adapter_names(tmp_path):
    for i, adapter in enumerate(('SQLite', 'sqlite', 'SQLITE')):
        db = open_backend(adapter, str(tmp_path / f'{i}.sqlite'))
        try:
            assert isinstance(db, SQLiteBackend)
            assert db.get_config('version') == '1'   # opened, schema created
        finally:
            db.close()



class TestSQLiteDedupBackend(TestSQLiteBackend):
    """Everything again on a database made with ``dedup``."""

    def make_backend(self, tmp_path) -> Backend:
        return SQLiteBackend(str(tmp_path / 'storage.sqlite'), dedup=True)


def _rows(db: SQLiteBackend) -> int:
    return db.connection.execute('SELECT COUNT(*) FROM data').fetchone()[0]


def test_deduplication_is_chosen_when_the_database_is_made(tmp_path):
    """Without ``dedup`` (the default, as NEO's --dedup) equal data gets a
    row per store, blob revisions excepted; the database keeps what it was
    made with, and ``dedup`` given later turns it on for good."""
    path = str(tmp_path / 'd.sqlite')
    db = open_backend('SQLite', path)
    try:
        assert not db.deduplicates and 'deduplicated' not in db.describe()
        a, b = (db.store_data(h(b'same'), 0, b'same') for _ in range(2))
        assert a != b and _rows(db) == 2
        # blob revisions (BLOB_FLAG) are still found, through their own index
        c, d = (db.store_data(h(b'blob'), 0x81, b'blob') for _ in range(2))
        assert c == d and _rows(db) == 3
        plan = ' '.join(row[3] for row in db.connection.execute(
            'EXPLAIN QUERY PLAN SELECT id FROM data WHERE hash=? AND compression=? AND value=?'
            ' AND compression >= 128', (h(b'blob'), 0x81, b'blob')))
        assert 'data_blob_hash' in plan and 'SCAN' not in plan, plan
    finally:
        db.close()
    db = open_backend('SQLite', path, dedup=True)
    try:
        assert db.deduplicates and 'data deduplicated' in db.describe()
        e = db.store_data(h(b'new'), 0, b'new')
        assert db.store_data(h(b'new'), 0, b'new') == e
    finally:
        db.close()
    db = open_backend('SQLite', path)  # no option: the index is there, kept
    try:
        assert db.deduplicates
        assert db.store_data(h(b'new'), 0, b'new') == e
    finally:
        db.close()


def test_a_database_made_with_dedup_keeps_it(tmp_path):
    """Databases made before dedup was an option have its index: they go
    on deduplicating without the option."""
    path = str(tmp_path / 'old.sqlite')
    SQLiteBackend(path, dedup=True).open()
    db = open_backend('SQLite', path)
    try:
        assert db.deduplicates
        a = db.store_data(h(b'x'), 0, b'x')
        assert db.store_data(h(b'x'), 0, b'x') == a
    finally:
        db.close()


def test_neostorage_dedup_option_on_sqlite(tmp_path):
    """``neostorage -a SQLite --dedup``: the database is made with it."""
    from neozodb.cli.config import parse_options
    from neozodb.cli.storage import _backend_options
    options = parse_options("storage", ['-c', 'c', '-m', '127.0.0.1:1', '-a', 'SQLite',
                                        '-d', str(tmp_path / 's.sqlite'), '--dedup'])
    db = open_backend(options.adapter, options.database, **_backend_options(options))
    try:
        assert db.deduplicates
    finally:
        db.close()

def test_open_backend_reset(tmp_path):
    path = str(tmp_path / 'r.sqlite')
    db = open_backend('sqlite', path)
    db.set_name('old')
    db.close()
    db = open_backend('sqlite', path, reset=True)
    try:
        assert db.get_name() is None
    finally:
        db.close()


def test_open_backend_unknown_adapter(tmp_path):
    with pytest.raises(ValueError, match='^unknown adapter: NoSuchDB$'):
        open_backend('NoSuchDB', str(tmp_path / 'x'))


def test_unknown_option_rejected(tmp_path):
    with pytest.raises(ValueError, match='bogus'):
        SQLiteBackend(str(tmp_path / 'x.sqlite'), bogus=1)


def test_sqlite_version_supports_wal():
    assert sqlite3.sqlite_version_info >= (3, 7, 0)


@pytest.mark.parametrize('count', [0, 1, 99, 100, 101, 250])
def test_rows_are_inserted_many_per_statement_in_order(count):
    from neozodb.storage.backends.sqlite_schema import _ROWS_PER_INSERT, _insert_rows
    conn = sqlite3.connect(':memory:', isolation_level=None)
    conn.execute('CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT, n INTEGER)')
    statements = []
    conn.set_trace_callback(statements.append)
    # the last of two rows with the same key wins, as with executemany
    rows = [(i % 97, 'v%d' % i, i) for i in range(count)]
    _insert_rows(conn, 'INSERT OR REPLACE INTO t (k, v, n) VALUES (?, ?, ?)', rows)
    expected = {k: (v, n) for k, v, n in rows}
    assert len(statements) == count // _ROWS_PER_INSERT + count % _ROWS_PER_INSERT
    assert {k: (v, n) for k, v, n in conn.execute('SELECT k, v, n FROM t')} == expected
