"""PostgreSQL backend: the shared conformance tests on a throw-away server
(tests/pgserver.py), plus PostgreSQL specifics: one storage node per
database, a lost connection, durable points seen from another connection,
bad values, the command line."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from neozodb.storage.backends import Backend, open_backend

try:  # tests/unit may or may not become a package
    from .backend_conformance import NP, BackendConformance
except ImportError:
    from backend_conformance import NP, BackendConformance

from pgserver import skip_reason

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or '')]

SRC = str(Path(__file__).resolve().parents[2] / 'src')


def h(data: bytes) -> bytes:
    return hashlib.sha1(data).digest()


class TestPostgreSQLBackend(BackendConformance):

    @pytest.fixture(autouse=True)
    def _server(self, postgresql_server):
        # every test opens its databases with reset=True first: the same
        # few databases serve every test, in the order a test asks for them
        self.server = postgresql_server
        self.names: dict[Path, str] = {}

    def make_backend(self, tmp_path) -> Backend:
        from neozodb.storage.backends.postgresql import PostgreSQLBackend
        name = self.names.get(tmp_path)
        if name is None:
            name = self.names[tmp_path] = f'conformance{len(self.names)}'
        return PostgreSQLBackend(self.server.database(name))

    def other_connection(self, backend):
        import psycopg
        return psycopg.connect(backend.database, autocommit=True)

    # -- PostgreSQL specifics -----------------------------------------------------

    def test_second_node_on_the_database_is_refused(self, opener, db, tmp_path):
        with pytest.raises(RuntimeError, match='in use by another storage node'):
            opener()
        db.close()
        second = opener()      # the lock went with the first connection
        assert second.get_num_partitions() == NP
        # the wait for the lock is for the lock alone
        assert second.connection.execute("SHOW lock_timeout").fetchone()[0] == "0"

    def test_a_node_waits_for_the_lock_of_one_stopping(self, opener, db):
        """The session of a node that just stopped may end a little later on
        the server: the next node waits for its lock (LOCK_WAIT) rather
        than refusing to start."""
        import threading
        stopping = threading.Timer(0.3, db.close)  # the previous node, stopping meanwhile
        stopping.start()
        try:
            second = opener()
        finally:
            stopping.join()
        assert second.get_num_partitions() == NP

    def test_lost_connection_stops_and_leaves_nothing_half_written(self, opener, db):
        import psycopg
        self.commit(db, 8, {1: b'committed'})
        # voted and locked (durable), unlocked (pending), then a store
        # (pending) when the server drops the connection
        data_id = db.store_data(h(b'two'), 0, b'two')
        db.store_transaction(20, [(2, data_id, None)], ([2], b'u', b'd', b'', False))
        db.lock_transaction(20, 24)
        db.unlock_transaction(20, 24)
        assert db.get_object(2)[0] == 24     # visible to this connection
        db.store_data(h(b'three'), 0, b'three')
        pid = db.connection.info.backend_pid
        with self.other_connection(db) as other:
            assert other.execute('SELECT pg_terminate_backend(%s)', (pid,)).fetchone()[0]
        with pytest.raises(db.errors) as raised:
            db.store_data(h(b'four'), 0, b'four')
        assert not isinstance(raised.value, db.input_errors)
        assert isinstance(raised.value, psycopg.OperationalError)
        db.close()  # no error: the server rolled back what was pending
        db = opener()
        # the unlock was lost with the connection; the lock is durable, so
        # verification can replay it; no data row of the lost stores
        assert db.get_object(2) is None
        assert db.get_locked_transactions() == {20: 24}
        assert db.get_object(1)[4] == b'committed'
        with self.other_connection(db) as other:
            values = {row[0] for row in other.execute('SELECT value FROM data')}
        assert values == {b'committed', b'two'}
        db.drop_unfinished()
        db.validate_transaction(20, 24)
        assert db.get_object(2)[4] == b'two'

    def test_durable_points_are_committed(self, db):
        with self.other_connection(db) as other:
            def count(sql):
                return other.execute(sql).fetchone()[0]
            data_id = db.store_data(h(b'x'), 0, b'x')
            assert count('SELECT COUNT(*) FROM data') == 0      # pending
            db.store_transaction(10, [(1, data_id, None)], ([1], b'u', b'd', b'', False))
            assert count('SELECT COUNT(*) FROM data') == 1      # vote: committed
            assert count('SELECT COUNT(*) FROM ttrans WHERE tid IS NULL') == 1
            db.lock_transaction(10, 13)
            assert count('SELECT COUNT(*) FROM ttrans WHERE tid=13') == 1
            db.unlock_transaction(10, 13)
            assert count('SELECT COUNT(*) FROM trans') == 0     # pending
            db.commit_pending()
            assert count('SELECT COUNT(*) FROM trans') == 1
            assert count("SELECT setting FROM pg_settings WHERE name='synchronous_commit'"
                         ) == 'on'

    def test_group_commit_at_sync(self, db):
        with self.other_connection(db) as other:
            def count(sql):
                return other.execute(sql).fetchone()[0]
            assert db.defers_sync
            with db.sync_later():
                for ttid in (10, 11):
                    data_id = db.store_data(h(b'%d' % ttid), 0, b'%d' % ttid)
                    db.store_transaction(ttid, [(ttid, data_id, None)],
                                         ([ttid], b'', b'', b'', False))
                db.lock_transaction(10, 13)
            assert db.unsynced
            # the batch's durable points wait for sync(), which commits them
            assert count('SELECT COUNT(*) FROM ttrans') == 0
            db.store_data(h(b'pending'), 0, b'pending')   # left pending meanwhile
            before = count("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn")
            db.sync()
            assert not db.unsynced
            assert not db.connection.in_transaction     # the pending writes went too
            assert count('SELECT COUNT(*) FROM ttrans') == 2
            assert count('SELECT COUNT(*) FROM ttrans WHERE tid=13') == 1
            assert count('SELECT COUNT(*) FROM data') == 3
            # synchronous: flushed past what was written before the COMMIT
            assert count("SELECT pg_current_wal_flush_lsn() - '0/0'::pg_lsn") > before
            # a commit_pending in between commits (synchronously) instead
            with db.sync_later():
                db.lock_transaction(11, 14)
            db.commit_pending()
            assert count('SELECT COUNT(*) FROM ttrans WHERE tid=14') == 1
            db.sync()
            assert not db.unsynced

    def test_out_of_range_values_keep_pending_writes(self, db):
        self.commit(db, 8, {1: b'a'})
        data_id = db.store_data(h(b'b'), 0, b'b')
        db.unlock_transaction(999, 1000)   # nothing to move, but pending
        with pytest.raises(OverflowError):
            db.last_serial(1 << 64)          # refused before it is sent
        with pytest.raises(OverflowError):
            db.store_transaction(20, [(1 << 63, data_id, None)], None)
        with pytest.raises(db.input_errors):
            # two rows: one statement with arrays, refused by the server
            # inside the vote's savepoint
            db.store_transaction(20, [(3, data_id, None), (1 << 63, data_id, None)], None)
        assert db.connection.in_transaction
        db.store_transaction(20, [(2, data_id, None)], None)
        db.lock_transaction(20, 24)
        db.unlock_transaction(20, 24)
        assert db.get_object(2)[4] == b'b'

    def test_error_outside_a_savepoint_stops_the_backend(self, db):
        import psycopg
        db.store_data(h(b'b'), 0, b'b')
        with pytest.raises(psycopg.OperationalError, match='pending transaction aborted'):
            db.connection.execute('SELECT 1/0')
        with pytest.raises(db.errors):
            db.commit_pending()             # never a silent ROLLBACK

    def test_bulk_statements_do_what_row_by_row_does(self, db):
        # executemany sends one statement (arrays of the rows' columns):
        # INSERT OR REPLACE keeps the last row of a key, DELETE any listed
        from neozodb.storage.backends.sqlite_schema import _DEL_CONFIG, _SET_CONFIG
        conn = db.connection
        conn.executemany(_SET_CONFIG, [('a', '1'), ('b', '2'), ('a', '3'), ('c', '4')])
        assert [db.get_config(k) for k in 'abc'] == ['3', '2', '4']
        conn.executemany(_DEL_CONFIG, [('a',), ('missing',), ('c',)])
        assert [db.get_config(k) for k in 'abc'] == [None, '2', None]
        conn.executemany(_SET_CONFIG, [])
        db.commit_pending()

    def test_describe_hides_the_password(self, postgresql_server):
        from neozodb.storage.backends.postgresql import PostgreSQLBackend
        backend = PostgreSQLBackend(postgresql_server.database('conformance0')
                                    + ' password=secret')
        assert 'secret' not in backend.describe()
        with pytest.raises(ValueError, match='invalid PostgreSQL DSN'):
            PostgreSQLBackend('no dsn')
        with pytest.raises(ValueError, match='unknown PostgreSQL backend option'):
            PostgreSQLBackend('dbname=x', bogus=1)

    def test_open_backend_by_adapter_name(self, postgresql_server):
        backend = open_backend('postgresql', postgresql_server.database('conformance0'),
                               reset=True)
        try:
            assert backend.name == 'PostgreSQL'
            assert backend.describe().startswith('PostgreSQL 15.')
        finally:
            backend.close()


def test_neostorage_bad_dsn_is_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=SRC)
    for dsn in ('host=127.0.0.1 port=1 dbname=x connect_timeout=5', 'no dsn'):
        proc = subprocess.run(
            [sys.executable, '-m', 'neozodb.cli.storage', '-c', 'x', '-m', '127.0.0.1:1',
             '-a', 'PostgreSQL', '-d', dsn, '--wait', '0'],
            capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert proc.stdout == ''
        assert proc.stderr.count('\n') == 1, proc.stderr
        assert proc.stderr.startswith('neostorage: error: cannot open PostgreSQL database')
        assert 'Traceback' not in proc.stderr
