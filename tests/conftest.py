"""Shared test helpers: real local clusters on loopback."""
from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(__file__)
if HERE not in sys.path:
    sys.path.insert(0, HERE)


@pytest.fixture
def cluster(tmp_path):
    """A running cluster: 1 master, 2 storages (replicas 1), 12 partitions, 1 admin."""
    from neozodb.cli.cluster import LocalCluster
    c = LocalCluster(str(tmp_path / "cluster"), name="test", storages=2, replicas=1, partitions=12)
    try:
        c.start(wait=60)
        yield c
    finally:
        c.kill()
