"""Failures inside a node, against real node processes: a database that
cannot write stops its storage node (one log line) rather than answering
or carrying on."""
from __future__ import annotations

import os
import resource

import pytest

from fsdata import commit
from neozodb.cli.cluster import LocalCluster, wait_until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def small_cluster(tmp_path):
    c = LocalCluster(str(tmp_path / "cluster"), name="test", storages=1, replicas=0, partitions=4)
    try:
        c.start(wait=60)
        yield c
    finally:
        c.kill()


def test_database_write_error_stops_the_storage(small_cluster):
    """The storage process may not grow any file past its current size
    (RLIMIT_FSIZE: writes fail with EFBIG, Python ignores SIGXFSZ), then a
    client commits 16 MB: SQLite fails to write, the storage exits with
    status 1 and one line saying why, the commit is not reported done."""
    from neozodb.client import Storage
    cluster = small_cluster
    storage = Storage(cluster.masters, cluster.name)
    try:
        oid = storage.new_oid()
        commit(storage, [(oid, b"\0" * 8, b"before")])
        node = cluster.nodes["S1"]
        pid = node.proc.pid
        files = [cluster.database(1) + suffix for suffix in ("", "-wal", "-shm")]
        files.append(os.path.join(cluster.directory, "S1.log"))
        limit = max(os.path.getsize(f) for f in files if os.path.exists(f)) + (256 << 10)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, limit))
        with pytest.raises(Exception):  # noqa: B017 - any failure, never a success
            commit(storage, [(oid, storage.load(oid)[1], os.urandom(16 << 20))])
        assert node.wait(30) == 1
        with open(os.path.join(cluster.directory, "S1.log")) as f:
            lines = [line for line in f if "database error" in line]
        assert len(lines) == 1, lines
        assert "stopping, the database is in an unknown state" in lines[0]
        assert "Traceback" not in "".join(lines)
    finally:
        storage.close()


def test_storage_serves_again_after_restart(small_cluster):
    """The stop is safe: restarted without the limit, the storage has what
    was committed before and nothing of the failed transaction."""
    from neozodb.client import Storage
    cluster = small_cluster
    storage = Storage(cluster.masters, cluster.name)
    try:
        oid = storage.new_oid()
        tid = commit(storage, [(oid, b"\0" * 8, b"before")])
        node = cluster.nodes["S1"]
        files = [cluster.database(1) + s for s in ("", "-wal", "-shm")]
        files.append(os.path.join(cluster.directory, "S1.log"))
        limit = max(os.path.getsize(f) for f in files if os.path.exists(f)) + (256 << 10)
        resource.prlimit(node.proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
        with pytest.raises(Exception):  # noqa: B017
            commit(storage, [(oid, tid, os.urandom(16 << 20))])
        assert node.wait(30) == 1
    finally:
        storage.close()
    node.start()
    cluster.wait_state("RUNNING", 60)
    storage = Storage(cluster.masters, cluster.name)
    try:
        wait_until(lambda: _loads(storage, oid), 30, "the object readable again")
        assert storage.load(oid) == (b"before", tid)
    finally:
        storage.close()


def _loads(storage, oid) -> bool:
    try:
        storage.load(oid)
        return True
    except Exception:
        return False
