"""Power loss during bulk copies (feature bulk-copy, client/bulk.py): a
copier commits a FileStorage into a cluster whose storages keep their
databases on powerfs (test_power_loss.py), 20 transactions per batch,
logging each transaction as it is reported copied; at a random moment
every node and the copier are SIGKILLed and the power is cut.  Then every
transaction reported copied is on disk, locked or committed, in every
replica's raw database, and once the cluster runs again the destination
holds a prefix of the source, from which the copy goes on.

NEOZODB_POWER_SEED=<seed> replays a failure, as for test_power_loss.py."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap

import pytest
from checks import READABLE, read_replica
from power import PowerCluster, pause
from test_power_loss import fuse_mounts, fuse_ok  # noqa: F401 - fixtures

from fsdata import in_cluster, made
from neozodb.cli.cluster import wait_until
from seeds import replay_seed

pytestmark = pytest.mark.timeout(240)

# source.fs masters cluster-name log batch: copy what follows the
# destination's last transaction, writing each TID reported copied
COPIER = textwrap.dedent("""
    import sys
    from ZODB.FileStorage import FileStorage
    from ZODB.utils import p64, u64, z64
    from neozodb.client import Storage
    from neozodb.client.copying import copy
    source = FileStorage(sys.argv[1], read_only=True)
    destination = Storage(master_nodes=sys.argv[2], name=sys.argv[3])
    last = destination.lastTransaction()
    with open(sys.argv[4], "a", buffering=1) as log:
        copy(source, destination, None if last == z64 else p64(u64(last) + 1),
             done=lambda tid, records: log.write(tid.hex() + "\\n"), batch=int(sys.argv[5]))
    destination.close()
""")


def _acked(path: str) -> list[int]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [int(line, 16) for line in f.read().split()]


def _check_disk(paths: list[str], acked: list[int]) -> list[str]:
    """Each transaction reported copied, on every readable cell of its
    metadata in the freshest partition table (tests/durability/checks.py):
    locked or committed, or only voted there if another replica locked it
    (the master died before that one's lock; verification validates it)."""
    replicas = [read_replica(path, []) for path in paths]
    fresh = max(replicas, key=lambda r: r.ptid)
    by_nid = {r.nid: r for r in replicas}
    problems = []
    for tid in acked:
        cells = fresh.cells.get(tid % fresh.partitions, {})
        holders = [by_nid[nid] for nid, state in cells.items() if state in READABLE]
        locked = [r.name for r in holders if tid in r.meta]
        if not locked:
            problems.append("%016x: locked nowhere (cells %s)" % (tid, cells))
        problems += ["%016x: not on %s" % (tid, r.name) for r in holders
                     if tid not in r.meta and tid not in r.voted]
    return problems


@pytest.mark.parametrize("storages, replicas", [(1, 0), (2, 1)])
def test_bulk_copies_survive_power_loss(fuse_ok, tmp_path, storages, replicas):  # noqa: F811
    from power import Disk
    rng = random.Random(replay_seed("NEOZODB_POWER_SEED", "bulk power-loss"))
    source = str(tmp_path / "source.fs")
    expected = made(source, 2000, 100)
    tids = [int.from_bytes(t[0], "big") for t in expected]
    log = str(tmp_path / "copied.log")
    disk = Disk(str(tmp_path / "disk"))
    cluster = PowerCluster(str(tmp_path / "cluster"), disk, storages=storages,
                           replicas=replicas, partitions=6)
    try:
        disk.mount()
        cluster.start(wait=60)
        held = 0  # transactions in the cluster
        for r in range(3):
            before = len(_acked(log))
            proc = subprocess.Popen([sys.executable, "-c", COPIER, source, cluster.masters,
                                     cluster.name, log, "20"])
            try:
                wanted = before + rng.randint(1, 5) * 20
                wait_until(lambda p=proc, n=wanted: len(_acked(log)) >= n or p.poll() is not None,
                           120, "round %d: batches copied" % r)
                pause(rng.uniform(0, 0.05))
                cluster.kill_all(rng)
            finally:
                proc.kill()
                proc.wait()
            acked = _acked(log)
            now = acked[before:]
            assert now, "round %d: nothing copied" % r
            assert now == tids[held:held + len(now)]  # in order, from the cluster's last
            report = disk.cut()
            assert report["bytes"] > 0  # the cut did undo something
            problems = _check_disk([os.path.join(disk.backing, "storage%d.sqlite" % i)
                                    for i in range(1, storages + 1)], acked)
            assert not problems, "round %d: %s" % (r, problems[:5])
            disk.mount()
            cluster.restart()
            wait_until(cluster.all_up_to_date, 60, "every cell up to date")
            got = in_cluster(cluster)
            assert got == expected[:len(got)], "round %d: not a prefix of the source" % r
            assert len(got) >= held + len(now)
            held = len(got)
            print("round %d: %d transactions acknowledged, %d in the cluster, %d bytes lost"
                  " at the cut" % (r, len(acked), len(got), report["bytes"]))
        done = subprocess.run([sys.executable, "-c", COPIER, source, cluster.masters,
                               cluster.name, log, "20"], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert in_cluster(cluster) == expected
    finally:
        cluster.kill()
        disk.unmount()
