"""Blobs on real clusters: contents replicated to a new storage and after
a SIGKILL, a corrupted copy detected and read from the other replica,
pack with garbage collection removing contents from every storage, undo
bringing an old content back, and a client without the feature getting
the record alone."""
from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import threading

import pytest
import transaction
import ZODB
from ZODB.blob import Blob, is_blob_record
from ZODB.POSException import ConflictError, POSKeyError, StorageError
from ZODB.serialize import referencesf
from ZODB.TimeStamp import TimeStamp

from neozodb.cli.cluster import wait_until
from neozodb.client import Storage
from neozodb.client import blobs as client_blobs
from neozodb.protocol import NodeStates, p64, u64
from neozodb.protocol.blobs import CHUNK
from replicas import raw_blob_chunks, raw_blobs, raw_contents

pytestmark = pytest.mark.timeout(240)


def blob_db(cluster, directory, **kw):
    return ZODB.DB(Storage(blob_dir=str(directory), **cluster.client_kwargs(), **kw))


def read(blob: Blob) -> bytes:
    with blob.open("r") as f:
        return f.read()


def up_to_date(cluster, names) -> bool:
    lines = cluster.pt_lines()[1:]
    return {line.split()[0] for line in lines} == set(names) and all(
        set(line.split()[2]) <= {"U", "."} for line in lines)


CONTENTS = {
    "empty": b"",
    "small": b"a small file",
    "chunks": os.urandom(2 * CHUNK + 5),   # three chunks, the last of 5 bytes
    "exact": os.urandom(CHUNK),            # exactly one chunk
    "same": b"a small file",               # the content of "small" again
}


def test_contents_replicate_to_a_new_storage(one_storage, tmp_path):
    cluster = one_storage
    db = blob_db(cluster, tmp_path / "blobs1")
    root = db.open().root()
    for name, content in CONTENTS.items():
        root[name] = Blob(content)
    transaction.commit()
    for i in range(3):  # revisions of one blob
        with root["small"].open("w") as f:
            f.write(b"revision %d" % i)
        transaction.commit()
    db.close()

    assert cluster.neoctl("set", "replicas", "1")[1]["ok"]
    cluster.num_storages = 2
    cluster.storage(2).start()
    wait_until(lambda: cluster.storage_state("S2") is NodeStates.PENDING, 30, "S2 pending")
    cluster.neoctl("add", "S2")
    cluster.neoctl("tweak")
    wait_until(lambda: up_to_date(cluster, {"S1", "S2"})
               and "O" not in "".join(cluster.cells().values()), 60, "S2 up to date")
    s1, s2 = (raw_blobs(cluster.database(i)) for i in (1, 2))
    assert s1 == s2
    # 4 distinct contents of the first commit (small and same share one),
    # plus 3 revisions
    assert len(s1) == 7
    assert raw_contents(cluster.database(1)) == raw_contents(cluster.database(2))

    cluster.nodes["S1"].kill()
    wait_until(lambda: cluster.storage_state("S1") is NodeStates.DOWN, 30, "S1 down")
    db = blob_db(cluster, tmp_path / "blobs2")
    try:
        root = db.open().root()
        assert read(root["small"]) == b"revision 2"
        for name in ("empty", "chunks", "exact", "same"):
            assert read(root[name]) == CONTENTS[name], name
    finally:
        db.close()


def _corrupt_chunk(path: str, n: int) -> None:
    conn = sqlite3.connect(path)
    try:
        with conn:
            (blob_id, data) = conn.execute(
                "SELECT blob_id, bytes FROM blob_chunk WHERE n=?", (n,)).fetchone()
            data = bytes([data[0] ^ 1]) + data[1:]
            conn.execute("UPDATE blob_chunk SET bytes=? WHERE blob_id=? AND n=?",
                         (data, blob_id, n))
    finally:
        conn.close()


def test_corrupted_copy_is_detected_and_read_from_the_other(cluster, tmp_path, caplog):
    content = os.urandom(2 * CHUNK + 100)
    db = blob_db(cluster, tmp_path / "blobs1")
    root = db.open().root()
    root["b"] = Blob(content)
    transaction.commit()
    db.close()
    wait_until(lambda: up_to_date(cluster, {"S1", "S2"}), 30, "cells up to date")

    s1 = cluster.nodes["S1"]
    s1.signal(signal.SIGTERM)  # a clean stop: what it has is committed
    assert s1.wait(30) is not None
    _corrupt_chunk(cluster.database(1), 1)
    s1.start()
    wait_until(lambda: cluster.storage_state("S1") is NodeStates.RUNNING
               and up_to_date(cluster, {"S1", "S2"}), 30, "S1 back up to date")
    cluster.nodes["S2"].kill()
    wait_until(lambda: cluster.storage_state("S2") is NodeStates.DOWN
               and cluster.storage_state("S1") is NodeStates.RUNNING, 30, "S1 alone")
    db = blob_db(cluster, tmp_path / "blobs2")
    try:
        root = db.open().root()
        with pytest.raises(POSKeyError, match="corrupted copy on S1"):
            read(root["b"])
        assert "corrupted copy of the blob" in caplog.text
        assert db.storage._blob_cache.get(root["b"]._p_oid, root["b"]._p_serial) is None
        cluster.nodes["S2"].start()
        wait_until(lambda: cluster.storage_state("S2") is NodeStates.RUNNING, 30, "S2 back")
        wait_until(lambda: up_to_date(cluster, {"S1", "S2"}), 30, "S2 up to date")
        db._storage.app.sync()
        root["b"]._p_invalidate()
        assert read(root["b"]) == content  # whichever is asked first: the good copy
    finally:
        db.close()
    # neoctl check hashes the contents anew: S1's copy differs, is repaired
    assert raw_blobs(cluster.database(1)) != raw_blobs(cluster.database(2))
    lines, _ = cluster.neoctl("check", ":S2")
    partition = int.from_bytes(root["b"]._p_oid, "big") % 12
    assert "partition %d: S1 differed from S2; S1 repaired" % partition in lines, lines
    assert sum("differed" in line for line in lines) == 1, lines
    wait_until(lambda: up_to_date(cluster, {"S1", "S2"})
               and raw_blobs(cluster.database(1)) == raw_blobs(cluster.database(2)), 60,
               "S1's copy repaired")


def test_pack_gc_removes_contents_and_undo_brings_one_back(cluster, tmp_path):
    db = blob_db(cluster, tmp_path / "blobs")
    root = db.open().root()
    root["kept"] = Blob(b"first")
    root["dropped"] = Blob(os.urandom(CHUNK + 1))
    transaction.commit()
    with root["kept"].open("w") as f:
        f.write(b"second")
    transaction.commit()
    undone = root["kept"]._p_serial
    with root["kept"].open("w") as f:
        f.write(b"third")
    transaction.commit()
    db.undo(db.undoLog(0, 1)[0]["id"])  # the change to "third"
    transaction.commit()
    assert read(root["kept"]) == b"second"
    assert db.storage.loadSerial(root["kept"]._p_oid, undone)  # still there

    del root["dropped"]
    transaction.commit()
    # just after the last commit: every revision before it is history
    db.storage.pack(TimeStamp(db.lastTransaction()).timeTime() + 1e-3, referencesf, gc=True)
    keep = {hashlib.sha256(b"second").digest()}  # the current content only

    def contents(i):
        return {digest for _, digest in raw_blobs(cluster.database(i)).values()}
    wait_until(lambda: contents(1) == keep and contents(2) == keep, 30,
               "pack to remove old and unreachable contents")
    for i in (1, 2):
        assert raw_blob_chunks(cluster.database(i)) == 1
    root._p_jar.sync()
    assert read(root["kept"]) == b"second"
    db.close()


def blob_revisions(path: str) -> dict[tuple[int, int], tuple[str, str | None]]:
    """Blob revisions of a storage: (oid, tid) -> (data checksum, SHA-256 of
    its content as stored, None without one), in hex."""
    conn = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    try:
        revisions = {}
        for oid, tid, checksum, blob_id in conn.execute(
                "SELECT o.oid, o.tid, d.hash, b.blob_id FROM obj o JOIN data d ON d.id = o.data_id"
                " LEFT JOIN data_blob b ON b.data_id = d.id WHERE d.compression >= 128"):
            content = None
            if blob_id is not None:
                hasher = hashlib.sha256()
                for (chunk,) in conn.execute(
                        "SELECT bytes FROM blob_chunk WHERE blob_id=? ORDER BY n", (blob_id,)):
                    hasher.update(chunk)
                content = hasher.hexdigest()
            revisions[(oid, tid)] = (bytes(checksum).hex(), content)
        return revisions
    finally:
        conn.close()


def assert_same_blobs(cluster) -> None:
    """Both storages have the same blob revisions with the same contents;
    else the differing ones, by oid, tid and checksum, with what each has."""
    s1, s2 = (blob_revisions(cluster.database(i)) for i in (1, 2))
    keys = sorted(key for key in s1.keys() | s2.keys() if s1.get(key) != s2.get(key))
    differ = ["oid %#x tid %#x checksum %s: S1 %s, S2 %s" % (
        oid, tid, (s1.get((oid, tid)) or s2[oid, tid])[0],
        "content %s" % s1[oid, tid][1] if (oid, tid) in s1 else "no revision",
        "content %s" % s2[oid, tid][1] if (oid, tid) in s2 else "no revision")
        for oid, tid in keys]
    if differ:  # what the nodes logged about those transactions
        directory = os.path.dirname(cluster.database(1))
        words = {"%016x" % tid for _, tid in keys}
        for name in ("S1.log", "S2.log", "M1.log"):
            try:
                with open(os.path.join(directory, name)) as f:
                    differ += ["%s: %s" % (name, line.rstrip()) for line in f
                               if any(word in line for word in words)][:20]
            except OSError:
                pass
    assert not differ, "blob revisions differ (node logs in %s):\n%s" % (
        os.path.dirname(cluster.database(1)), "\n".join(differ))
    assert raw_blobs(cluster.database(1)) == raw_blobs(cluster.database(2))


class BlobWriter(threading.Thread):
    """Commits a new blob revision of its own object, in a loop."""

    def __init__(self, cluster, directory, name: str) -> None:
        super().__init__(daemon=True)
        self.db = blob_db(cluster, directory)
        self.name = name
        self.committed: dict[bytes, bytes] = {}  # serial -> content
        self.stop = threading.Event()
        self.errors = 0

    def run(self) -> None:
        tm = transaction.TransactionManager()
        root = self.db.open(tm).root()
        for _ in range(20):  # the other writer adds its own key to the root too
            try:
                root[self.name] = Blob(b"")
                tm.commit()
                break
            except ConflictError:
                tm.abort()
        i = 0
        while not self.stop.is_set():
            i += 1
            content = os.urandom(300_000) + b"%d" % i
            try:
                with root[self.name].open("w") as f:
                    f.write(content)
                tm.commit()
            except (ConflictError, StorageError, OSError):
                tm.abort()
                self.errors += 1
                continue
            self.committed[root[self.name]._p_serial] = content


def test_storage_killed_while_blobs_commit_and_replicate(cluster, tmp_path):
    writers = [BlobWriter(cluster, tmp_path / ("w%d" % i), "w%d" % i) for i in range(2)]
    for w in writers:
        w.start()
    try:
        wait_until(lambda: all(len(w.committed) >= 5 for w in writers), 60, "first commits")
        cluster.nodes["S2"].kill()
        count = sum(len(w.committed) for w in writers)
        wait_until(lambda: sum(len(w.committed) for w in writers) >= count + 10, 60,
                   "commits without S2")
        cluster.nodes["S2"].start()
        wait_until(lambda: up_to_date(cluster, {"S1", "S2"}), 120, "S2 up to date")
        count = sum(len(w.committed) for w in writers)
        wait_until(lambda: sum(len(w.committed) for w in writers) >= count + 5, 60,
                   "commits with S2 back")
    finally:
        for w in writers:
            w.stop.set()
        for w in writers:
            w.join(60)
    wait_until(lambda: up_to_date(cluster, {"S1", "S2"}), 60, "both up to date")
    cluster.stop()
    assert_same_blobs(cluster)
    digests = {digest for _, digest in raw_blobs(cluster.database(1)).values()}
    for w in writers:
        for content in w.committed.values():
            assert hashlib.sha256(content).digest() in digests
        w.db.close()
    assert raw_contents(cluster.database(1)) == raw_contents(cluster.database(2))


def test_record_stored_without_its_content_in_an_out_of_date_cell(cluster, tmp_path,
                                                                   monkeypatch):
    """A client uploads a blob's content while S2 is down, then stores its
    record once S2 is back (its cell OUT_OF_DATE, our transaction holding
    its replication back): S2 takes the record alone, lockless, and the
    source will not send it again.  S2 must fetch the content before its
    cell is up to date (it failed once in the SIGKILL test above)."""
    db = blob_db(cluster, tmp_path / "blobs1")
    root = db.open().root()
    root["b"] = Blob(b"first")
    transaction.commit()
    wait_until(lambda: up_to_date(cluster, {"S1", "S2"}), 30, "cells up to date")
    cluster.nodes["S2"].kill()
    wait_until(lambda: cluster.storage_state("S2") is NodeStates.DOWN, 30, "S2 down")

    real_upload = client_blobs.upload

    def upload_then_s2_back(commit, oid, filename):
        result = real_upload(commit, oid, filename)  # to S1 alone
        cluster.nodes["S2"].start()

        def s2_reachable():
            nids = commit.app.writable_cells(oid)
            if len(nids) != 2:
                return False
            try:
                for nid in nids:
                    commit.app.storage_conn(nid)
            except Exception:  # not operational yet
                return False
            return True
        wait_until(s2_reachable, 60, "S2 writable and reachable for the client")
        return result
    monkeypatch.setattr(client_blobs, "upload", upload_then_s2_back)
    content = os.urandom(CHUNK + 7)
    with root["b"].open("w") as f:
        f.write(content)
    transaction.commit()
    monkeypatch.undo()
    oid, serial = root["b"]._p_oid, root["b"]._p_serial
    db.close()
    wait_until(lambda: up_to_date(cluster, {"S1", "S2"}), 60, "S2 up to date")

    cluster.nodes["S1"].kill()
    wait_until(lambda: cluster.storage_state("S1") is NodeStates.DOWN, 30, "S1 down")
    db = blob_db(cluster, tmp_path / "blobs2")
    try:
        assert read(db.open().root()["b"]) == content  # from S2 alone
        assert db.storage.loadBefore(oid, p64(u64(serial) + 1))[1] == serial
    finally:
        db.close()


def test_a_client_without_the_feature_gets_the_record(cluster, tmp_path):
    db = blob_db(cluster, tmp_path / "blobs")
    root = db.open().root()
    root["b"] = Blob(b"content")
    transaction.commit()
    oid = root["b"]._p_oid
    record = db.storage.load(oid)[0]
    db.close()
    plain = Storage(features=False, **cluster.client_kwargs())
    try:
        data, _ = plain.load(oid)
        assert data == record and is_blob_record(data)
    finally:
        plain.close()
