"""A cluster over a real (namespaced) network: 3 masters, 3 storages
(replicas 1, 12 partitions) and an admin, each on its own host, a ZODB
client on another, every node and the client with a 6 s keep-alive.  A
storage cut off from every other host under a writer is found gone, the
writer carries on without it, and once the network heals it catches up
until every cell is UP_TO_DATE; every commit the writer saw acknowledged
is then readable."""
from __future__ import annotations

import subprocess
import time

import pytest
from netcluster import NetCluster
from netns import Network

from neozodb.cli.cluster import wait_until
from neozodb.protocol import NodeStates

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("netns_ok")]

KEEPALIVE = 6


def test_isolated_storage_under_a_writer(tmp_path):
    with Network(NetCluster.host_names(3, 3) + ["c1"]) as net:
        cluster = NetCluster(net, str(tmp_path / "cluster"), masters=3, storages=3, replicas=1,
                             partitions=12, keepalive=KEEPALIVE)
        try:
            start = time.monotonic()
            cluster.start(wait=60)
            print("running after %.1fs" % (time.monotonic() - start))
            out, stop = tmp_path / "writer.out", tmp_path / "stop"
            with open(out, "w") as o, open(tmp_path / "writer.err", "w") as e:
                writer = cluster.client(net["c1"], "write", "w", str(stop), stdout=o, stderr=e)

            def acked() -> int:
                return len(out.read_text().split())

            def more(n: int, what: str) -> None:
                target = acked() + n
                wait_until(lambda: acked() >= target or writer.poll() is not None, 30, what)
                assert writer.poll() is None, (tmp_path / "writer.err").read_text()

            more(20, "the writer's first commits")
            net.isolate("s2")
            cut = time.monotonic()
            wait_until(lambda: cluster.storage_state("S2") not in (NodeStates.RUNNING, None),
                       KEEPALIVE * 4, "S2 to be found unreachable")
            found = time.monotonic() - cut
            more(10, "commits without S2")
            print("S2 isolated: found gone after %.1fs, %d commits acknowledged"
                  % (found, acked()))
            net.heal()
            healed = time.monotonic()
            wait_until(cluster.all_up_to_date, 60, "every cell UP_TO_DATE")
            print("healed: every cell UP_TO_DATE after %.1fs" % (time.monotonic() - healed))
            more(10, "commits after the heal")
            stop.touch()
            assert writer.wait(30) == 0, (tmp_path / "writer.err").read_text()
            count = acked()
            check = cluster.client(net["c1"], "check", "w", str(count), stdout=subprocess.PIPE,
                                   text=True)
            report = check.communicate(timeout=60)[0]
            assert check.returncode == 0, report
            print("%d acknowledged commits, all readable (%s)"
                  % (count, (tmp_path / "writer.err").read_text().count("retry")
                     and "with retries" or "no retry"))
            cluster.stop()
        finally:
            cluster.kill()
