"""A port LocalCluster chose in advance (free_port) can be taken before its
node binds it, by a process that picked the same one (a test run in
parallel: seen once in CI-like runs, as a master dying with "Address
already in use").  A new cluster then starts again on other ports."""
from __future__ import annotations

import contextlib
import socket

import pytest

from neozodb.cli.cluster import LocalCluster, wait_until
from neozodb.client import Storage

pytestmark = pytest.mark.timeout(120)


@contextlib.contextmanager
def squatting(port: int):
    """A socket listening on ``port`` of 127.0.0.1 (0: any free one), as
    another process's node would."""
    squatter = socket.socket()
    try:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        yield squatter
    finally:
        squatter.close()


@pytest.mark.parametrize("node", ["M1", "A1"])
def test_a_port_taken_before_its_node_binds_it_is_replaced(tmp_path, node):
    cluster = LocalCluster(str(tmp_path / "cluster"), storages=1, replicas=0, partitions=2)
    attr = "master_address" if node == "M1" else "admin_address"
    port = getattr(cluster, attr)[1]
    with squatting(port):
        cluster.start_or_kill()
        try:
            assert getattr(cluster, attr)[1] != port
            with open(cluster.nodes[node].logfile) as f:
                assert "Address already in use" in f.read()  # the first start
            storage = Storage(**cluster.client_kwargs())
            try:
                assert storage.lastTransaction() is not None
            finally:
                storage.close()
        finally:
            cluster.stop()


def test_an_admin_whose_port_is_taken_after_the_cluster_runs_is_replaced(tmp_path):
    """The admin starts last, and the wait for RUNNING asks whatever
    listens on the admin's address: in CI another test's admin, which held
    the port ours had been given, answered RUNNING before ours exited.
    Here the first wait for RUNNING returns once ours has exited."""
    cluster = LocalCluster(str(tmp_path / "cluster"), storages=1, replicas=0, partitions=2)
    port = cluster.admin_address[1]
    wait_state = cluster.wait_state
    calls = []

    def answered_by_another_admin(state, timeout):
        calls.append(state)
        if len(calls) == 1:
            wait_until(lambda: not cluster.nodes["A1"].running, 30, "A1 to exit")
        else:
            wait_state(state, timeout)
    cluster.wait_state = answered_by_another_admin
    with squatting(port):
        cluster.start_or_kill()
        try:
            assert calls == ["RUNNING", "RUNNING"]
            assert cluster.admin_address[1] != port and cluster.nodes["A1"].running
            assert cluster.cluster_state() == "RUNNING"
        finally:
            cluster.stop()


def test_a_port_given_by_the_caller_is_not_replaced(tmp_path):
    with squatting(0) as squatter:
        port = squatter.getsockname()[1]
        cluster = LocalCluster(str(tmp_path / "cluster"), storages=1, replicas=0,
                               partitions=2, master_port=port)
        with pytest.raises(RuntimeError, match="did not reach RUNNING"):
            cluster.start_or_kill(wait=30)
        assert cluster.master_address[1] == port
