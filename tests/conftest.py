"""Shared test helpers: real local clusters on loopback."""
from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(__file__)
if HERE not in sys.path:
    sys.path.insert(0, HERE)


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
