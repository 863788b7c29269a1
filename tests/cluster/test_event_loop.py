"""The nodes' event loop (``--event-loop``, cli/run.py): uvloop when
installed (the extra 'fast', which the tests install), plain asyncio on
demand; a cluster works on either, TLS included, and each node logs which
one it runs."""
from __future__ import annotations

import importlib.util
import os

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping

from neozodb.cli.cluster import LocalCluster
from neozodb.client import Storage

pytestmark = pytest.mark.timeout(120)


def _loops(cluster: LocalCluster) -> dict[str, str]:
    """node -> the event loop its log names."""
    found = {}
    for name, node in cluster.nodes.items():
        with open(node.logfile) as f:
            for line in f:
                if ": event loop " in line:
                    found[name] = line.rsplit(" ", 1)[1].strip()
    return found


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_cluster_on_each_event_loop(tmp_path, loop):
    if loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        pytest.skip("uvloop is not installed")
    cluster = LocalCluster(str(tmp_path / "cluster"), name="loops", storages=2, replicas=1,
                           partitions=4, tls=True,
                           node_args=[] if loop == "uvloop" else ["--event-loop", loop])
    cluster.start_or_kill()
    try:
        # auto picks uvloop when installed
        assert _loops(cluster) == {name: loop for name in cluster.nodes}
        db = ZODB.DB(Storage(**cluster.client_kwargs()))
        try:
            tm = transaction.TransactionManager()
            root = db.open(tm).root()
            for i in range(50):
                root[i] = PersistentMapping(value=os.urandom(64))
            tm.commit()
            expected = {i: root[i]["value"] for i in range(50)}
        finally:
            db.close()
        db = ZODB.DB(Storage(**cluster.client_kwargs()))  # a cold cache: loads from both
        try:
            root = db.open(transaction.TransactionManager()).root()
            assert {i: root[i]["value"] for i in range(50)} == expected
        finally:
            db.close()
    finally:
        cluster.stop()
