"""ZODB's storage conformance mixins run through NEO's client
(``neo.client.Storage``) against a cluster started for each test.

Not collected by the interop suite (no ``test_`` prefix):
test_conformance_neo_client.py runs this file with pytest in a subprocess
whose ``PYTHONPATH`` has NEO's source, because importing NEO's client
patches ZODB.  ``NEO_CLIENT_SUITE_CLUSTER`` says which cluster it talks to:
``neo`` (every node NEO's) or ``neozodb`` (every node ours); 2 storages,
replicas 1.  What is left out, and why, is said in
test_conformance_neo_client.py's docstring.
"""
from __future__ import annotations

import os
import unittest

# NEO's client first: it patches ZODB's Connection when imported
import neo.client  # noqa: F401  isort: skip
import pytest
from neo.client.app import TXN_PACK_DESC
from neo.client.app import Application as NEOApplication
from neo.client.Storage import Storage
from neopeer import MixedCluster, load_conformance
from ZODB.tests import (
    BasicStorage,
    ConflictResolution,
    HistoryStorage,
    IteratorStorage,
    MTStorage,
    PackableStorage,
    PersistentStorage,
    ReadOnlyStorage,
    RevisionStorage,
    StorageTestBase,
    Synchronization,
    TransactionalUndoStorage,
)

KIND = os.environ.get("NEO_CLIENT_SUITE_CLUSTER", "neozodb")
if KIND not in ("neo", "neozodb"):
    raise RuntimeError("NEO_CLIENT_SUITE_CLUSTER must be 'neo' or 'neozodb', not %r" % KIND)
NEO_NODES = ("M1", "S1", "S2", "A1") if KIND == "neo" else ()

pytestmark = pytest.mark.timeout(120)

# The ZODB tests expect pack() to return once the storages applied it, and
# an undo log without the transactions that carry pack orders (NEO's own
# tests set the same two things on the client).
NEOApplication.wait_for_pack = True
_undo_log = NEOApplication.undoLog


def _undo_log_without_packs(self, *args, **kw):
    return [t for t in _undo_log(self, *args, **kw) if t["description"] != TXN_PACK_DESC]


NEOApplication.undoLog = _undo_log_without_packs


def start_cluster(directory: str, name: str) -> MixedCluster:
    return MixedCluster(directory, neo=NEO_NODES, name=name, storages=2, replicas=1,
                        partitions=12).start_or_kill()


def client(cluster: MixedCluster, **kw) -> Storage:
    return Storage(master_nodes=cluster.masters, name=cluster.name, **kw)


def _not_for_neo_client(reason: str):
    # skipped before setUp: no cluster is started for it
    return unittest.skip(reason)(lambda self: None)


NO_GC = "NEO's client packs without garbage collection (referencesf is ignored)"
NO_RESTORE = "NEO's client has no restore() (it does not provide IStorageRestoreable)"


class NEOClientStorageTests(
    StorageTestBase.StorageTestBase,
    BasicStorage.BasicStorage,
    Synchronization.SynchronizedStorage,
    MTStorage.MTStorage,
    RevisionStorage.RevisionStorage,
    PersistentStorage.PersistentStorage,
    ReadOnlyStorage.ReadOnlyStorage,
    ConflictResolution.ConflictResolvingStorage,
    HistoryStorage.HistoryStorage,
    IteratorStorage.IteratorStorage,
    IteratorStorage.ExtendedIteratorStorage,
    TransactionalUndoStorage.TransactionalUndoStorage,
    ConflictResolution.ConflictResolvingTransUndoStorage,
    PackableStorage.PackableStorageWithOptionalGC,
    PackableStorage.PackableUndoStorage,
):
    def setUp(self):
        StorageTestBase.StorageTestBase.setUp(self)
        self.cluster = start_cluster(os.path.join(os.getcwd(), "cluster"), "zodb")
        self.open()

    def open(self, read_only=False):
        self._storage = client(self.cluster, read_only=read_only)

    def _new_storage_client(self):
        return client(self.cluster)

    def tearDown(self):
        try:
            StorageTestBase.StorageTestBase.tearDown(self)
        finally:
            self.cluster.kill()

    test_tid_ordering_w_commit = _not_for_neo_client(
        "lastTransaction() need not block during tpc_finish (ZODB PR #316)")
    test_race_external_invalidate_vs_disconnect = _not_for_neo_client(
        "long test: 64 workers opening 12 NEO clients each do not end within 120 s")


class NEOClientRecoveryTests(load_conformance().NEORecoveryTests):
    """copyTransactionsFrom (NEO's client imports with tpc_begin(tid) and
    store) from one cluster into a second, empty one of the same kind."""

    def _client(self, cluster):
        return client(cluster)

    def _start(self, directory, name):
        return start_cluster(directory, name)

    testRestoreAcrossPack = _not_for_neo_client(NO_RESTORE)
    testPackWithGCOnDestinationAfterRestore = _not_for_neo_client(NO_GC)
