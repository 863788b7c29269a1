"""Blobs through neomigrate and zodbconvert: a FileStorage with a blob
directory (bushy and lawn layouts) -> cluster -> FileStorages with blob
directories, every record and every blob content identical."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import transaction
import ZODB
from ZODB.blob import Blob, is_blob_record
from ZODB.FileStorage import FileStorage

from neozodb.cli.cluster import LocalCluster
from neozodb.protocol.blobs import CHUNK

pytestmark = pytest.mark.timeout(240)


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=180)


def make_source(path: str, blob_dir: str, layout: str) -> None:
    os.makedirs(blob_dir)
    with open(os.path.join(blob_dir, ".layout"), "w") as f:
        f.write(layout)
    db = ZODB.DB(FileStorage(path, blob_dir=blob_dir))
    try:
        root = db.open().root()
        root["empty"] = Blob(b"")
        root["big"] = Blob(os.urandom(2 * CHUNK + 7))
        root["changed"] = Blob(b"first")
        root["dropped"] = Blob(b"dropped later")
        transaction.commit()
        for i in range(3):
            with root["changed"].open("w") as f:
                f.write(b"revision %d" % i)
            transaction.commit()
        db.undo(db.undoLog(0, 1)[0]["id"])  # back to "revision 1"
        transaction.commit()
        del root["dropped"]
        transaction.commit()
    finally:
        db.close()


def contents(path: str, blob_dir: str) -> list:
    """Every record of a FileStorage, blob records with their content."""
    fs = FileStorage(path, read_only=True, blob_dir=blob_dir)
    found = []
    try:
        for txn in fs.iterator():
            for record in txn:
                blob = None
                if is_blob_record(record.data):
                    with open(fs.loadBlob(record.oid, record.tid), "rb") as f:
                        blob = f.read()
                found.append((txn.tid, record.oid, record.data, record.data_txn, blob))
    finally:
        fs.close()
    return found


@pytest.mark.parametrize("layout", ["bushy", "lawn"])
def test_filestorage_blobs_to_cluster_and_back(tmp_path, layout):
    source, source_blobs = str(tmp_path / "source.fs"), str(tmp_path / "source.blobs")
    make_source(source, source_blobs, layout)
    expected = contents(source, source_blobs)
    assert sum(r[4] is not None for r in expected) == 8  # blob revisions
    assert any(r[4] == b"" for r in expected) and any(
        r[4] is not None and len(r[4]) == 2 * CHUNK + 7 for r in expected)

    cluster = LocalCluster(str(tmp_path / "cluster"), name="blobs", storages=2, replicas=1,
                           partitions=4).start_or_kill()
    try:
        result = run("neozodb.cli.migrate", "-q", "-c", cluster.name, "--blob-dir",
                     source_blobs, source, cluster.masters)
        assert result.returncode == 0, result.stderr

        back, back_blobs = str(tmp_path / "back.fs"), str(tmp_path / "back.blobs")
        result = run("neozodb.cli.migrate", "-q", "-c", cluster.name, "--blob-dir", back_blobs,
                     cluster.masters, back)
        assert result.returncode == 0, result.stderr
        assert contents(back, back_blobs) == expected

        # zodbconvert, out of the cluster through its client
        converted, converted_blobs = (str(tmp_path / "converted.fs"),
                                      str(tmp_path / "converted.blobs"))
        config = tmp_path / "convert.conf"
        config.write_text(f"""
%import neozodb
<neostorage source>
  master_nodes {cluster.masters}
  name {cluster.name}
  read-only true
  blob-dir {tmp_path}/convert.cache
</neostorage>
<filestorage destination>
  path {converted}
  blob-dir {converted_blobs}
</filestorage>
""")
        result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "zodbconvert"),
                                 str(config)], capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr
        assert contents(converted, converted_blobs) == expected
    finally:
        cluster.stop()


def test_blob_dir_usage_errors(tmp_path):
    a, b = str(tmp_path / "a.fs"), str(tmp_path / "b.fs")
    FileStorage(a).close()
    result = run("neozodb.cli.migrate", "--blob-dir", str(tmp_path), a, b)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "neomigrate: error: --blob-dir: only between a FileStorage and a cluster")
    result = run("neozodb.cli.migrate", "-c", "x", "--blob-dir", str(tmp_path / "none"), a,
                 "127.0.0.1:1")
    assert result.returncode == 2
    assert "no such directory" in result.stderr
