"""neozodb's client on a NEO cluster: the ZODB conformance suite of
tests/zodb/test_conformance.py (the same classes, racetest included through
BasicStorage), with every server node NEO's (master, 2 storages with
replicas 1, admin)."""
from __future__ import annotations

import importlib.util
import os

import pytest
import ZODB.tests.util
from neopeer import MixedCluster

pytestmark = pytest.mark.timeout(240)

ALL_NEO = ("M1", "S1", "S2", "A1")


def _load_conformance():
    # by path, under its own name: importing the classes by name here would
    # make pytest collect (and run) the neozodb-cluster versions again
    path = os.path.join(os.path.dirname(__file__), os.pardir, "zodb", "test_conformance.py")
    spec = importlib.util.spec_from_file_location("neozodb_zodb_conformance", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


conformance = _load_conformance()


def start_neo_cluster(directory: str, name: str) -> MixedCluster:
    cluster = MixedCluster(directory, neo=ALL_NEO, name=name, storages=2, replicas=1,
                           partitions=12)
    try:
        cluster.start(wait=60)
    except BaseException:
        cluster.kill()
        raise
    return cluster


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
    def _cluster(self, directory, name):
        cluster = start_neo_cluster(os.path.join(os.getcwd(), directory), name)
        self.clusters.append(cluster)
        return cluster


class OurClientOnNEOToFileStorageRecoveryTests(KillFirst,
                                               conformance.NEOToFileStorageRecoveryTests):
    _cluster = OurClientOnNEORecoveryTests._cluster


def test_external_gc_doctest(tmp_path):
    conformance.run_external_gc_doctest(start_neo_cluster(str(tmp_path / "cluster"), "zodb"))
