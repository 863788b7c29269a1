"""Importer backend without a cluster: configuration, reads merging the
database with the part of the source not imported yet, the copy itself,
damaged sources, and the backend conformance tests over an empty source."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping
from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileStorage
from ZODB.MappingStorage import MappingStorage
from ZODB.utils import p64, u64, z64

from neozodb.storage.backends import Unsupported, open_backend
from neozodb.storage.backends.importer import (
    GenericView,
    ImporterBackend,
    SourceDamaged,
    import_all,
    read_source,
)

try:  # tests/unit may or may not become a package
    from .backend_conformance import BackendConformance
except ImportError:
    from backend_conformance import BackendConformance

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fsdata  # noqa: E402

pytestmark = pytest.mark.timeout(120)

SRC = str(Path(__file__).resolve().parents[2] / 'src')
NP = 7


def write_conf(path, fs_path, database='db.sqlite', extra='', source_extra='',
               read_only=True, sections=1) -> str:
    text = textwrap.dedent(f"""\
        [neo]
        adapter = SQLite
        database = {database}
        {extra}
        """)
    for i in range(sections):
        text += textwrap.dedent(f"""
            [root{i}]
            storage = <filestorage>
                path {fs_path}
                read-only {'true' if read_only else 'false'}
              </filestorage>
            {source_extra}
            """)
    conf = os.path.join(path, 'importer.conf')
    with open(conf, 'w') as f:
        f.write(text)
    return conf


@pytest.fixture(scope='module')
def source(tmp_path_factory):
    """A small FileStorage (copied by tests that change it)."""
    path = str(tmp_path_factory.mktemp('source') / 'Data.fs')
    summary = fsdata.make_filestorage(path, transactions=600, objects=40)
    fs = FileStorage(path, read_only=True)
    try:
        txns = fsdata.transactions(fs.iterator())
    finally:
        fs.close()
    return path, summary, txns


def copy_source(source, tmp_path) -> str:
    path = str(tmp_path / 'Data.fs')
    shutil.copy(source[0], path)
    shutil.copy(source[0] + '.index', path + '.index')
    return path


def open_importer(tmp_path, fs_path, **kw) -> ImporterBackend:
    backend = open_backend('Importer', write_conf(str(tmp_path), fs_path, **kw))
    if backend.get_num_partitions() is None:
        backend.save_pt(1, 0, [[(1, 1)] for _ in range(NP)])
    return backend


def import_some(backend, count: int) -> None:
    batch = []
    for txn, _ in backend.read_source():
        batch.append(txn)
        if len(batch) == count:
            break
    backend.import_transactions(batch)


def revisions(txns) -> dict[bytes, list[tuple[int, bytes | None, int | None]]]:
    """oid -> [(tid, data, data_txn)] ascending."""
    result: dict[bytes, list] = {}
    for tid, _, _, _, _, records in txns:
        for oid, _, data, data_txn in records:
            result.setdefault(oid, []).append((u64(tid), data, data_txn and u64(data_txn)))
    return result


def extension(ext: bytes) -> dict:
    return dict(TransactionMetaData(extension=ext).extension)


def data_of(record) -> bytes | None:
    serial, next_serial, compression, checksum, data, data_serial = record
    if not data and checksum == bytes(20):
        return None
    return zlib.decompress(data) if compression else data


def check_reads(backend, txns) -> None:
    """Every revision of every object reads as in the source."""
    for oid, revs in revisions(txns).items():
        n = u64(oid)
        for i, (tid, data, data_txn) in enumerate(revs):
            following = revs[i + 1][0] if i + 1 < len(revs) else None
            for found in (backend.get_object(n, tid=tid),
                          backend.get_object(n, before_tid=tid + 1)):
                assert found[0] == tid and found[1] == following, (oid, tid)
                assert data_of(found) == data
                assert found[5] == data_txn
            if i == 0:
                assert backend.get_object(n, before_tid=tid) is False
        latest = backend.get_object(n)
        assert latest[0] == revs[-1][0] and latest[1] is None
        assert backend.last_serial(n) == revs[-1][0]
        history = backend.get_object_history(n, 0, 1000)
        assert [t for t, _ in history] == [t for t, _, _ in reversed(revs)]
    assert backend.get_object(10 ** 6) is None
    assert backend.get_object(10 ** 6, before_tid=1 << 62) is None


# -- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize('kw, message', [
    (dict(sections=2), 'merging several databases is not supported'),
    (dict(sections=0), 'no source section'),
    (dict(extra='engine = InnoDB'), 'unknown option(s): engine'),
    (dict(extra='adapter = MySQL'), ''),
    (dict(source_extra='oid = 1'), 'unsupported option(s): oid'),
    (dict(extra='writeback = maybe'), 'not a boolean'),
    (dict(extra='writeback = true'), 'writeback needs a writable source'),
])
def test_bad_configuration(tmp_path, source, kw, message):
    with pytest.raises(ValueError) as e:
        open_importer(tmp_path, source[0], **kw)
    assert message in str(e.value)
    assert '\n' not in str(e.value)


def test_neostorage_refuses_several_sources(tmp_path, source):
    conf = write_conf(str(tmp_path), source[0], sections=2)
    result = subprocess.run(
        [sys.executable, '-m', 'neozodb.cli.storage', '-c', 'x', '-m', '127.0.0.1:1',
         '-a', 'Importer', '-d', conf], capture_output=True, text=True,
        env={**os.environ, 'PYTHONPATH': SRC}, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'merging several databases is not supported' in lines[0]


def test_not_over_a_database_with_data(tmp_path, source):
    db = open_backend('SQLite', str(tmp_path / 'db.sqlite'))
    db.set_num_partitions(NP)
    db.add_transaction(5, [], b'', b'', b'', False, 5)
    db.commit_pending()
    db.close()
    with pytest.raises(ValueError, match='already has transactions'):
        open_importer(tmp_path, source[0])


# -- reads while importing, the copy ----------------------------------------------------------


def test_reads_during_and_after_import(tmp_path, source):
    _, summary, txns = source
    backend = open_importer(tmp_path, source[0])
    try:
        last_tid = u64(txns[-1][0])
        assert backend.importing and backend.source_tid == last_tid
        assert backend.last_ids() == (last_tid, max(u64(o) for o in revisions(txns)))
        assert backend.first_tid() == u64(txns[0][0])
        check_reads(backend, txns)      # nothing imported: all from the source
        for count in (1, 150, 200):
            import_some(backend, count)
            check_reads(backend, txns)
        imported = backend.import_tid
        assert imported == u64(txns[351 - 1][0]) and backend.import_count == 351
        # metadata: imported or not
        for tid, _, user, description, ext, records in txns[349:353]:
            oids, u, d, e, packed, ttid = backend.get_transaction(u64(tid))
            assert (u, d, packed, ttid) == (user, description, False, u64(tid))
            assert extension(e) == ext
            assert oids == [u64(r[0]) for r in records]
        # what needs to list the gap is refused
        with pytest.raises(Unsupported, match='being imported'):
            backend.get_tids_from(0, 1 << 62, 1000, range(NP))
        assert len(backend.get_tids_from(0, 1 << 62, 10, [0])) == 10
        with pytest.raises(Unsupported):
            backend.get_oids_from(0, 100, 0, 1 << 62)
        with pytest.raises(Unsupported):
            backend.fetch_tids(0, 10, 0, 1 << 62)
        gap_tid = u64(txns[400][0])
        with pytest.raises(Unsupported, match='not imported yet'):
            backend.get_revision(u64(txns[400][5][0][0]), tid=gap_tid)
        # a restart resumes after what was imported
        backend.close()
        backend = open_importer(tmp_path, source[0])
        assert backend.import_tid == imported and backend.import_count == 351
        check_reads(backend, txns)
        import_all(backend)
        assert not backend.importing
        check_reads(backend, txns)
        assert backend.get_tids_from(0, 1 << 62, 10000, range(NP)) == [u64(t[0]) for t in txns]
    finally:
        backend.close()
    # the copy is exact: transactions, records, back-pointers, deletions
    db = open_backend('SQLite', str(tmp_path / 'db.sqlite'))
    try:
        for tid, _, user, description, ext, records in txns:
            oids, u, d, e, packed, ttid = db.get_transaction(u64(tid))
            assert oids == [u64(r[0]) for r in records]
            assert (u, d, extension(e)) == (user, description, ext)
            for oid, _, data, data_txn in records:
                found = db.get_object(u64(oid), tid=u64(tid))
                assert data_of(found) == data and found[5] == (data_txn and u64(data_txn))
    finally:
        db.close()


def test_new_commits_after_the_source(tmp_path, source):
    """Commits made while importing come after the source's last tid; their
    reads, conflicts and writeback listing see the source's revisions."""
    _, _, txns = source
    backend = open_importer(tmp_path, source[0])
    try:
        import_some(backend, 100)
        last_tid = backend.last_ids()[0]
        oid = u64(txns[-1][5][0][0])       # changed by the last source transaction
        assert backend.last_serial(oid) == last_tid
        tid = last_tid + 10
        data_id = backend.store_data(b'\1' * 20, 0, b'new')
        # the master allocates a ttid in the partition of the tid
        backend.store_transaction(tid - NP, [(oid, data_id, None)],
                                  ([oid], b'me', b'new', b'', False))
        backend.lock_transaction(tid - NP, tid)
        backend.unlock_transaction(tid - NP, tid)
        assert backend.last_serial(oid) == tid
        found = backend.get_object(oid, before_tid=tid)
        assert found[0] == last_tid and found[1] == tid
        assert backend.get_object(oid)[:2] == (tid, None)
        assert backend.new_transactions(0, 10) == [(tid, b'me', b'new', b'', [(oid, b'new', None)])]
        import_all(backend)
        assert backend.get_object(oid, before_tid=tid)[:2] == (last_tid, tid)
    finally:
        backend.close()


def test_truncate_into_the_source(tmp_path, source):
    _, _, txns = source
    backend = open_importer(tmp_path, source[0])
    try:
        import_some(backend, 100)
        at = u64(txns[300][0])
        backend.truncate(at)
        assert backend.source_tid == at and backend.importing
        import_all(backend)
        assert backend.import_tid == at and backend.last_ids()[0] == at
        assert backend.get_tids_from(0, 1 << 62, 10000, range(NP))[-1] == at
        backend.truncate(u64(txns[50][0]))
        assert backend.last_ids()[0] == u64(txns[50][0])
    finally:
        backend.close()


def test_generic_source():
    """Any storage with an iterator (here a MappingStorage): read through
    its public API."""
    storage = MappingStorage()
    db = ZODB.DB(storage)
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    for i in range(20):
        conn.root()['k%d' % (i % 3)] = PersistentMapping(i=i)
        tm.get().note('txn %d' % i)
        tm.commit()
    expected = fsdata.transactions(storage.iterator())
    got = [txn for txn, _ in read_source(storage, 0, u64(storage.lastTransaction()))]
    assert [(t[0], t[2]) for t in got] == [(u64(t[0]), t[3]) for t in expected]
    assert [[r[0] for r in t[4]] for t in got] == [[u64(r[0]) for r in t[5]] for t in expected]
    view = GenericView(storage)
    oid = u64(conn.root()['k0']._p_oid)
    tids, exists = view.revisions(0, u64(expected[5][0]), 1 << 62)
    assert exists and tids and tids == sorted(tids, reverse=True)
    assert view.record(0, tids[0]) == (storage.loadSerial(z64, p64(tids[0])), None)
    assert view.revisions(oid, 0, 1 << 62) == ([u64(conn.root()['k0']._p_serial)], True)
    db.close()


# -- damaged sources ----------------------------------------------------------------------------


def test_damaged_record(tmp_path, source):
    path = copy_source(source, tmp_path)
    fs = FileStorage(path, read_only=True)
    try:
        for i, txn in enumerate(fs.iterator()):
            if i == 300:
                bad_tid, pos = u64(txn.tid), list(txn)[0].pos
                break
    finally:
        fs.close()
    with open(path, 'r+b') as f:
        f.seek(pos + 32)            # the record's version and data lengths
        f.write(b'\xff' * 10)
    backend = open_importer(tmp_path, path)
    try:
        batch = []
        with pytest.raises(SourceDamaged) as e:
            for txn, _ in backend.read_source():
                batch.append(txn)
        assert 'transaction %#x' % bad_tid in str(e.value)
        assert 'record at offset %d' % pos in str(e.value)
        assert [t[0] for t in batch] == [u64(t[0]) for t in source[2][:300]]
        backend.import_transactions(batch)
        assert backend.import_tid == u64(source[2][299][0])
    finally:
        backend.close()


def test_truncated_source(tmp_path, source):
    """The source lost its end after the import started: reported."""
    path = copy_source(source, tmp_path)
    backend = open_importer(tmp_path, path)
    backend.close()
    os.remove(path + '.index')
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
    backend = open_importer(tmp_path, path)
    try:
        with pytest.raises(SourceDamaged, match='the source ends after transaction'):
            for _ in backend.read_source():
                pass
    finally:
        backend.close()


# -- conformance, over an empty source -----------------------------------------------------------


class TestImporterOverEmptySource(BackendConformance):

    def make_backend(self, tmp_path):
        fs_path = tmp_path / 'empty.fs'
        if not fs_path.exists():
            FileStorage(str(fs_path), create=True).close()
        conf = tmp_path / 'importer.conf'
        if not conf.exists():
            write_conf(str(tmp_path), str(fs_path), database='storage.sqlite')
        return ImporterBackend(str(conf))


def test_empty_source_ids(tmp_path):
    fs_path = str(tmp_path / 'empty.fs')
    FileStorage(fs_path, create=True).close()
    backend = open_importer(tmp_path, fs_path)
    try:
        assert not backend.importing
        assert backend.last_ids() == (None, None)
        assert backend.source.lastTransaction() == z64
        assert p64(0) == z64
    finally:
        backend.close()
