"""ZODB's reusable blob suite (``ZODB.tests.testblob.storage_reusable_suite``:
the blob_connection, blob_importexport, blob_transaction and blob_packing
doctests, the module's own doctests, blob undo and blob recovery) against
real clusters: 2 storages, replicas 1, each ``create_storage(name)`` a
cluster of its own in the test's directory, one test per pytest item."""
from __future__ import annotations

import os
import unittest

import pytest
from ZODB.tests import testblob

from neozodb.cli.cluster import LocalCluster
from neozodb.client import Storage

pytestmark = pytest.mark.timeout(240)

_clusters: dict[str, LocalCluster] = {}
# where the clusters of the running test live: not in the test's own
# directory, which its tearDown removes with the nodes' logs
_home: list[str] = []


def _factory(name: str, blob_dir: str) -> Storage:
    """A client with ``blob_dir`` of the cluster ``name`` in the running
    test's home, started on first use."""
    directory = os.path.join(_home[0], name + ".cluster")
    cluster = _clusters.get(directory)
    if cluster is None:
        cluster = LocalCluster(directory, name="blobs", storages=2, replicas=1,
                               partitions=4).start_or_kill()
        _clusters[directory] = cluster
    return Storage(blob_dir=os.path.abspath(blob_dir), **cluster.client_kwargs())


def _tests(suite) -> list:
    found = []
    for test in suite:
        if isinstance(test, unittest.TestSuite):
            found += _tests(test)
        else:
            found.append(test)
    return found


SUITE = testblob.storage_reusable_suite("NEO", _factory, test_blob_storage_recovery=True,
                                         test_packing=True, test_undo=True)
TESTS = _tests(SUITE)

# blob_packing.txt packs at times it reads from the clock and the master
# gives TIDs from its own, real one: the suite's fake clock (a second more
# at each call, in this process only) would pack after every revision
_REAL_CLOCK = {"blob_packing_txt"}
# as root, a read-only file opens for writing all the same
_ROOT_ONLY_FAILS = "open(blob.committed(), 'w')"
# blob_packing.txt's last check wants the directory of a deleted object's
# revisions gone; the client's cache, in ZEO's layout, shares a directory
# between the oids equal modulo 997 and keeps it (its lock file lives there)
_SHARED_DIRECTORY = "os.path.exists(os.path.split(fns[0])[0])"


def _filtered(test):
    """``test``, without the examples that cannot apply here."""
    dt = getattr(test, "_dt_test", None)
    if dt is not None:
        dt.examples = [e for e in dt.examples if _SHARED_DIRECTORY not in e.source
                       and not (os.geteuid() == 0 and _ROOT_ONLY_FAILS in e.source)]
    return test


def _warnings(cluster: LocalCluster) -> str:
    """The warnings, errors and aborts the nodes of ``cluster`` logged."""
    lines = []
    for node in cluster.nodes.values():
        with open(node.logfile, errors="replace") as f:
            lines += [line for line in f
                      if " WARNING " in line or " ERROR " in line or "abort" in line]
    return "%s:\n%s" % (cluster.directory, "".join(lines[-200:]))


@pytest.mark.parametrize("test", TESTS, ids=[t.id().rsplit("/", 1)[-1] for t in TESTS])
def test_zodb_blob_suite(test, tmp_path):
    _home[:] = [str(tmp_path)]
    name = test.id().rsplit("/", 1)[-1]
    test = _filtered(test)
    layer = SUITE.layer
    result = unittest.TestResult()
    real_clock = name in _REAL_CLOCK
    if not real_clock:
        layer.testSetUp()
    try:
        try:
            test(result)
        finally:
            for cluster in _clusters.values():
                cluster.stop()
        problems = [text for _, text in result.errors + result.failures]
        if problems:  # the nodes' side, before the layer removes their logs
            problems += [_warnings(cluster) for cluster in _clusters.values()]
    finally:
        _clusters.clear()
        if not real_clock:
            layer.testTearDown()
    assert not problems, "\n".join(problems)
    assert result.testsRun == 1
