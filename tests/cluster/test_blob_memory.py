"""A 2 GiB blob committed and read back with bounded memory: the client
(its own process) and the storage stay under 200 MB of peak RSS, since
contents move in chunks and are hashed as they go."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from neozodb.cli.cluster import LocalCluster

pytestmark = pytest.mark.timeout(600)

SIZE = 2 << 30
LIMIT = 200 << 20

CLIENT = textwrap.dedent('''
    import hashlib, sys, transaction, ZODB
    from ZODB.blob import Blob
    from neozodb.client import Storage
    masters, name, cache, mode, size = sys.argv[1:6]
    size = int(size)
    db = ZODB.DB(Storage(masters, name, blob_dir=cache))
    root = db.open().root()
    digest = hashlib.sha256()
    if mode == "write":
        root["big"] = blob = Blob()
        block = bytes(range(256)) * 4096  # 1 MiB
        with blob.open("w") as f:
            for i in range(size // len(block)):
                piece = block[:-8] + i.to_bytes(8, "big")
                f.write(piece)
                digest.update(piece)
        transaction.commit()
    else:
        with root["big"].open("r") as f:
            while True:
                piece = f.read(1 << 20)
                if not piece:
                    break
                digest.update(piece)
    db.close()
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    print(digest.hexdigest(), peak)
''')


def peak_rss(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def client(cluster, tmp_path, mode: str) -> tuple[str, int]:
    result = subprocess.run(
        [sys.executable, "-c", CLIENT, cluster.masters, cluster.name,
         str(tmp_path / ("cache-" + mode)), mode, str(SIZE)],
        capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stderr
    digest, peak = result.stdout.split()
    return digest, int(peak)


def test_two_gib_blob_with_bounded_memory(tmp_path):
    cluster = LocalCluster(str(tmp_path / "cluster"), name="big", storages=1, replicas=0,
                           partitions=4).start_or_kill()
    try:
        written, write_peak = client(cluster, tmp_path, "write")
        # the reader has its own cache: the content comes from the storage
        read, read_peak = client(cluster, tmp_path, "read")
        storage_peak = peak_rss(cluster.nodes["S1"].proc.pid)
    finally:
        cluster.stop()
        size = os.path.getsize(cluster.database(1))
        # pytest keeps the last runs' directories: not these gigabytes
        for name in ("cluster", "cache-write", "cache-read"):
            shutil.rmtree(tmp_path / name, ignore_errors=True)
    assert read == written
    print("peak RSS: writer %.0f MB, reader %.0f MB, storage %.0f MB" % (
        write_peak / 2**20, read_peak / 2**20, storage_peak / 2**20))
    assert write_peak < LIMIT and read_peak < LIMIT and storage_peak < LIMIT, (
        write_peak, read_peak, storage_peak)
    assert size >= SIZE
