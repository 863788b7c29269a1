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


def _factory(name: str, blob_dir: str) -> Storage:
    """A client with ``blob_dir`` of the cluster ``name`` in the current
    directory (the test's), started on first use."""
    directory = os.path.abspath(name + ".cluster")
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

# blob_packing.txt looks for the revisions' files in a server-side blob
# directory (``fshelper``), with pack times from the test's fake clock:
# tests/cluster/test_blobs.py checks what a pack leaves on the storages
_SKIPPED = {"blob_packing_txt": "needs a server-side blob directory (fshelper)"}
# as root, a read-only file opens for writing all the same
_ROOT_ONLY_FAILS = "open(blob.committed(), 'w')"


def _filtered(test):
    """``test``, without the examples that cannot pass as root."""
    dt = getattr(test, "_dt_test", None)
    if dt is not None and os.geteuid() == 0:
        dt.examples = [e for e in dt.examples if _ROOT_ONLY_FAILS not in e.source]
    return test


@pytest.mark.parametrize("test", TESTS, ids=[t.id().rsplit("/", 1)[-1] for t in TESTS])
def test_zodb_blob_suite(test):
    name = test.id().rsplit("/", 1)[-1]
    if name in _SKIPPED:
        pytest.skip(_SKIPPED[name])
    test = _filtered(test)
    layer = SUITE.layer
    result = unittest.TestResult()
    layer.testSetUp()
    try:
        test(result)
    finally:
        layer.testTearDown()
        for cluster in _clusters.values():
            cluster.stop()
        _clusters.clear()
    problems = result.errors + result.failures
    assert not problems, "\n".join(text for _, text in problems)
    assert result.testsRun == 1
