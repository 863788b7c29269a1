"""ZODB's own storage conformance mixins, run against a real cluster
(separate master, storage and admin processes) for every test."""
from __future__ import annotations

import doctest
import os

import pytest
import ZODB.tests
import ZODB.tests.util
from ZODB.FileStorage import FileStorage
from ZODB.tests import (
    BasicStorage,
    ConflictResolution,
    HistoryStorage,
    IteratorStorage,
    MTStorage,
    PackableStorage,
    PersistentStorage,
    ReadOnlyStorage,
    RecoveryStorage,
    RevisionStorage,
    StorageTestBase,
    Synchronization,
    TransactionalUndoStorage,
)

from neozodb.cli.cluster import LocalCluster
from neozodb.client import Storage

pytestmark = pytest.mark.timeout(180)


class NEOStorageTests(
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
    # the extension is kept as the bytes the committer pickled
    use_extension_bytes = True

    def setUp(self):
        StorageTestBase.StorageTestBase.setUp(self)
        self.cluster = LocalCluster(os.path.join(os.getcwd(), "cluster"), name="zodb",
                                    storages=2, replicas=1, partitions=12)
        try:
            self.cluster.start(wait=60)
        except BaseException:
            self.cluster.kill()
            raise
        self.open()

    def open(self, read_only=False):
        self._storage = Storage(self.cluster.masters, self.cluster.name, read_only=read_only)

    def _new_storage_client(self):
        return Storage(self.cluster.masters, self.cluster.name)

    def testPackUndoLog(self):
        pytest.skip("fakes time.time() in the test process only (ahead of the real clock by"
                    " 0.1 s per call): its pack time falls after the TIDs the master gives"
                    " from its own clock; tests/cluster/test_pack.py checks the undo log"
                    " after a pack instead")

    def tearDown(self):
        try:
            StorageTestBase.StorageTestBase.tearDown(self)
        finally:
            self.cluster.kill()


class FeaturelessClientPackTests(
    StorageTestBase.StorageTestBase,
    PackableStorage.PackableStorageWithOptionalGC,
    PackableStorage.PackableUndoStorage,
):
    """ZODB's pack tests with a client that announces no feature: the
    master does not offer it GC orders (as NEO's), so the client collects
    garbage by deletions (client/pack.py, delete_garbage)."""

    setUp = NEOStorageTests.setUp
    tearDown = NEOStorageTests.tearDown
    testPackUndoLog = NEOStorageTests.testPackUndoLog

    def open(self, read_only=False):
        self._storage = Storage(self.cluster.masters, self.cluster.name, read_only=read_only,
                                features=False)


def start_cluster(directory: str, name: str) -> LocalCluster:
    return LocalCluster(directory, name=name, storages=2, replicas=1,
                        partitions=12).start_or_kill()


class NEORecoveryTests(StorageTestBase.StorageTestBase, RecoveryStorage.RecoveryStorage):
    """copyTransactionsFrom (tpc_begin with the source's TIDs, restore)
    from a cluster (self._storage) into a second, empty one (self._dst),
    then ZODB's deep comparison of both iterators (as NEO does it)."""

    def setUp(self):
        StorageTestBase.StorageTestBase.setUp(self)
        self.clusters = []
        self._dst = None
        source = self._cluster("source", "zodb")
        destination = self._cluster("destination", "zodb-copy")
        self._storage = self._client(source)
        self._dst = self._client(destination)

    # what subclasses change: the client (NEO's, tests/interop) and the
    # cluster (NEO's nodes)
    def _client(self, cluster):
        return Storage(cluster.masters, cluster.name)

    def _start(self, directory: str, name: str):
        return start_cluster(directory, name)

    def _cluster(self, directory, name):
        cluster = self._start(os.path.join(os.getcwd(), directory), name)
        self.clusters.append(cluster)
        return cluster

    def _close(self):
        try:
            StorageTestBase.StorageTestBase._close(self)
        finally:
            if self._dst is not None:
                self._dst.close()

    def tearDown(self):
        try:
            StorageTestBase.StorageTestBase.tearDown(self)
        finally:
            for cluster in self.clusters:
                cluster.kill()


class NEOToFileStorageRecoveryTests(NEORecoveryTests):
    """The same copies from a cluster into a FileStorage: what the cluster's
    iterator gives (records, back-pointers) is what FileStorage.restore
    accepts, the destination can be packed."""

    def setUp(self):
        StorageTestBase.StorageTestBase.setUp(self)
        self.clusters = []
        self._dst = None
        source = self._cluster("source", "zodb")
        self._storage = self._client(source)
        self._dst = FileStorage("Dest.fs", create=True)

    # the destination is a FileStorage: these run
    testRestoreAcrossPack = RecoveryStorage.RecoveryStorage.testRestoreAcrossPack
    testPackWithGCOnDestinationAfterRestore = (
        RecoveryStorage.RecoveryStorage.testPackWithGCOnDestinationAfterRestore)


# ZODB's IExternalGC doctest (PackableStorage.IExternalGC_suite) runs
# whole, its two packs and object counts included, on a client with
# pack_gc=False (the doctest's storage "is configured not to gc on pack")
# and a blob-dir.  On NEO's storages (tests/interop), which keep no blobs,
# the blob it creates as root()[1] is an ordinary persistent object (so
# every count and every other example is unchanged), and the two examples
# that read it with loadBlob are left out.
_BLOB = "ZODB.blob.Blob(b'some data')"


def _external_gc_examples(blobs: bool = True):
    path = os.path.join(os.path.dirname(ZODB.tests.__file__), "IExternalGC.test")
    with open(path) as f:
        text = f.read()
    examples = doctest.DocTestParser().get_examples(text, path)
    if blobs:
        return path, examples, len(examples)
    kept = []
    for example in examples:
        if "loadBlob" in example.source:
            continue
        example.source = example.source.replace(_BLOB, "conn.root().__class__()")
        kept.append(example)
    return path, kept, len(examples)


def test_external_gc_doctest(tmp_path):
    run_external_gc_doctest(start_cluster(str(tmp_path / "cluster"), "zodb"))


def run_external_gc_doctest(cluster: LocalCluster, blobs: bool = True) -> None:
    """The IExternalGC doctest against a running ``cluster``, which is
    killed at the end; without ``blobs`` (NEO's storages), filtered."""
    path, examples, total = _external_gc_examples(blobs)
    assert len(examples) == total - (0 if blobs else 2)  # the two loadBlob examples
    assert any(_BLOB in e.source for e in doctest.DocTestParser().get_examples(
        open(path).read(), path))  # the blob replaced is ZODB's text
    try:
        blob_dir = {"blob_dir": os.path.join(cluster.directory, "blobs")} if blobs else {}
        globs = {"create_storage": lambda: Storage(cluster.masters, cluster.name,
                                                   pack_gc=False, **blob_dir)}
        test = doctest.DocTest(examples, globs, "IExternalGC.test", path, 0, None)
        ZODB.tests.util.setUp(test)
        try:
            runner = doctest.DocTestRunner(checker=ZODB.tests.util.checker,
                                           optionflags=doctest.ELLIPSIS)
            runner.run(test)
        finally:
            ZODB.tests.util.tearDown(test)
        result = runner.summarize(verbose=False)
        assert result.failed == 0, "%d of %d examples failed" % (result.failed, result.attempted)
        assert result.attempted == len(examples)
    finally:
        cluster.kill()
