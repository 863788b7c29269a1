"""Connections that arrive before the cluster is ready wait instead of
bouncing (NEO TODO: delayed connection acceptance)."""
from __future__ import annotations

import threading

import pytest
import transaction
import ZODB

from neozodb.cli.cluster import LocalCluster, wait_until
from neozodb.client import Storage

pytestmark = pytest.mark.timeout(120)


def master_log(cluster) -> str:
    with open(cluster.nodes["M1"].logfile, encoding="utf-8", errors="replace") as f:
        return f.read()


def test_client_started_before_running_connects_once_it_is(tmp_path):
    c = LocalCluster(str(tmp_path / "c"), name="early", storages=2, replicas=1, partitions=6,
                     autostart=False)
    try:
        c.start(wait=0)
        wait_until(lambda: c.cluster_state() == "RECOVERING", 30, "RECOVERING")
        result = {}

        def connect():
            try:
                result["db"] = ZODB.DB(Storage(c.masters, c.name))
            except Exception as e:  # reported by the assertions below
                result["error"] = e
        thread = threading.Thread(target=connect)
        thread.start()
        wait_until(lambda: "waits for the cluster to run" in master_log(c), 30, "client held")
        assert thread.is_alive()  # still waiting: not refused
        out = c.run_neoctl("start", timeout=30)
        assert out.returncode == 0, out.stderr
        thread.join(60)
        assert "error" not in result, result.get("error")
        db = result["db"]
        try:
            conn = db.open()
            conn.root()["x"] = 1
            transaction.commit()
        finally:
            db.close()
        # held once, not refused and retried
        log = master_log(c)
        assert log.count("waits for the cluster to run") == 1
        assert "cluster is not running" not in log
    finally:
        c.kill()
