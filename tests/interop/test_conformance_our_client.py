"""neozodb's client on a NEO cluster: the ZODB conformance suite of
tests/zodb/test_conformance.py (the same classes, racetest included through
BasicStorage), with every server node NEO's (master, 2 storages with
replicas 1, admin)."""
from __future__ import annotations

import os

import pytest
import ZODB.tests.util
from neopeer import MixedCluster, load_conformance

pytestmark = pytest.mark.timeout(240)

ALL_NEO = ("M1", "S1", "S2", "A1")


conformance = load_conformance()


def start_neo_cluster(directory: str, name: str) -> MixedCluster:
    return MixedCluster(directory, neo=ALL_NEO, name=name, storages=2, replicas=1,
                        partitions=12).start_or_kill()


class KillFirst:
    """NEO's nodes write their logs until killed: kill them before the
    test's directory is removed."""

    def clusters_to_kill(self):
        return self.clusters

    def tearDown(self):
        try:
            self._close()
        finally:
            for cluster in self.clusters_to_kill():
                cluster.kill()
        ZODB.tests.util.TestCase.tearDown(self)


class OurClientOnNEOTests(KillFirst, conformance.NEOStorageTests):
    def setUp(self):
        conformance.StorageTestBase.StorageTestBase.setUp(self)
        self.cluster = start_neo_cluster(os.path.join(os.getcwd(), "cluster"), "zodb")
        self.open()

    def clusters_to_kill(self):
        return [self.cluster]


class OurClientOnNEORecoveryTests(KillFirst, conformance.NEORecoveryTests):
    def _start(self, directory, name):
        return start_neo_cluster(directory, name)


class OurClientOnNEOToFileStorageRecoveryTests(KillFirst,
                                               conformance.NEOToFileStorageRecoveryTests):
    _start = OurClientOnNEORecoveryTests._start


def test_external_gc_doctest(tmp_path):
    conformance.run_external_gc_doctest(start_neo_cluster(str(tmp_path / "cluster"), "zodb"),
                                        blobs=False)
