"""Live import (Importer backend) on real clusters: a cluster started over a
FileStorage is usable at once, copies it in the background while clients
read and commit, resumes after a crash, reports a damaged source, and can
write new transactions back to the source."""
from __future__ import annotations

import os
import shutil
import signal
import textwrap
import threading
import time

import pytest
import ZODB
from ZODB.FileStorage import FileStorage
from ZODB.POSException import ConflictError, StorageError
from ZODB.serialize import referencesf
from ZODB.utils import p64, u64, z64

from fsdata import commit as raw_commit
from fsdata import make_filestorage, no_fsync, transactions
from neozodb.cli.cluster import LocalCluster, wait_until
from neozodb.client import Storage
from neozodb.ctl.neoctl import run_command
from neozodb.net.endpoint import RemoteError

pytestmark = pytest.mark.timeout(180)


class ImportCluster(LocalCluster):
    """One master, one storage running the Importer, one admin."""

    def __init__(self, directory: str, conf: str, replicas: int = 0, **kw) -> None:
        super().__init__(directory, name="imp", storages=1, replicas=replicas, partitions=7,
                         importer=conf, **kw)

    def import_status(self) -> dict | None:
        ctl = self.ctl()
        try:
            return run_command(ctl, ["print", "import"])[1].get("S1")
        finally:
            ctl.close()

    def wait_import(self, state: str, timeout: float = 60) -> dict:
        def reached():
            status = self.import_status()
            return status if status and status["state"] == state else None
        return wait_until(reached, timeout, "import " + state)


def write_conf(directory: str, fs_path: str, rate: int = 0, writeback: bool = False) -> str:
    conf = os.path.join(directory, "importer.conf")
    with open(conf, "w") as f:
        f.write(textwrap.dedent(f"""\
            [neo]
            adapter = SQLite
            database = neo.sqlite
            rate = {rate}
            writeback = {'true' if writeback else 'false'}

            [root]
            storage = <filestorage>
                path {fs_path}
                read-only {'false' if writeback else 'true'}
              </filestorage>
            """))
    return conf


def commit(storage, stores=(), deletes=(), user=b"", description=b"", extension=None):
    """A raw transaction; returns what the iterator must show for it."""
    tid = raw_commit(storage, stores, deletes, user=user, description=description,
                     extension=extension)
    return (tid, " ", user, description, dict(extension or {}),
            [(oid, tid, data, None) for oid, _, data in stores]
            + [(oid, tid, None, None) for oid, _ in deletes])


def logged(node, text: str) -> bool:
    with open(node.logfile, "rb") as f:
        return text.encode() in f.read()


def source_state(fs, oid: bytes):
    """(data, serial) of the latest revision in the source, None if deleted."""
    try:
        return fs.load(oid)
    except KeyError:
        return None


def test_live_import(tmp_path):
    """10,000 transactions imported while clients read and commit; the
    storage is killed and restarted in the middle; then the cluster's
    iterator shows the source and the new commits record by record, and
    so does a FileStorage exported from the cluster."""
    fs_path = str(tmp_path / "Data.fs")
    summary = make_filestorage(fs_path, transactions=10000)
    source = FileStorage(fs_path, read_only=True)   # the node opens it read-only too
    expected = transactions(source.iterator())
    last_source_tid = source.lastTransaction()
    assert len(expected) >= 10000
    cluster = ImportCluster(str(tmp_path / "cluster"), write_conf(str(tmp_path), fs_path,
                                                                  rate=1200))
    storage = None
    try:
        cluster.start()
        storage = Storage(cluster.masters, cluster.name)
        assert storage.lastTransaction() == last_source_tid
        # reads of what is not imported yet: the objects the end of the
        # source changed, their history and older revisions
        latest = expected[-200:]
        oids = sorted({r[0] for t in latest for r in t[5]})
        for oid in oids:
            state = source_state(source, oid)
            if state is None:
                with pytest.raises(KeyError):
                    storage.load(oid)
            else:
                assert storage.load(oid) == state
        for _, _, _, _, _, records in latest[:50]:
            for oid, tid, data, _ in records:
                if data is not None:
                    assert storage.loadSerial(oid, tid) == data
                    assert storage.loadBefore(oid, p64(u64(tid) + 1))[:2] == (data, tid)
        oid = summary["oids"][-1]
        assert [h["tid"] for h in storage.history(oid, 100)] == \
            [h["tid"] for h in source.history(oid, 100)]
        status = cluster.import_status()
        assert status["state"] == "importing"
        assert status["imported_tid"] < u64(latest[0][0])  # really from the source
        db = ZODB.DB(storage)
        conn = db.open()
        assert dict(conn.root()["tree"]) == dict(ZODB.DB(source).open().root()["tree"])
        conn.close()
        # iterating what is not imported yet is refused, clearly
        with pytest.raises(Exception, match="being imported"):
            list(storage.iterator())

        # commits while importing: TIDs after the source's, conflicts
        # detected against revisions not imported yet
        new: list[tuple] = []
        live = [o for o in oids if source_state(source, o) is not None]
        changed = live[0]
        data, serial = source.load(changed)
        new.append(commit(storage, [(changed, serial, b"changed during the import")],
                          user=b"importer test", description=b"first",
                          extension={"during": "import"}))
        assert new[0][0] > last_source_tid
        with pytest.raises(ConflictError):
            commit(storage, [(changed, serial, b"stale serial")])
        deleted = live[1]
        new.append(commit(storage, deletes=[(deleted, source.load(deleted)[1])]))
        errors = []

        def committer():
            try:
                serial = z64
                oid = storage.new_oid()
                for i in range(60):
                    record = commit(storage, [(oid, serial, b"commit %d" % i)],
                                    description=b"committer %d" % i)
                    serial = record[0]
                    new.append(record)
            except Exception as e:
                errors.append(e)
        thread = threading.Thread(target=committer)
        thread.start()
        thread.join(60)
        assert not errors and len(new) == 62

        # killed in the middle, restarted: it goes on after what it imported
        status = cluster.import_status()
        assert status["state"] == "importing"
        cluster.storage(1).kill()
        s1 = cluster.storage(1)
        s1.start()
        cluster.wait_state("RUNNING", 60)
        wait_until(lambda: logged(s1, "resuming after"), 30, "the import to resume")
        new.append(commit(storage, [(changed, new[0][0], b"after the restart")]))
        done = cluster.wait_import("finished")
        assert done["imported"] == len(expected) and done["imported_tid"] == u64(last_source_tid)
        assert logged(s1, "switch the storage to the native backend")
        assert 0 < done["transactions"] < len(expected)  # the second run did not start over

        # everything, record by record: through the cluster's iterator...
        new.sort()
        got = transactions(storage.iterator())
        assert got[:len(expected)] == expected
        assert got[len(expected):] == new
        # switched to the native backend: the same database, without the
        # source; then exported to a FileStorage, which shows it all again
        s1.signal(signal.SIGTERM)
        assert s1.wait(30) == 0
        s1.argv[s1.argv.index("-a") + 1] = "SQLite"
        s1.argv[s1.argv.index("-d") + 1] = str(tmp_path / "neo.sqlite")
        s1.start()
        cluster.wait_state("RUNNING", 60)
        assert cluster.import_status() is None  # no import any more
        export = FileStorage(str(tmp_path / "export.fs"), create=True)
        try:
            with no_fsync():
                export.copyTransactionsFrom(storage)
            assert transactions(export.iterator()) == expected + new
        finally:
            export.close()
    finally:
        if storage is not None:
            storage.close()
        source.close()
        cluster.stop()


def test_damaged_source(tmp_path):
    """A record overwritten in the middle of the FileStorage: the import
    stops before the damaged transaction, says where, and the cluster goes
    on with what it has."""
    fs_path = str(tmp_path / "Data.fs")
    make_filestorage(fs_path, transactions=600, objects=40)
    fs = FileStorage(fs_path, read_only=True)
    try:
        expected = transactions(fs.iterator())
        for txn in fs.iterator(expected[300][0]):
            pos = list(txn)[0].pos
            break
    finally:
        fs.close()
    with open(fs_path, "r+b") as f:
        f.seek(pos + 32)   # the version and data lengths of the record
        f.write(b"\xff" * 10)
    cluster = ImportCluster(str(tmp_path / "cluster"), write_conf(str(tmp_path), fs_path))
    try:
        cluster.start()
        status = cluster.wait_import("failed")
        bad = "transaction %#x" % u64(expected[300][0])
        assert bad in status["error"] and "record at offset %d" % pos in status["error"]
        assert status["imported_tid"] == u64(expected[299][0])
        assert status["imported"] == 300
        ctl = cluster.ctl()
        try:
            line = run_command(ctl, ["print", "import"])[0][0]
        finally:
            ctl.close()
        assert line.startswith("S1: import from %s stopped at %#x: " % (
            fs_path, u64(expected[299][0]))) and bad in line
        assert logged(cluster.storage(1), "import stopped: ")
        assert cluster.cluster_state() == "RUNNING"
        storage = Storage(cluster.masters, cluster.name)
        try:
            damaged = {r[0] for r in expected[300][5]}
            for tid, _, _, _, _, records in expected[290:300]:
                for oid, _, data, _ in records:
                    if data is not None and oid not in damaged:
                        assert storage.loadSerial(oid, tid) == data
            # the objects of the damaged record: a clear error
            with pytest.raises(RemoteError, match="cannot read .* from the source"):
                storage.load(expected[300][5][0][0])
            oid = storage.new_oid()
            assert commit(storage, [(oid, z64, b"still committing")])[0] > expected[-1][0]
            # packing past an unfinished import: refused, nothing lost
            for gc in (True, False):
                with pytest.raises(StorageError, match="cannot pack"):
                    storage.pack(time.time(), referencesf, gc=gc)
            assert storage.load(oid)[0] == b"still committing"
        finally:
            storage.close()
    finally:
        cluster.stop()


def test_writeback(tmp_path):
    """writeback = true: what is committed in the cluster reaches the
    source, with its TIDs, during the import and after it."""
    fs_path = str(tmp_path / "Data.fs")
    make_filestorage(fs_path, transactions=400, objects=30)
    cluster = ImportCluster(str(tmp_path / "cluster"),
                            write_conf(str(tmp_path), fs_path, rate=300, writeback=True))
    storage = None
    try:
        cluster.start()
        storage = Storage(cluster.masters, cluster.name)
        oid = storage.new_oid()
        serial = z64
        for i in range(10):
            serial = commit(storage, [(oid, serial, b"written back %d" % i)],
                            extension={"i": i})[0]
        assert cluster.import_status()["state"] == "importing"
        status = cluster.wait_import("finished")
        serial = commit(storage, [(oid, serial, b"after the import")])[0]
        wait_until(lambda: cluster.import_status()["writeback"]["tid"] == u64(serial), 30,
                   "the writeback")
        assert cluster.import_status()["writeback"]["transactions"] == 11
        assert status["writeback"]["error"] is None
        got = transactions(storage.iterator())
    finally:
        if storage is not None:
            storage.close()
        cluster.stop()
    source = FileStorage(fs_path, read_only=True)
    try:
        assert transactions(source.iterator()) == got
        assert source.load(oid) == (b"after the import", serial)
    finally:
        source.close()


def test_refused_with_replicas(tmp_path):
    fs_path = str(tmp_path / "Data.fs")
    make_filestorage(fs_path, transactions=20, objects=5)
    cluster = ImportCluster(str(tmp_path / "cluster"), write_conf(str(tmp_path), fs_path),
                            replicas=1)
    try:
        cluster.start(wait=0)
        s1 = cluster.storage(1)
        assert s1.wait(60) == 2
        assert logged(s1, "must be the only storage of its cluster, with 0 replicas")
    finally:
        cluster.kill()
    shutil.rmtree(str(tmp_path / "cluster"))
