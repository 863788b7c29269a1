"""A client whose master dies during tpc_finish ends with a definite outcome
(the TID, or an error), and it is what the storages hold (NEO TODO:
tpc_finish may raise while committed)."""
from __future__ import annotations

import os
import signal

import pytest
from ZODB.POSException import StorageTransactionError
from ZODB.utils import z64

from commits import finish_in_thread, locked_in, voted
from neozodb.cli.cluster import wait_until
from neozodb.client import Storage

pytestmark = pytest.mark.timeout(180)


def restart_master(cluster):
    master = cluster.nodes["M1"]
    master.kill()
    master.start()
    cluster.wait_state("RUNNING", 60)


def current(cluster, oid):
    storage = Storage(cluster.masters, cluster.name)
    try:
        return storage.load(oid)
    finally:
        storage.close()


def setup_object(cluster):
    storage = Storage(cluster.masters, cluster.name)
    oid = storage.new_oid()
    txn = voted(storage, oid, b"first", z64)
    serial = storage.tpc_finish(txn)
    return storage, oid, serial


def test_master_killed_after_the_lock_commits(cluster):
    storage, oid, serial = setup_object(cluster)
    try:
        txn = voted(storage, oid, b"second", serial)
        # S2 cannot lock: the master waits for it with S1 locked
        s2 = cluster.nodes["S2"].proc
        os.kill(s2.pid, signal.SIGSTOP)
        try:
            thread, outcome = finish_in_thread(storage, txn)
            wait_until(lambda: locked_in(os.path.join(cluster.directory, "storage1.sqlite"),
                                         serial),
                       30, "S1 to lock")
            cluster.nodes["M1"].kill()
        finally:
            os.kill(s2.pid, signal.SIGCONT)
        restart_master(cluster)
        thread.join(90)
        assert not thread.is_alive()
        # verification found it locked: committed, and the client says so
        assert "error" not in outcome, outcome.get("error")
        assert current(cluster, oid) == (b"second", outcome["tid"])
    finally:
        storage.close()


def test_master_killed_before_the_lock_aborts(cluster):
    storage, oid, serial = setup_object(cluster)
    try:
        txn = voted(storage, oid, b"second", serial)
        master = cluster.nodes["M1"].proc
        os.kill(master.pid, signal.SIGSTOP)  # gets the finish request, never handles it
        thread, outcome = finish_in_thread(storage, txn)
        restart_master(cluster)
        thread.join(90)
        assert not thread.is_alive()
        assert "tid" not in outcome and "not committed" in str(outcome["error"])
        assert current(cluster, oid) == (b"first", serial)
    finally:
        storage.close()


def test_master_killed_between_vote_and_finish(cluster):
    """The finish was never sent: nothing can have committed; tpc_finish
    says so, the storages dropped the voted data, and the client goes on."""
    storage, oid, serial = setup_object(cluster)
    try:
        txn = voted(storage, oid, b"second", serial)
        restart_master(cluster)
        with pytest.raises(StorageTransactionError, match="not committed"):
            storage.tpc_finish(txn)
        storage.tpc_abort(txn)
        assert current(cluster, oid) == (b"first", serial)
        txn = voted(storage, oid, b"third", serial)
        tid = storage.tpc_finish(txn)
        assert current(cluster, oid) == (b"third", tid)
    finally:
        storage.close()
