"""The live import of a source with blobs, without a cluster: blob
revisions not imported yet are served with their tails and their contents
read from the source's files, the import copies each content into chunks
attached to its data row, and a crash in the middle of a content neither
loses nor duplicates it.  (The cluster tests: tests/cluster/test_import_blobs.py.)"""
from __future__ import annotations

import hashlib
import os
import sqlite3
import sys
import textwrap
from pathlib import Path

import pytest
import transaction
import ZODB
from ZODB.blob import Blob
from ZODB.FileStorage import FileStorage
from ZODB.utils import u64

from neozodb.protocol.blobs import CHUNK, chunks, is_blob, split_tail
from neozodb.storage.backends import open_backend
from neozodb.storage.backends.importer import ImporterBackend, SourceDamaged, import_all

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from blobdata import blob_revisions, make_blob_source  # noqa: E402

pytestmark = pytest.mark.timeout(120)
NP = 3


def write_conf(directory: Path, fs_path: str, blob_dir: str | None,
               extra: str = '') -> str:
    conf = directory / 'importer.conf'
    blob_line = f'\n    blob-dir {blob_dir}' if blob_dir else ''
    conf.write_text(textwrap.dedent("""\
        [neo]
        adapter = SQLite
        database = db.sqlite
        %s

        [root]
        storage = <filestorage>
            path %s
            read-only true%s
          </filestorage>
        """) % (extra, fs_path, blob_line))
    return str(conf)


def open_importer(conf: str, cls=None) -> ImporterBackend:
    backend = open_backend('Importer', conf) if cls is None else cls(conf)
    if cls is not None:
        backend.open()
    if backend.get_num_partitions() is None:
        backend.save_pt(1, 0, [[(1, 1)] for _ in range(NP)])
    return backend


@pytest.fixture(params=['bushy', 'lawn'])
def source(tmp_path, request):
    path, blob_dir = str(tmp_path / 'Data.fs'), str(tmp_path / 'blobs')
    make_blob_source(path, blob_dir, request.param, big=2 * CHUNK + 5)
    return path, blob_dir, blob_revisions(path, blob_dir)


def content(backend, checksum: bytes, size: int) -> bytes:
    parts = [backend.load_blob_chunk(checksum, n) for n in range(chunks(size) or 1)]
    assert None not in parts
    assert backend.load_blob_chunk(checksum, chunks(size) or 1) is None
    return b''.join(parts)


def check_blobs(backend, revisions) -> dict:
    """Every blob revision reads with its tail and its content; their
    checksums by (oid, tid)."""
    checksums = {}
    for oid, tid, data_txn, expected in revisions:
        found = backend.get_object(u64(oid), tid=u64(tid))
        serial, _, compression, checksum, stored, found_txn = found
        assert serial == u64(tid) and is_blob(compression)
        assert found_txn == (data_txn and u64(data_txn))
        assert hashlib.sha1(stored).digest() == checksum
        _, _, digest, size = split_tail(compression, stored)
        assert (digest, size) == (hashlib.sha256(expected).digest(), len(expected))
        assert content(backend, checksum, size) == expected
        checksums[oid, tid] = checksum
    return checksums


def sql(database: str, query: str) -> list:
    conn = sqlite3.connect(database)
    try:
        return conn.execute(query).fetchall()
    finally:
        conn.close()


def test_blobs_served_then_imported(tmp_path, source):
    path, blob_dir, revisions = source
    backend = open_importer(write_conf(tmp_path, path, blob_dir))
    try:
        before = check_blobs(backend, revisions)  # nothing imported: from the files
        # one transaction at a time: each state merges the two
        reused = 0
        while backend.importing:
            batch = [next(iter(backend.read_source()))[0]]
            copied = sum(backend.import_blobs(batch))
            for _, compression, _, data, data_txn, blob in batch[0][4]:
                if data_txn is not None and data is not None and is_blob(compression):
                    # the undo's content is the imported revision's: not copied
                    assert blob is None and copied == 0
                    reused += 1
            backend.import_transactions(batch)
            assert check_blobs(backend, revisions) == before  # same checksums
        assert reused == 1
        backend.commit_pending()
    finally:
        backend.close()
    # the database alone (native backend) has every content, once
    database = str(tmp_path / 'db.sqlite')
    native = open_backend('SQLite', database)
    try:
        assert check_blobs(native, revisions) == before
    finally:
        native.close()
    distinct = {(hashlib.sha256(c).digest(), len(c)) for _, _, _, c in revisions}
    assert sql(database, 'SELECT COUNT(*) FROM data_blob') == [(len(distinct),)]
    assert sql(database, 'SELECT COUNT(*) FROM blob_chunk WHERE blob_id NOT IN'
                         ' (SELECT blob_id FROM data_blob)') == [(0,)]
    big = max(len(c) for _, _, _, c in revisions)
    assert sql(database, 'SELECT MAX(LENGTH(bytes)) FROM blob_chunk') == [(CHUNK,)]
    assert sql(database, 'SELECT SUM(LENGTH(bytes)) FROM blob_chunk') == [
        (sum(size for _, size in distinct),)]
    assert big > 2 * CHUNK


def test_crash_in_the_middle_of_a_content(tmp_path, source):
    """Chunks written then the node dies before the transaction is
    imported: dropped at the next start, imported again, once."""
    path, blob_dir, revisions = source
    conf = write_conf(tmp_path, path, blob_dir)
    backend = open_importer(conf)
    try:
        txns = [t for t, _ in backend.read_source()]
        big = next(t for t in txns if any(isinstance(r[5], str) for r in t[4]))
        backend.import_transactions(txns[:txns.index(big)])
        copier = backend.import_blobs([big])
        next(copier)
        next(copier)               # two chunks of some content written...
        backend.commit_pending()   # ...and durable, then the crash:
        copier.close()             # (its drop is never committed)
    finally:
        backend._conn.close()
        backend._conn = None
        backend.close()
    database = str(tmp_path / 'db.sqlite')
    assert sql(database, 'SELECT COUNT(*) FROM blob_chunk')[0][0] >= 2
    backend = open_importer(conf)
    try:
        assert backend.drop_unattached_blobs() >= 1   # what the node does at start
        import_all(backend)
        check_blobs(backend, revisions)
    finally:
        backend.close()
    distinct = {hashlib.sha256(c).digest() for _, _, _, c in revisions}
    assert sql(database, 'SELECT COUNT(*) FROM data_blob') == [(len(distinct),)]
    assert sql(database, 'SELECT COUNT(DISTINCT blob_id) FROM blob_chunk') == [(len(distinct),)]


def test_source_without_blob_dir(tmp_path):
    """Blob records in a source opened without its blob-dir: the import
    stops before them (their contents would be lost)."""
    path, blob_dir = str(tmp_path / 'blobs.fs'), str(tmp_path / 'blobs')
    db = ZODB.DB(FileStorage(path, blob_dir=blob_dir))
    try:
        root = db.open().root()
        root['plain'] = 1
        transaction.commit()
        root['file'] = Blob(b'content')
        transaction.commit()
    finally:
        db.close()
    backend = open_importer(write_conf(tmp_path, path, None))
    try:
        batch = []
        with pytest.raises(SourceDamaged) as e:
            for txn, _ in backend.read_source():
                batch.append(txn)
        assert 'blob record of oid 0x1' in str(e.value) and 'no blob-dir' in str(e.value)
        assert len(batch) == 2  # the root's creation and 'plain'; not the blob's
    finally:
        backend.close()


class NoBlobImporter(ImporterBackend):
    blobs = False


def test_destination_without_blobs(tmp_path, source):
    path, blob_dir, _ = source
    with pytest.raises(ValueError) as e:
        open_importer(write_conf(tmp_path, path, blob_dir), NoBlobImporter)
    message = str(e.value)
    assert 'has blobs (blob-dir)' in message and 'keeps no blob contents' in message
    assert '\n' not in message


def test_writeback_refused_with_blobs(tmp_path, source):
    path, blob_dir, _ = source
    conf = write_conf(tmp_path, path, blob_dir, extra='writeback = true')
    with open(conf) as f:
        text = f.read().replace('read-only true', 'read-only false')
    with open(conf, 'w') as f:
        f.write(text)
    with pytest.raises(ValueError, match='writeback to a source with blobs'):
        open_importer(conf)


def test_missing_and_vanishing_files(tmp_path, caplog):
    """A blob file missing from the blob-dir (packed away): the record is
    imported alone, with a warning; a file vanishing between the read of
    its transaction and the copy: SourceDamaged, the transactions before
    it keep their copies."""
    path, blob_dir = str(tmp_path / 'Data.fs'), str(tmp_path / 'blobs')
    make_blob_source(path, blob_dir, 'bushy', big=CHUNK + 1)
    revisions = blob_revisions(path, blob_dir)
    fs = FileStorage(path, read_only=True, blob_dir=blob_dir)
    try:
        files = [fs.loadBlob(oid, tid) for oid, tid, _, _ in revisions]
    finally:
        fs.close()
    first_oid, first_tid = revisions[0][:2]
    os.remove(files[0])                     # packed away
    conf = write_conf(tmp_path, path, blob_dir)
    backend = open_importer(conf)
    try:
        txns = [t for t, _ in backend.read_source()]
        assert 'the blob of %#x at %#x has no file' % (u64(first_oid), u64(first_tid)) \
            in caplog.text
        later = [i for i, t in enumerate(txns) if t[0] == u64(revisions[4][1])][0]
        os.remove(files[4])                     # vanishes after the read
        with pytest.raises(SourceDamaged, match='cannot read the blob of'):
            for _ in backend.import_blobs(txns):
                pass
        done = backend.copied(txns)
        assert len(done) == later
        backend.drop_import_blobs(txns[later:])
        backend.import_transactions(done)
        found = backend.get_object(u64(first_oid), tid=u64(first_tid))
        assert not is_blob(found[2])        # the record alone
        assert backend.get_object(u64(revisions[1][0]), tid=u64(revisions[1][1]))[2] & 0x80
        backend.commit_pending()
    finally:
        backend.close()
    database = str(tmp_path / 'db.sqlite')
    assert sql(database, 'SELECT COUNT(*) FROM blob_chunk WHERE blob_id NOT IN'
                         ' (SELECT blob_id FROM data_blob)') == [(0,)]
