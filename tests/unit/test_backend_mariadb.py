"""MariaDB backend: the shared conformance tests on a throw-away MariaDB
server, plus its specifics: NEO's schema, the database lock, a lost
connection, values in bigdata, the ``-d`` syntax."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from neozodb.storage.backends import Backend, open_backend

try:  # tests/unit may or may not become a package
    from .backend_conformance import NP, BackendConformance
except ImportError:
    from backend_conformance import NP, BackendConformance

mariadb = pytest.importorskip('mariadb')
if not os.path.exists('/usr/sbin/mariadbd') and not shutil.which('mariadbd'):
    pytest.skip('no MariaDB server here (apt-get install mariadb-server)',
                allow_module_level=True)

from neozodb.storage.backends.mariadb import MariaDBBackend  # noqa: E402
from neozodb.storage.backends.mariadb_schema import parse_database  # noqa: E402
from neozodb.throwaway import mariadb as throwaway  # noqa: E402

pytestmark = pytest.mark.timeout(120)

SRC = str(Path(__file__).resolve().parents[2] / 'src')


def h(data: bytes) -> bytes:
    return hashlib.sha1(data).digest()


@pytest.fixture(scope='session')
def server(tmp_path_factory):
    from mdbserver import server_fixture
    yield from server_fixture(tmp_path_factory)


def db_name(tmp_path) -> str:
    return 't' + hashlib.sha1(str(tmp_path).encode()).hexdigest()[:16]


def admin(server):
    return mariadb.connect(user='root', unix_socket=server.socket, autocommit=True)


class TestMariaDBBackend(BackendConformance):

    @pytest.fixture(autouse=True)
    def _server(self, server):
        self.server = server

    def make_backend(self, tmp_path) -> Backend:
        return MariaDBBackend(self.server.database(db_name(tmp_path)))

    # -- MariaDB specifics -------------------------------------------------------

    def test_neo_schema_and_encodings(self, db):
        """NEO's tables and config values: what a NEO storage node reads."""
        data_id = db.store_data(h(b'five'), 0, b'five', oid=5)
        assert data_id == (5 % NP) << 48                    # per-partition ids
        db.store_data(h(b'other'), 0, b'other', oid=6)
        db.release_data([(6 % NP) << 48], prune=True)
        db.set_nid(0x10000001)
        db.set_truncate_tid(0x0123456789abcdef)
        db.save_pt(3, 1, [[(0x10000001, 1), (0x10000002, 0)]] * NP)
        db.change_pt(4, 1, [(2, 0x10000001, 0)])
        self.commit(db, 9, {5: b'five'})
        cur = db._conn.cursor()
        cur.execute("SHOW TABLES")
        assert {r[0] for r in cur.fetchall()} == {
            'config', 'pt', 'pack', 'trans', 'obj', 'data', 'bigdata', 'ttrans', 'tobj',
            'todel', 'neozodb_blob_chunk', 'neozodb_data_blob'}   # NEO's, and our blobs
        cur.execute("SELECT name, value FROM config")
        config = {bytes(k).decode(): bytes(v).decode() for k, v in cur.fetchall()}
        assert config['version'] == '4'
        assert config['nid'] == str(0x10000001)
        assert config['truncate_tid'] == '0123456789abcdef'
        assert config['ptid'] == '4' and config['replicas'] == '1'
        cur.execute("SELECT `partition`, nid, tid, pack FROM pt ORDER BY 1, 2")
        pt = cur.fetchall()
        assert (0, 0x10000001, -1, 0) in pt               # UP_TO_DATE, ours: a pack id
        assert (0, 0x10000002, 0, None) in pt             # OUT_OF_DATE, another node's
        assert (2, 0x10000001, 0, 0) in pt                # ours OUT_OF_DATE: replicated tid
        cur.execute("SELECT id, compression FROM data")
        assert cur.fetchall() == [(data_id, 0)]
        cur.execute("SELECT `partition`, oid, tid, data_id, value_tid FROM obj")
        assert cur.fetchall() == [(1, 5, 9, data_id, None)]
        cur.execute("SELECT oids, ttid FROM trans")
        assert cur.fetchall() == [((5).to_bytes(8, 'big'), 5)]

    def test_partitions_from_pt_of_a_neo_database(self, opener):
        db = opener(reset=True)
        db.save_pt(1, 0, [[(7, 1)]] * 6)
        db.set_config('partitions', None)            # NEO's version 4 has no such key
        db = self.reopen(db, opener)
        assert db.get_num_partitions() == 6

    def test_replication_point_mirrors_neo_cell_tid(self, opener, db):
        db.set_nid(7)
        db.save_pt(1, 0, [[(7, 0)]] * NP)
        self.commit(db, 100, {1: b'x'})
        db.set_replication(1, (120, 110, 5))
        assert db.get_replication(1) == (120, 110, 5)
        cur = db._conn.cursor()
        cur.execute("SELECT tid FROM pt WHERE `partition`=1")
        assert cur.fetchall() == [(109,)]
        # NEO replicated further since: its tid wins
        cur.execute("UPDATE pt SET tid=200 WHERE `partition`=1")
        db._conn.commit()
        assert db.get_replication(1) == (201, 201, 0)

    def test_commit_points_seen_from_another_connection(self, server, db, tmp_path):
        """Vote and lock commit (the server fsyncs each commit); stores,
        unlocks and aborts wait for the next durable point."""
        def seen(sql):
            with mariadb.connect(user='root', unix_socket=server.socket,
                                 database=db_name(tmp_path)) as conn:
                cur = conn.cursor()
                cur.execute(sql)
                return cur.fetchall()
        assert seen("SELECT @@innodb_flush_log_at_trx_commit") == [(1,)]
        data_id = db.store_data(h(b'x'), 0, b'x', oid=1)
        assert seen("SELECT COUNT(*) FROM data") == [(0,)]
        db.store_transaction(8, [(1, data_id, None)], ([1], b'', b'', b'', False))
        assert seen("SELECT COUNT(*) FROM data") == [(1,)]
        assert seen("SELECT tid, oid FROM tobj") == [(8, 1)]
        db.lock_transaction(8, 12)
        assert seen("SELECT ttid, tid FROM ttrans") == [(8, 12)]
        db.unlock_transaction(8, 12)
        assert seen("SELECT COUNT(*) FROM trans") == [(0,)]
        db.commit_pending()
        assert seen("SELECT tid, ttid FROM trans") == [(12, 8)]
        assert seen("SELECT COUNT(*) FROM ttrans") == [(0,)]

    def test_second_node_on_the_database_is_refused(self, db, tmp_path):
        other = self.make_backend(tmp_path)
        with pytest.raises(RuntimeError, match='locked'):
            other.open()
        db.close()
        other.open()        # free once the first one closed
        other.close()

    def test_killed_connection_stops_writes_without_half_state(self, server, opener, db):
        self.commit(db, 10, {1: b'before'})
        db.commit_pending()
        pending = db.store_data(h(b'pending'), 0, b'pending')
        cur = db._conn.cursor()
        cur.execute("SELECT CONNECTION_ID()")
        (conn_id,), = cur.fetchall()
        with admin(server) as a:
            a.cursor().execute("KILL ?", (conn_id,))
        with pytest.raises(db.errors) as e:
            db.store_transaction(20, [(2, pending, None)], ([2], b'', b'', b'', False))
        assert not isinstance(e.value, db.input_errors)
        db.close()
        db = opener()
        assert db.get_locked_transactions() == {}
        assert db.load_data(pending) is None
        assert db.get_object(1)[4] == b'before'

    def test_idle_connection_lost_is_reconnected(self, server, db, tmp_path):
        self.commit(db, 10, {1: b'one'})
        db.commit_pending()
        cur = db._conn.cursor()
        cur.execute("SELECT CONNECTION_ID()")
        (conn_id,), = cur.fetchall()
        with admin(server) as a:
            a.cursor().execute("KILL ?", (conn_id,))
        assert db.get_object(1)[4] == b'one'         # nothing pending: retried
        self.commit(db, 14, {1: b'two'})
        assert db.get_object(1)[4] == b'two'
        with pytest.raises(RuntimeError, match='locked'):   # the new connection has the lock
            self.make_backend(tmp_path).open()

    def test_big_value_in_bigdata(self, opener, db):
        data = os.urandom(1 << 20) * 17 + b'tail'    # 17 MiB and a bit: 3 bigdata rows
        ids = self.commit(db, 10, {1: data})
        cur = db._conn.cursor()
        cur.execute("SELECT compression, LENGTH(value) FROM data WHERE id=?", (ids[1],))
        assert cur.fetchall() == [(0x80, 8)]
        cur.execute("SELECT COUNT(*) FROM bigdata")
        assert cur.fetchall() == [(3,)]
        db = self.reopen(db, opener)
        assert db.get_object(1)[2:5] == (0, h(data), data)
        assert db.load_data(ids[1]) == (h(data), 0, data)
        assert db.get_object_history(1, 0, 1) == [(10, len(data))]
        assert db.fetch_object(1, 10) == (0, h(data), data, None)
        assert db.store_data(h(data), 0, data) == ids[1]    # found again
        db.release_data([ids[1]])
        self.commit(db, 14, {1: None})
        db.pack_partition(1, [(14, False, None, False)], 0, 100, (0, 14, 0))
        cur = db._conn.cursor()
        cur.execute("SELECT COUNT(*) FROM bigdata")
        assert cur.fetchall() == [(0,)]

    def test_blob_flag_is_0x40_in_the_column_bigdata_included(self, opener, db):
        """A blob revision's 0x80 (the wire's) is 0x40 in data.compression,
        where 0x80 means bigdata: both round-trip, a record of 16 MiB or
        more included, and a pack deletes its bigdata rows and content."""
        cur = db._conn.cursor()
        records = {}
        for oid, record in ((1, b'small'), (2, os.urandom(1 << 20) * 16 + b'big')):
            content = b'content %d' % oid
            blob_id = db.new_blob()
            db.store_blob_chunk(blob_id, 0, content)
            checksum, compression, stored = self.blob_record(content, record, 1)
            assert compression == 0x81
            data_id = db.store_data(checksum, compression, stored, oid=oid)
            assert db.attach_blob(data_id, blob_id)
            records[oid] = data_id, checksum, stored
            self.commit_rows(db, 10 + 4 * oid, [(oid, data_id)])
        cur.execute("SELECT id, compression FROM data ORDER BY id")
        assert cur.fetchall() == [(records[1][0], 0x41), (records[2][0], 0xC1)]
        cur.execute("SELECT COUNT(*) FROM bigdata")
        assert cur.fetchall() == [(3,)]
        db = self.reopen(db, opener)
        for oid, (data_id, checksum, stored) in records.items():
            assert db.get_object(oid)[2:5] == (0x81, checksum, stored)
            assert db.load_data(data_id) == (checksum, 0x81, stored)
            assert db.fetch_object(oid, 10 + 4 * oid) == (0x81, checksum, stored, None)
            assert db.store_data(checksum, 0x81, stored, oid=oid) == data_id   # found again
            db.release_data([data_id])
            assert db.load_blob_chunk(checksum, 0) == b'content %d' % oid
            assert db.blob_missing(checksum) is None
        assert db.blob_range_digest(2, (0, 0), (100, 100)) is not None
        with pytest.raises(ValueError, match='invalid compression'):
            db.store_data(h(b'x'), 0x40, b'x')
        # deleted (and so unreachable): the pack deletes rows, bigdata, contents
        self.commit(db, 30, {1: None, 2: None})
        for p in (1, 2):
            db.pack_partition(p, [(30, False, None, False)], 0, 100, (0, 30, 0))
        for table in ('data', 'bigdata', 'neozodb_blob_chunk', 'neozodb_data_blob'):
            cur = db._conn.cursor()
            cur.execute(f"SELECT COUNT(*) FROM {table}")
            assert cur.fetchall() == [(0,)], table

    def test_contents_of_rows_neo_deleted_are_dropped_at_start(self, opener, db):
        blob_id = db.new_blob()
        db.store_blob_chunk(blob_id, 0, b'content')
        checksum, compression, stored = self.blob_record(b'content')
        data_id = db.store_data(checksum, compression, stored, oid=1)
        db.attach_blob(data_id, blob_id)
        self.commit_rows(db, 10, [(1, data_id)])
        cur = db._conn.cursor()
        # what a NEO storage node serving the database in place does at a pack
        cur.execute("DELETE FROM obj")
        cur.execute("DELETE FROM data")
        db._conn.commit()
        db = self.reopen(db, opener)
        assert db.drop_unattached_blobs() == 1
        cur = db._conn.cursor()
        cur.execute("SELECT (SELECT COUNT(*) FROM neozodb_blob_chunk),"
                    " (SELECT COUNT(*) FROM neozodb_data_blob)")
        assert cur.fetchall() == [(0, 0)]

    def test_same_checksum_other_bytes_is_another_row(self, db):
        # a client's checksum is not trusted to identify the bytes
        a = db.store_data(h(b'a'), 0, b'a', oid=1)
        b = db.store_data(h(b'a'), 0, b'not a', oid=1)
        assert a != b and a == db.store_data(h(b'a'), 0, b'a', oid=5)
        assert db.load_data(b) == (h(b'a'), 0, b'not a')
        assert db.load_data(a) == (h(b'a'), 0, b'a')

    def test_neo_deferred_deletions_are_pruned(self, db):
        ids = self.commit(db, 10, {1: b'one'})
        self.commit(db, 14, {1: b'two'})
        cur = db._conn.cursor()
        cur.execute("DELETE FROM obj WHERE tid=10")
        cur.execute("INSERT INTO todel VALUES (?)", (ids[1],))
        db._conn.commit()
        db.drop_unfinished()
        assert db.load_data(ids[1]) is None
        cur.execute("SELECT COUNT(*) FROM todel")
        assert cur.fetchall() == [(0,)]

    def test_wrong_schema_version(self, opener, db):
        db.set_config('version', '3')
        db.close()
        with pytest.raises(ValueError, match='version 3'):
            opener()

    def test_engine_option(self, tmp_path):
        with pytest.raises(ValueError, match='engine'):
            MariaDBBackend(self.server.database(db_name(tmp_path)), engine='MyISAM')
        backend = open_backend('MySQL', self.server.database(db_name(tmp_path)),
                               engine='innodb', dedup=True)
        try:
            cur = backend._conn.cursor()
            cur.execute("SHOW INDEX FROM data WHERE key_name='hash'")
            assert cur.fetchall()                        # NEO's --dedup index
            cur.execute("SELECT engine FROM information_schema.tables"
                        " WHERE table_schema=DATABASE() AND table_name='obj'")
            assert cur.fetchall() == [('InnoDB',)]
        finally:
            backend.close()

    def test_uri_form(self, tmp_path):
        backend = open_backend('MariaDB', self.server.uri(db_name(tmp_path)))
        try:
            assert '127.0.0.1' in backend.describe()
            backend.set_name('uri')
            assert backend.get_name() == 'uri'
        finally:
            backend.close()


ROCKSDB_PLUGIN = '/usr/lib/mysql/plugin/ha_rocksdb.so'


@pytest.fixture(scope='session')
def rocksdb_server():
    if not os.path.exists(ROCKSDB_PLUGIN):
        pytest.skip('no RocksDB engine here (apt-get install mariadb-plugin-rocksdb)')
    directory = tempfile.mkdtemp(prefix='neozodb-mariadb-rocksdb-')
    try:
        srv = throwaway.start(directory, ['--plugin-load-add=ha_rocksdb'])
        try:
            yield srv
        finally:
            srv.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class TestMariaDBRocksDBBackend(BackendConformance):
    """The same with --engine RocksDB (MyRocks), NEO's other engine."""

    @pytest.fixture(autouse=True)
    def _server(self, rocksdb_server):
        self.server = rocksdb_server

    def make_backend(self, tmp_path) -> Backend:
        return MariaDBBackend(self.server.database(db_name(tmp_path)), engine='RocksDB')

    def test_tables_are_rocksdb(self, db):
        cur = db._conn.cursor()
        cur.execute("SELECT DISTINCT engine FROM information_schema.tables"
                    " WHERE table_schema=DATABASE()")
        assert cur.fetchall() == [('ROCKSDB',)]


def test_rocksdb_refused_where_the_server_has_none(server, tmp_path):
    backend = MariaDBBackend(server.database(db_name(tmp_path)), engine='rocksdb')
    with pytest.raises(ValueError, match='no RocksDB engine'):
        backend.open()


def test_parse_database():
    assert parse_database('neo') == {'database': 'neo'}
    assert parse_database('u@neo') == {'database': 'neo', 'user': 'u'}
    assert parse_database('u:p@ss@neo/tmp/s.sock') == {
        'database': 'neo', 'user': 'u', 'password': 'p@ss', 'unix_socket': '/tmp/s.sock'}
    assert parse_database('u:@neo./s') == {
        'database': 'neo', 'user': 'u', 'password': '', 'unix_socket': './s'}
    assert parse_database('neo~/s')['unix_socket'] == os.path.expanduser('~/s')
    assert parse_database('mariadb://u:p%40@db.example:3307/neo') == {
        'database': 'neo', 'user': 'u', 'password': 'p@', 'host': 'db.example', 'port': 3307}
    assert parse_database('mysql:///neo?unix_socket=/run/m.sock') == {
        'database': 'neo', 'unix_socket': '/run/m.sock'}
    for bad in ('', '/tmp/sock', '@neo', 'u@', 'ne o', 'pg://h/neo', 'mariadb://h/',
                'mariadb://h/neo?x=1', 'mariadb://h:notaport/neo'):
        with pytest.raises(ValueError):
            parse_database(bad)


def neostorage(cwd, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, '-m', 'neozodb.cli.storage', '-c', 'test', '-m', '127.0.0.1:1', *args],
        env={**os.environ, 'PYTHONPATH': SRC}, capture_output=True, text=True, timeout=60,
        cwd=cwd)


@pytest.mark.parametrize('args, message', [
    (['-a', 'MariaDB', '-d', 'user:secret@/no/name'], 'no database name'),
    (['-a', 'MySQL', '-d', 'mariadb://u:secret@127.0.0.1:1/neo'], "Can't connect"),
    (['-a', 'MariaDB', '-d', 'neo', '--engine', 'MyISAM'], 'unknown engine'),
    (['-a', 'SQLite', '-d', 'x.sqlite', '--engine', 'InnoDB'], 'option(s): engine'),
])
def test_bad_database_or_option_is_a_one_line_error(tmp_path, args, message):
    done = neostorage(tmp_path, *args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert 'secret' not in done.stderr
    assert not os.listdir(tmp_path)       # no database made for a refused option
