"""Values out of range are refused before they touch any state, and a
failing request releases what it took."""
from __future__ import annotations

import hashlib

import pytest
from rawpeer import Client, commit_one, huge, load

from neozodb.net.endpoint import RemoteError
from neozodb.protocol import ErrorCodes, Packets, u64

pytestmark = pytest.mark.timeout(180)


def test_store_with_out_of_range_serial_leaves_no_lock(cluster):
    """Before: the lock was taken, then the backend failed on the
    back-pointer (OverflowError): the connection closed and the object
    stayed locked until the storage restarted (every later store of it
    waited forever)."""
    oid, serial = commit_one(cluster, b"v1")
    hostile = Client(cluster)
    try:
        ttid = hostile.begin()
        nid = hostile.cells(oid)[0]
        with pytest.raises(RemoteError) as e:
            # the right serial: the lock is granted (a wrong one is a conflict)
            hostile.conn(nid).call(Packets.AskStoreObject, oid, serial, 0,
                                   hashlib.sha1(b"x").digest(), b"x", huge(), ttid, timeout=10)
        assert e.value.code is ErrorCodes.PROTOCOL_ERROR
        assert "out of range" in e.value.message
        hostile.master.notify(Packets.AbortTransaction, ttid, [])
    finally:
        hostile.close()
    commit_one(cluster, b"v2", oid)  # would wait for the lock forever
    assert load(cluster, oid) == b"v2"


@pytest.mark.parametrize("field", ["oid", "serial", "ttid"])
def test_store_of_ids_beyond_63_bits_is_a_protocol_error(cluster, field):
    client = Client(cluster)
    try:
        ttid = client.begin()
        oid = client.new_oid()
        args = {"oid": oid, "serial": bytes(8), "ttid": ttid}
        args[field] = huge()
        nid = client.cells(oid)[0]
        conn = client.conn(nid)
        with pytest.raises(RemoteError) as e:
            conn.call(Packets.AskStoreObject, args["oid"], args["serial"], 0,
                      hashlib.sha1(b"x").digest(), b"x", None, args["ttid"], timeout=10)
        assert e.value.code is ErrorCodes.PROTOCOL_ERROR and field in e.value.message
    finally:
        client.close()
    oid, _ = commit_one(cluster, b"still fine")
    assert load(cluster, oid) == b"still fine"


def test_unknown_compression_is_refused(cluster):
    """Before: stored as given, and then nobody could load the object."""
    client = Client(cluster)
    try:
        ttid = client.begin()
        oid = client.new_oid()
        with pytest.raises(RemoteError) as e:
            client.store(ttid, oid, b"zzz", compression=7)
        assert e.value.code is ErrorCodes.PROTOCOL_ERROR and "compression" in e.value.message
    finally:
        client.close()
    commit_one(cluster, b"readable", oid)
    assert load(cluster, oid) == b"readable"


def test_finish_with_oid_beyond_63_bits_is_refused(cluster):
    """Before: the master took it as the greatest OID given, and the next
    AskNewOIDs could not be answered."""
    client = Client(cluster)
    try:
        ttid = client.begin()
        with pytest.raises(RemoteError) as e:
            client.finish(ttid, [huge(0x80)])
        assert e.value.code is ErrorCodes.PROTOCOL_ERROR
    finally:
        client.close()
    client = Client(cluster)
    try:
        (oids,) = client.master.call(Packets.AskNewOIDs, 1, timeout=10)
        assert u64(oids[0]) < 1 << 32
    finally:
        client.close()
