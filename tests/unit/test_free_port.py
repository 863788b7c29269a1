"""Ports chosen in advance for nodes (cli/cluster.py, ``free_port``): never
one the kernel may hand to another process's connection meanwhile."""
from __future__ import annotations

import socket

import pytest

from neozodb.cli import cluster
from neozodb.cli.cluster import LocalCluster, _ephemeral_floor, free_port

pytestmark = pytest.mark.timeout(30)


def test_ports_are_free_and_below_the_ephemeral_range():
    floor = _ephemeral_floor()
    ports = {free_port() for _ in range(50)}
    assert all(1024 <= p < floor for p in ports)
    assert len(ports) > 1  # chosen at random: parallel tests rarely meet
    for port in list(ports)[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_in_use_is_not_chosen(monkeypatch):
    floor = _ephemeral_floor()
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", floor - 1))
    except OSError:
        pytest.skip("port %d in use here" % (floor - 1))
    try:
        # the first port drawn is the one in use: a later draw is returned
        draws = iter([floor - 1, *range(floor - 2, floor - 150, -1)])
        monkeypatch.setattr("random.SystemRandom.randrange", lambda self, a, b: next(draws))
        assert floor - 150 < free_port() < floor - 1
    finally:
        taken.close()


def test_a_local_cluster_knows_its_ports_before_starting(tmp_path):
    # nodes restarted come back on the same address: master and admin
    # ports are chosen in advance, below the ephemeral range
    c = LocalCluster(str(tmp_path), storages=1, replicas=0, masters=2)
    floor = _ephemeral_floor()
    ports = [a[1] for a in c.master_addresses] + [c.admin_address[1]]
    assert all(0 < p < floor for p in ports)
    assert len(set(ports)) == 3


def test_workers_choose_in_slices_of_their_own(monkeypatch):
    """The test suite's workers (tests/conftest.py) never choose the same
    port: a node stopped for a while leaves its port free for any check."""
    floor = _ephemeral_floor()
    low = max(1024, floor - 10000)
    width = (floor - low) // 3
    seen = []
    for i in range(3):
        monkeypatch.setattr(cluster, "PORT_SLICE", (i, 3))
        ports = {free_port() for _ in range(40)}
        assert all(low + i * width <= p < low + (i + 1) * width for p in ports), (i, ports)
        seen.append(ports)
    assert not (seen[0] & seen[1] or seen[1] & seen[2] or seen[0] & seen[2])
