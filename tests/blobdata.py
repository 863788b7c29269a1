"""A FileStorage with a blob directory for the tests of blobs: an empty
blob, one of a few MiB, one changed several times then undone to an older
revision (a back-pointer), one whose creation is undone, one dropped from
the root; ``filler`` small transactions before each step, so that a
rate-limited live import takes a while."""
from __future__ import annotations

import os

import transaction
import ZODB
from ZODB.blob import Blob, is_blob_record
from ZODB.FileStorage import FileStorage

from fsdata import no_fsync
from neozodb.protocol.blobs import CHUNK


def make_blob_source(path: str, blob_dir: str, layout: str, big: int = 3 * CHUNK + 5,
                     filler: int = 0) -> None:
    os.makedirs(blob_dir)
    with open(os.path.join(blob_dir, ".layout"), "w") as f:
        f.write(layout)
    with no_fsync():
        _make(path, blob_dir, big, filler)


def _make(path: str, blob_dir: str, big: int, filler: int) -> None:
    db = ZODB.DB(FileStorage(path, blob_dir=blob_dir))
    try:
        tm = transaction.TransactionManager()
        root = db.open(tm).root()

        def commit() -> str:
            """Commit, then the filler; the undo id of the commit."""
            tm.commit()
            undo_id = db.undoLog(0, 1)[0]["id"]
            for i in range(filler):
                root["filler"] = i
                tm.commit()
            return undo_id

        root["plain"] = 1
        commit()
        root["empty"] = Blob(b"")
        root["big"] = Blob(os.urandom(big))
        root["changed"] = Blob(b"first")
        root["dropped"] = Blob(b"dropped later")
        commit()
        for i in range(3):
            with root["changed"].open("w") as f:
                f.write(b"revision %d" % i)
            last = commit()
        db.undo(last, tm.get())  # back to "revision 1"
        commit()
        root["undone"] = Blob(b"undone creation")
        created = commit()
        db.undo(created, tm.get())
        commit()
        del root["dropped"]
        commit()
    finally:
        db.close()


def blob_revisions(path: str, blob_dir: str) -> list[tuple[bytes, bytes, bytes | None, bytes]]:
    """(oid, tid, data_txn, content) of every blob revision of a
    FileStorage with its blob directory."""
    fs = FileStorage(path, read_only=True, blob_dir=blob_dir)
    found = []
    try:
        for txn in fs.iterator():
            for record in txn:
                if is_blob_record(record.data):
                    with open(fs.loadBlob(record.oid, record.tid), "rb") as f:
                        found.append((record.oid, record.tid, record.data_txn, f.read()))
    finally:
        fs.close()
    return found
