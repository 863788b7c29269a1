"""ZODB's core storage conformance tests on a cluster whose every
connection (client, storages, master, admin) is TLS with mutual
authentication."""
from __future__ import annotations

import os

import pytest
from ZODB.tests import (
    BasicStorage,
    ConflictResolution,
    HistoryStorage,
    IteratorStorage,
    MTStorage,
    PersistentStorage,
    RevisionStorage,
    StorageTestBase,
    Synchronization,
)

from neozodb.cli.cluster import LocalCluster
from neozodb.client import Storage

pytestmark = pytest.mark.timeout(180)


class TLSStorageTests(
    StorageTestBase.StorageTestBase,
    BasicStorage.BasicStorage,
    Synchronization.SynchronizedStorage,
    MTStorage.MTStorage,
    RevisionStorage.RevisionStorage,
    PersistentStorage.PersistentStorage,
    ConflictResolution.ConflictResolvingStorage,
    HistoryStorage.HistoryStorage,
    IteratorStorage.IteratorStorage,
):
    use_extension_bytes = True

    def setUp(self):
        StorageTestBase.StorageTestBase.setUp(self)
        self.cluster = LocalCluster(os.path.join(os.getcwd(), "cluster"), name="zodb",
                                    storages=2, replicas=1, partitions=12, tls=True)
        self.cluster.start_or_kill(wait=60)
        self.open()

    def open(self, read_only=False):
        self._storage = Storage(read_only=read_only, **self.cluster.client_kwargs())
        assert self._storage.app.tls is not None

    def _new_storage_client(self):
        return Storage(**self.cluster.client_kwargs())

    def tearDown(self):
        try:
            StorageTestBase.StorageTestBase.tearDown(self)
        finally:
            self.cluster.kill()
