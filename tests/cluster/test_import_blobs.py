"""Live import of a FileStorage with blobs (bushy and lawn layouts) on
real clusters: every blob revision reads byte-identical to the source
while the import runs (from the source's files or from the database) and
after it, the storage killed with SIGKILL in the middle resumes with
every content once, and a second storage replicates the imported
contents, which ``neoctl check`` finds identical."""
from __future__ import annotations

import hashlib
import os
import sqlite3
import textwrap

from ZODB.utils import p64, u64

from blobdata import blob_revisions, make_blob_source
from neozodb.cli.cluster import wait_until
from neozodb.client import Storage
from neozodb.protocol import NodeStates
from neozodb.protocol.blobs import CHUNK
from replicas import raw_blobs, raw_contents

try:  # tests/cluster may or may not become a package
    from .test_import import ImportCluster, logged
except ImportError:
    from test_import import ImportCluster, logged

import pytest

pytestmark = pytest.mark.timeout(240)


def write_conf(directory: str, fs_path: str, blob_dir: str, rate: int) -> str:
    conf = os.path.join(directory, "importer.conf")
    with open(conf, "w") as f:
        f.write(textwrap.dedent(f"""\
            [neo]
            adapter = SQLite
            database = neo.sqlite
            rate = {rate}

            [root]
            storage = <filestorage>
                path {fs_path}
                blob-dir {blob_dir}
                read-only true
              </filestorage>
            """))
    return conf


def read_all(storage, revisions) -> None:
    """Every blob revision through the client, compared with the source."""
    for oid, tid, _, content in revisions:
        with open(storage.loadBlob(oid, tid), "rb") as f:
            assert f.read() == content, (oid.hex(), tid.hex())


def durable_import_tid(database: str) -> int:
    """The last transaction imported and committed in the database."""
    conn = sqlite3.connect("file:%s?mode=ro" % database, uri=True)
    try:
        row = conn.execute("SELECT value FROM config WHERE name='import_tid'").fetchone()
        return int(row[0]) if row else 0
    finally:
        conn.close()


def unattached_chunks(database: str) -> int:
    conn = sqlite3.connect("file:%s?mode=ro" % database, uri=True)
    try:
        return conn.execute("SELECT COUNT(*) FROM blob_chunk WHERE blob_id NOT IN"
                            " (SELECT blob_id FROM data_blob)").fetchone()[0]
    finally:
        conn.close()


def up_to_date(cluster, names) -> bool:
    lines = cluster.pt_lines()[1:]
    return {line.split()[0] for line in lines} == set(names) and all(
        set(line.split()[2]) <= {"U", "."} for line in lines)


@pytest.mark.parametrize("layout", ["bushy", "lawn"])
def test_live_import_with_blobs(tmp_path, layout):
    fs_path, blob_dir = str(tmp_path / "Data.fs"), str(tmp_path / "blobs")
    make_blob_source(fs_path, blob_dir, layout, big=3 * CHUNK + 5, filler=150)
    revisions = blob_revisions(fs_path, blob_dir)
    assert len(revisions) == 9 and max(len(r[3]) for r in revisions) == 3 * CHUNK + 5
    last_blob_tid = max(u64(r[1]) for r in revisions)
    database = str(tmp_path / "neo.sqlite")
    cluster = ImportCluster(str(tmp_path / "cluster"),
                            write_conf(str(tmp_path), fs_path, blob_dir, rate=200))
    clients = []

    def client(name: str) -> Storage:
        clients.append(Storage(cluster.masters, cluster.name,
                               blob_dir=str(tmp_path / name)))
        return clients[-1]

    try:
        cluster.start()
        # while importing: the blobs not imported yet come from the source
        read_all(client("cache1"), revisions)
        status = cluster.import_status()
        assert status["state"] == "importing" and status["imported_tid"] < last_blob_tid

        # killed in the middle (the first contents imported and committed,
        # not the last), restarted: it goes on where it was
        first_blob = min(u64(r[1]) for r in revisions)
        wait_until(lambda: durable_import_tid(database) >= first_blob, 30,
                   "a commit of the import with contents")
        assert cluster.import_status()["state"] == "importing"
        # a client loads the records of revisions not imported yet, not
        # their contents: it remembers their tails, which the restarted
        # storage cannot map to the source's files until it serves the
        # records again
        tails = client("tails")
        imported = durable_import_tid(database)
        pending = [r for r in revisions if u64(r[1]) > imported]
        for oid, tid, _, _ in pending:
            assert tails.loadBefore(oid, p64(u64(tid) + 1))[1] == tid
        s1 = cluster.storage(1)
        s1.kill()
        s1.start()
        cluster.wait_state("RUNNING", 60)
        wait_until(lambda: logged(s1, "resuming after"), 30, "the import to resume")
        read_all(tails, pending)
        read_all(client("cache2"), revisions)
        status = cluster.import_status()  # some were imported, some not
        assert status["state"] == "importing"
        assert first_blob <= status["imported_tid"] < last_blob_tid
        done = cluster.wait_import("finished")
        assert 0 < done["transactions"] < done["imported"]  # not started over
        read_all(client("cache3"), revisions)
        read_all(clients[0], revisions)  # from its cache, or loaded again

        # each distinct content once, all attached: none lost, none twice
        contents = raw_blobs(database)
        assert sorted(contents.values()) == sorted({
            (len(c), hashlib.sha256(c).digest()) for _, _, _, c in revisions})
        assert unattached_chunks(database) == 0

        # a second storage replicates the imported contents
        for c in clients:
            c.close()
        clients.clear()
        assert cluster.neoctl("set", "replicas", "1")[1]["ok"]
        cluster.importer = None   # S2 is a plain SQLite storage
        cluster.num_storages = 2
        s2 = cluster.storage(2)
        s2.start()
        wait_until(lambda: cluster.storage_state("S2") is NodeStates.PENDING, 30, "S2 pending")
        cluster.neoctl("add", "S2")
        cluster.neoctl("tweak")
        wait_until(lambda: up_to_date(cluster, {"S1", "S2"})
                   and "O" not in "".join(cluster.cells().values()), 60, "S2 up to date")
        assert raw_blobs(cluster.database(2)) == contents
        assert raw_contents(cluster.database(2)) == raw_contents(database)
        lines, _ = cluster.neoctl("check")
        assert lines[-1] == "7 partitions checked, 0 corrupted copies found, 0 repaired", lines
        # S1 gone: S2 serves every content
        s1.kill()
        wait_until(lambda: cluster.storage_state("S1") is NodeStates.DOWN, 30, "S1 down")
        read_all(client("cache4"), revisions)
    finally:
        for c in clients:
            c.close()
        cluster.stop()
