"""ZODB's storage conformance suite (test_conformance.NEOStorageTests) on a
cluster whose two storages run the MariaDB backend, on one throw-away
MariaDB server.  About 6 minutes on 2 cores (a cluster per test): run
with NEOZODB_ZODB_MARIADB=1 (last run: 88 passed, 1 skipped)."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

import pytest

if os.environ.get("NEOZODB_ZODB_MARIADB") != "1":
    pytest.skip("ZODB's suite on MariaDB storages: set NEOZODB_ZODB_MARIADB=1",
                allow_module_level=True)
pytest.importorskip("mariadb")
if not os.path.exists("/usr/sbin/mariadbd") and not shutil.which("mariadbd"):
    pytest.skip("no MariaDB server here", allow_module_level=True)

import test_conformance as base  # noqa: E402  (tests/zodb is on sys.path: rootdir conftest)

from neozodb.cli.cluster import LocalCluster  # noqa: E402
from neozodb.throwaway import mariadb  # noqa: E402

pytestmark = pytest.mark.timeout(120)

SERVER = None


def setUpModule():
    global SERVER, _DIRECTORY
    _DIRECTORY = tempfile.mkdtemp(prefix="neozodb-zodb-mariadb-")
    SERVER = mariadb.start(_DIRECTORY)


def tearDownModule():
    SERVER.stop()
    shutil.rmtree(_DIRECTORY, ignore_errors=True)


class MariaDBStorageTests(base.NEOStorageTests):

    def setUp(self):
        base.StorageTestBase.StorageTestBase.setUp(self)
        # StorageTestBase runs each test in a new directory: one pair of
        # databases per test
        name = "z" + hashlib.sha1(os.getcwd().encode()).hexdigest()[:12]
        self.cluster = LocalCluster(os.path.join(os.getcwd(), "cluster"), name="zodb",
                                    storages=2, replicas=1, partitions=12, adapter="MariaDB",
                                    databases=lambda i: SERVER.database("%s_%d" % (name, i)))
        try:
            self.cluster.start(wait=60)
        except BaseException:
            self.cluster.kill()
            raise
        self.open()
