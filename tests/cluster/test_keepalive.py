"""Keep-alive: a storage whose process hangs (SIGSTOP: its kernel still
acknowledges, TCP says nothing) is found dead by the application ping
within the keep-alive time, by the master and by clients, and the cluster
carries on with the other replica."""
from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time

import pytest
import transaction
import ZODB

from neozodb.cli.cluster import LocalCluster, wait_until
from neozodb.client import Storage
from neozodb.protocol import NodeStates

pytestmark = pytest.mark.timeout(120)

# Seconds for the news to reach the admin, and for a loaded machine: the
# bounds stay far below what finds a dead peer without keep-alive (TCP's
# own, 60 s + 3 x 10 s, or never for a stopped process whose kernel answers)
MARGIN = 10.0


@pytest.fixture
def make_cluster(tmp_path):
    """make(keepalive): 1 master, 2 storages (replicas 1), 1 admin, every
    node started with --keepalive."""
    clusters = []

    def make(keepalive: float) -> LocalCluster:
        c = LocalCluster(str(tmp_path / ("c%d" % len(clusters))), name="keepalive", storages=2,
                         replicas=1, partitions=6, node_args=["--keepalive", "%g" % keepalive])
        clusters.append(c)
        c.start(wait=60)
        return c

    try:
        yield make
    finally:
        for c in clusters:
            s2 = c.nodes.get("S2")
            if s2 is not None and s2.running:
                os.kill(s2.proc.pid, signal.SIGCONT)
            c.kill()


def bounded(fn, timeout: float):
    """fn() in a thread: its result, or its exception; fails if it has not
    returned within timeout seconds (a hung commit must not hang the test)."""
    outcome = []

    def run():
        try:
            outcome.append((True, fn()))
        except BaseException as e:
            outcome.append((False, e))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert outcome, "%s did not return within %s s" % (fn.__name__, timeout)
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def stop_s2(cluster) -> float:
    os.kill(cluster.nodes["S2"].proc.pid, signal.SIGSTOP)
    return time.monotonic()


def test_stopped_storage_declared_down_within_the_keepalive(make_cluster):
    keepalive = 3.0
    cluster = make_cluster(keepalive)
    db = ZODB.DB(Storage(cluster.masters, cluster.name, keepalive=keepalive))
    try:
        tm = transaction.TransactionManager()
        root = db.open(tm).root()
        root["a"] = 1
        tm.commit()  # on both storages: the client is connected to both
        stopped = stop_s2(cluster)
        wait_until(lambda: cluster.storage_state("S2") is NodeStates.DOWN,
                   keepalive + MARGIN, "S2 declared down")
        detected = time.monotonic() - stopped
        print("S2 declared DOWN %.2f s after SIGSTOP (keep-alive %g s)" % (detected, keepalive))
        # found by the master's Ping (nothing before half the keep-alive)
        assert detected >= keepalive / 2 - 0.1
        with open(os.path.join(cluster.directory, "M1.log"), encoding="utf-8") as f:
            log = f.read()
        assert re.search(r"closing connection with S2 \(\S+\): no answer to keep-alive for 1\.5 s",
                         log), log
        assert cluster.cluster_state() == "RUNNING"
        assert cluster.storage_state("S1") is NodeStates.RUNNING

        # the cluster carries on: commits and reads on S1
        def commit():
            root["a"] = 2
            root["b"] = 3
            tm.commit()
        bounded(commit, keepalive + MARGIN)

        def read():
            tm2 = transaction.TransactionManager()
            conn = db.open(tm2)
            try:
                return conn.root()["a"], conn.root()["b"]
            finally:
                tm2.abort()
                conn.close()
        db.cacheMinimize()
        db.storage.app.cache.clear_current()  # read from the storage, not the cache
        assert bounded(read, keepalive + MARGIN) == (2, 3)
    finally:
        db.close()


def test_client_keepalive_unblocks_a_commit_on_a_stopped_storage(make_cluster, caplog):
    """Server keep-alive off: only the client's own keep-alive can find out
    that S2 hangs; the commit then completes without it (FailedVote), and
    the master drops S2."""
    keepalive = 2.0
    cluster = make_cluster(0)
    db = ZODB.DB(Storage(cluster.masters, cluster.name, keepalive=keepalive))
    try:
        tm = transaction.TransactionManager()
        root = db.open(tm).root()
        root["a"] = 1
        tm.commit()
        stopped = stop_s2(cluster)

        def commit():
            root["a"] = 2  # stored on S1 and on the silent S2
            tm.commit()
        # Up to twice the keep-alive: once the stores' connection is
        # dropped, the vote connects to S2 again (still RUNNING for the
        # master), and that connection waits for S2's handshake as long.
        with caplog.at_level(logging.WARNING, "neozodb.client"):
            bounded(commit, 2 * keepalive + MARGIN)
        committed = time.monotonic() - stopped
        print("commit done %.2f s after SIGSTOP (client keep-alive %g s)" % (committed, keepalive))
        assert any(re.fullmatch(r"C\d+: closing connection with S2: no answer to keep-alive for 1 s",
                                r.getMessage()) for r in caplog.records), caplog.text
        wait_until(lambda: cluster.storage_state("S2") is NodeStates.DOWN, MARGIN, "S2 dropped")
        assert cluster.cluster_state() == "RUNNING"

        def read():
            db.cacheMinimize()
            db.storage.app.cache.clear_current()
            tm2 = transaction.TransactionManager()
            conn = db.open(tm2)
            try:
                return conn.root()["a"]
            finally:
                tm2.abort()
                conn.close()
        assert bounded(read, keepalive + MARGIN) == 2
    finally:
        db.close()
