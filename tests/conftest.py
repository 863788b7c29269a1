"""Shared test helpers: real local clusters on loopback."""
from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(__file__)
if HERE not in sys.path:
    sys.path.insert(0, HERE)


def _port_slice() -> tuple[int, int] | None:
    """This xdist worker's slice of the ports clusters choose in advance
    (neozodb.cli.cluster.PORT_SLICE); None outside xdist."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if not (worker.startswith("gw") and worker[2:].isdigit() and count.isdigit()):
        return None
    return int(worker[2:]) % int(count), int(count)


def pytest_configure(config):
    from neozodb.cli import cluster
    cluster.PORT_SLICE = _port_slice()


def _running(tmp_path, storages: int, replicas: int, partitions: int):
    from neozodb.cli.cluster import LocalCluster
    c = LocalCluster(str(tmp_path / "cluster"), name="test", storages=storages,
                     replicas=replicas, partitions=partitions)
    try:
        c.start(wait=60)
        yield c
    finally:
        c.kill()


@pytest.fixture
def spread_cluster(tmp_path):
    """A running cluster: 2 storages, replicas 0 (each partition on one of
    them), 12 partitions."""
    yield from _running(tmp_path, 2, 0, 12)


@pytest.fixture
def cluster(tmp_path):
    """A running cluster: 1 master, 2 storages (replicas 1), 12 partitions, 1 admin."""
    yield from _running(tmp_path, 2, 1, 12)


@pytest.fixture
def one_storage(tmp_path):
    """A running cluster: 1 master, 1 storage (replicas 0), 4 partitions, 1 admin."""
    yield from _running(tmp_path, 1, 0, 4)


@pytest.fixture(scope="session")
def postgresql_server(tmp_path_factory):
    """One throw-away PostgreSQL server for the session (tests/pgserver.py);
    its ``database(name)`` creates a database and returns its DSN."""
    from pgserver import server_fixture
    yield from server_fixture(tmp_path_factory)
