"""Read-ahead: once loads miss the client cache on consecutive oids (objects
created together, read in the order they were created), the load that misses
also fetches the next ``read_ahead`` oids in one pipelined round trip.
What is read ahead is cached like any load, so a later commit invalidates it
as usual."""
from __future__ import annotations

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping

from neozodb.client import Storage
from neozodb.client.loads import READ_AHEAD, READ_AHEAD_AFTER
from neozodb.protocol import p64, u64

pytestmark = pytest.mark.timeout(120)
OBJECTS = 100


@pytest.fixture
def created(one_storage):
    """(cluster, oids of OBJECTS mappings created in one transaction, in
    the order of their oids)."""
    db = ZODB.DB(Storage(**one_storage.client_kwargs()))
    try:
        tm = transaction.TransactionManager()
        root = db.open(tm).root()
        root["objs"] = objs = [PersistentMapping(i=i) for i in range(OBJECTS)]
        tm.commit()
        oids = [obj._p_oid for obj in objs]
    finally:
        db.close()
    numbers = [u64(oid) for oid in oids]
    assert numbers == list(range(numbers[0], numbers[0] + OBJECTS)), "not consecutive"
    return one_storage, oids


def _cached(storage, oid: bytes) -> bool:
    app = storage.app
    with app.lock:
        return app.cache.load(oid, p64(u64(app.last_tid) + 1)) is not None


def test_consecutive_misses_read_the_next_objects_ahead(created):
    cluster, oids = created
    storage = Storage(**cluster.client_kwargs())
    try:
        for oid in oids[:READ_AHEAD_AFTER - 1]:
            storage.load(oid)
        assert not _cached(storage, oids[READ_AHEAD_AFTER - 1])
        storage.load(oids[READ_AHEAD_AFTER - 1])  # the third miss in a row
        ahead = oids[READ_AHEAD_AFTER:READ_AHEAD_AFTER + READ_AHEAD]
        assert all(_cached(storage, oid) for oid in ahead)
        assert not _cached(storage, oids[READ_AHEAD_AFTER + READ_AHEAD])
        # every object reads back as written, read ahead or not
        db = ZODB.DB(storage)
        conn = db.open(transaction.TransactionManager())
        assert [conn.get(oid)["i"] for oid in oids] == list(range(OBJECTS))
        db.close()
    finally:
        storage.close()


def test_read_ahead_0_reads_only_what_is_asked(created):
    cluster, oids = created
    storage = Storage(**cluster.client_kwargs(), read_ahead=0)
    try:
        for oid in oids[:10]:
            storage.load(oid)
        assert not _cached(storage, oids[10])
    finally:
        storage.close()


def test_an_object_read_ahead_then_changed_loads_its_new_revision(created):
    cluster, oids = created
    reader = Storage(**cluster.client_kwargs())
    try:
        for oid in oids[:READ_AHEAD_AFTER]:
            reader.load(oid)
        changed = oids[READ_AHEAD_AFTER + 1]
        assert _cached(reader, changed)
        old_data, old_serial = reader.load(changed)
        writer = ZODB.DB(Storage(**cluster.client_kwargs()))
        try:
            tm = transaction.TransactionManager()
            conn = writer.open(tm)
            conn.get(changed)["i"] = "changed"
            tm.commit()
        finally:
            writer.close()
        reader.sync()  # the invalidation is in
        data, serial = reader.load(changed)
        assert serial > old_serial and data != old_data
        assert reader.loadBefore(changed, serial)[:2] == (old_data, old_serial)
    finally:
        reader.close()


def test_a_bad_read_ahead_is_refused(one_storage):
    with pytest.raises(ValueError, match="read_ahead"):
        Storage(**one_storage.client_kwargs(), read_ahead=-1)
