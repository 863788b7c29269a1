"""Checks of received values (protocol/values.py) and of who may claim the
master role (master/identification.py), without processes: what loopback
cluster tests cannot show (another host claiming a listed address)."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from neozodb.master.identification import IdentificationHandler, resolve_masters, same_host
from neozodb.net.connection import HandlerError
from neozodb.protocol import ErrorCodes, NodeTypes, ProtocolError, make_nid
from neozodb.protocol.values import (
    MAX_ID,
    check_address,
    check_compression,
    check_id,
    check_identification,
)

pytestmark = pytest.mark.timeout(10)


def test_ids_fit_in_63_bits():
    assert check_id(MAX_ID.to_bytes(8, "big"), "oid") == MAX_ID
    with pytest.raises(ProtocolError, match="oid 8000000000000000 is out of range"):
        check_id((MAX_ID + 1).to_bytes(8, "big"), "oid")


def test_compression_ids():
    check_compression(0)
    check_compression(1)
    with pytest.raises(ProtocolError, match="compression"):
        check_compression(2)


@pytest.mark.parametrize("address", [(b"h", 0), (b"h", 65536), (b"", 1), (b"a b", 1),
                                     (b"\xc3\xa9", 1), (b"x" * 256, 1)])
def test_bad_addresses(address):
    with pytest.raises(ProtocolError):
        check_address(address)


def test_identification_as_neo_nodes_send_it():
    """What NEO's nodes send passes: a storage with its devpath (str, as
    NEO's msgpack gives), a master without an id, a read-only client, an
    admin monitoring backups."""
    check_identification(NodeTypes.STORAGE, 1, (b"10.0.0.1", 20000), None,
                         {b"devpath": ["host", "2049"]})
    check_identification(NodeTypes.MASTER, None, (b"10.0.0.1", 10000), 1.7e9, {})
    check_identification(NodeTypes.CLIENT, None, None, None, {b"read_only": True})
    check_identification(NodeTypes.ADMIN, None, (b"10.0.0.1", 9999), None,
                         {b"backup": [b"other"]})
    with pytest.raises(ProtocolError, match="not a STORAGE id"):
        check_identification(NodeTypes.STORAGE, make_nid(NodeTypes.ADMIN, 1), None, None, {})


class _Conn(SimpleNamespace):
    pass


def _handler(allowed):
    app = SimpleNamespace(label="M1", allowed_masters=set(allowed))
    return IdentificationHandler(app)


def test_master_claim_must_come_from_its_own_host():
    handler = _handler({("10.0.0.2", 10000)})
    handler._check_master(_Conn(peer="10.0.0.2:41234"), ("10.0.0.2", 10000))
    with pytest.raises(HandlerError) as e:  # a listed address, claimed from elsewhere
        handler._check_master(_Conn(peer="10.6.6.6:41234"), ("10.0.0.2", 10000))
    assert e.value.code is ErrorCodes.PROTOCOL_ERROR
    with pytest.raises(HandlerError, match="not a master of this cluster"):
        handler._check_master(_Conn(peer="10.0.0.3:41234"), ("10.0.0.3", 10000))
    with pytest.raises(HandlerError):
        handler._check_master(_Conn(peer="10.0.0.2:41234"), None)


def test_listed_host_names_match_announced_addresses():
    allowed = asyncio.run(resolve_masters([("localhost", 10000)]))
    assert ("localhost", 10000) in allowed and ("127.0.0.1", 10000) in allowed
    assert same_host("::ffff:127.0.0.1", "127.0.0.1")
    assert same_host("127.0.0.1", "127.0.0.1") and not same_host("127.0.0.1", "127.0.0.2")
