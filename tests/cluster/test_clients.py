"""Two client processes against a real cluster: visibility of commits,
conflict resolution and conflicts, over real TCP."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import transaction
import ZODB
from BTrees.Length import Length
from persistent.mapping import PersistentMapping
from ZODB.POSException import ConflictError

from neozodb.client import Storage
from neozodb.protocol import p64, u64

pytestmark = pytest.mark.timeout(120)


def run_client(cluster, code: str) -> str:
    """Run code in a separate client process; return its stdout."""
    prelude = textwrap.dedent(f"""
        import transaction, ZODB
        from neozodb.client import Storage
        db = ZODB.DB(Storage({cluster.masters!r}, {cluster.name!r}))
        conn = db.open()
        root = conn.root()
    """)
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code) + "\ndb.close()\n"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_other_process_sees_commit_after_begin(cluster):
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        root = conn.root()
        root["counter"] = 1
        tm.commit()
        run_client(cluster, "root['counter'] = 2\nroot['new'] = 'from another process'\n"
                            "transaction.commit()\n")
        tm.begin()
        assert root["counter"] == 2
        assert root["new"] == "from another process"
        out = run_client(cluster, "print(root['counter'], root['new'])")
        assert out.split() == ["2", "from", "another", "process"]
    finally:
        db.close()


def test_concurrent_length_update_resolves_and_plain_object_conflicts(cluster):
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        root = conn.root()
        root["length"] = Length(10)
        root["plain"] = PersistentMapping(value=0)
        tm.commit()
        # both sides read the current state, then the other process commits
        root["length"].change(1)
        root["plain"]["value"] = 1
        run_client(cluster, "root['length'].change(5)\nroot['plain']['value'] = 5\n"
                            "transaction.commit()\n")
        # the Length conflict resolves; the plain mapping cannot
        with pytest.raises(ConflictError):
            tm.commit()
        tm.abort()
        tm.begin()
        assert root["plain"]["value"] == 5
        assert root["length"]() == 15
        root["length"].change(1)
        run_client(cluster, "root['length'].change(100)\ntransaction.commit()\n")
        tm.commit()  # resolved by BTrees.Length's _p_resolveConflict
        out = run_client(cluster, "print(root['length']())")
        assert out.strip() == "116"
    finally:
        db.close()


def test_read_only_client_refuses_writes(cluster):
    from ZODB.POSException import ReadOnlyError
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    conn = db.open()
    conn.root()["x"] = 1
    transaction.commit()
    db.close()
    storage = Storage(cluster.masters, cluster.name, read_only=True)
    try:
        assert storage.isReadOnly()
        with pytest.raises(ReadOnlyError):
            storage.new_oid()
        db = ZODB.DB(storage)
        conn = db.open()
        assert conn.root()["x"] == 1
        conn.root()["x"] = 2
        with pytest.raises(ReadOnlyError):
            transaction.commit()
        transaction.abort()
    finally:
        storage.close()


def test_zodburi_and_zconfig_open_the_cluster(cluster):
    import zodburi
    from ZODB.config import databaseFromString
    factory, dbkw = zodburi.resolve_uri("neo://%s@%s?cache_size=1MB" % (cluster.name, cluster.masters))
    db = ZODB.DB(factory(), **dbkw)
    try:
        conn = db.open()
        conn.root()["via"] = "uri"
        transaction.commit()
    finally:
        db.close()
    db = databaseFromString(f"""
        %import neozodb
        <zodb>
          <NEOStorage>
            master_nodes {cluster.masters}
            name {cluster.name}
          </NEOStorage>
        </zodb>
    """)
    try:
        assert db.open().root()["via"] == "uri"
    finally:
        db.close()


def test_prefetch_warms_the_cache_in_one_round(cluster):
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    try:
        conn = db.open()
        root = conn.root()
        for i in range(30):
            root["o%d" % i] = PersistentMapping(i=i)
        transaction.commit()
        oids = [root["o%d" % i]._p_oid for i in range(30)]
    finally:
        db.close()
    storage = Storage(cluster.masters, cluster.name)
    try:
        app = storage.app
        before = p64(u64(storage.lastTransaction()) + 1)
        assert all(app.cache.load(oid, before) is None for oid in oids)
        storage.prefetch(oids + [p64(10 ** 6)], before)  # an unknown oid is ignored
        assert all(app.cache.load(oid, before) is not None for oid in oids)
        misses = app.cache.misses
        for oid in oids:
            storage.loadBefore(oid, before)
        assert app.cache.misses == misses  # every load was a cache hit
    finally:
        storage.close()


def test_storage_refusing_identification_is_unreachable(cluster):
    """A storage that refuses the client at identification (NOT_READY from
    one back from a disconnection, not operational yet) is unreachable for
    now, like a dead one: the commit and load paths then use other cells
    or report it at vote, instead of failing with the refusal."""
    from neozodb.net.endpoint import ConnectionClosed
    from neozodb.protocol import NodeTypes
    st = Storage(master_nodes=cluster.masters, name=cluster.name)
    app = st.app
    nid = min(n.nid for n in app.nm if n.type is NodeTypes.STORAGE)
    node = app.nm.get(nid)
    real = node.address
    try:
        app.drop_storage(nid)
        node.address = cluster.admin_address  # refuses anything but neoctl
        with pytest.raises(ConnectionClosed, match="refused us"):
            app.storage_conn(nid)
    finally:
        node.address = real
        st.close()


def test_a_connection_left_on_a_closed_database_does_not_fail_the_others(one_storage):
    """ZODB syncs every connection registered with a transaction manager
    when a transaction begins, those of closed databases too: a closed
    storage's sync does nothing (found when a test left one behind in the
    thread's manager and the next test's ``conn.sync()`` raised "storage
    closed")."""
    tm = transaction.TransactionManager()
    storage = Storage(**one_storage.client_kwargs())
    left = ZODB.DB(storage)
    left.open(tm).root()  # never closed: stays registered with tm
    storage.close()  # as a test's cleanup that closes the storage, not the DB
    db = ZODB.DB(Storage(**one_storage.client_kwargs()))
    try:
        conn = db.open(tm)
        conn.root()["x"] = 1
        tm.commit()
        conn.sync()
        assert conn.root()["x"] == 1
    finally:
        db.close()
