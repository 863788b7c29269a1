"""First contact: each node kind run by NEO beside neozodb ones."""
from __future__ import annotations

import pytest
from neopeer import MixedCluster

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("neo", [("M1",), ("S2",), ("A1",), ("M1", "S1", "S2", "A1")])
def test_cluster_runs(tmp_path, neo):
    c = MixedCluster(str(tmp_path / "c"), neo=neo, name="mix", storages=2, replicas=1,
                     partitions=4)
    try:
        c.start(wait=60)
        out = c.neo_neoctl("print", "cluster")
        assert (out.returncode, out.stdout.strip()) == (0, "RUNNING"), out.stderr
    finally:
        c.kill()
