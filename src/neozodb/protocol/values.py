"""Checks of values received from the network, beyond their wire type.

The catalogue's signatures say that an OID is 8 bytes and a port an int;
what a node may *accept* is narrower: identifiers fit in 63 bits (the
backends store them as signed 64-bit integers, NEO's MAX_TID is 2**63-1),
a port is 1..65535, an identification's NID belongs to the namespace of
the node type it claims.  Every check here raises ``ProtocolError`` with a
reason that names the offending value, so that the caller's connection
closes with that reason logged, before any state is touched.  Pure: no
I/O, imports only the protocol package.
"""
from __future__ import annotations

from typing import Any

from .catalogue import ProtocolError
from .enums import NodeTypes, nid_str, nid_type

# greatest OID or TID a node accepts (NEO's MAX_TID)
MAX_ID = (1 << 63) - 1
# compression ids of stored records: none, zlib (what NEO's clients write)
COMPRESSIONS = frozenset((0, 1))
# One answer to a listing request holds at most this many items: a client
# may ask for more, it gets at most this (and asks again, as iterations
# and the undo log do page by page).  NEO's own clients ask for 1000 at most.
LIST_CAP = 10000

_MAX_HOST = 255  # longest DNS name

# extra keys of RequestIdentification and the types their values may have
# (neo-architecture.md 3.2, protocol/features.py); others are ignored
_EXTRA_TYPES: dict[bytes, tuple[type, ...]] = {
    b"devpath": (list, tuple),
    b"new_nid": (list, tuple),
    b"read_only": (bool,),
    b"backup": (bytes, str, list, tuple),
    b"neozodb": (list, tuple),
}


def check_id(value: bytes, what: str) -> int:
    """The integer of an 8-byte OID/TID, refused beyond 63 bits (or
    missing: some signatures allow None where a request needs an id)."""
    if type(value) is not bytes or len(value) != 8:
        raise ProtocolError("%s missing" % what)
    n = int.from_bytes(value, "big")
    if n > MAX_ID:
        raise ProtocolError("%s %s is out of range (more than 63 bits)" % (what, value.hex()))
    return n


def check_ids(values, what: str) -> None:
    # the many oids of a commit: check_id is called only to refuse one
    for value in values:
        if type(value) is not bytes or len(value) != 8 or value[0] & 0x80:
            check_id(value, what)


def check_request_ids(packet_name: str, args: tuple) -> None:
    """Every OID/TID of a request (an 8-byte argument, or one in a list
    argument) within 63 bits: the backends store them as signed 64-bit
    integers, and a request is refused before it reaches them."""
    # on every read request: only the top bit is looked at, and the
    # message is made only for a refusal
    for arg in args:
        kind = type(arg)
        if kind is bytes:
            if len(arg) == 8 and arg[0] & 0x80:
                check_id(arg, "id in %s" % packet_name)
        elif kind is list or kind is tuple:
            for item in arg:
                if type(item) is bytes and len(item) == 8 and item[0] & 0x80:
                    check_id(item, "id in %s" % packet_name)


def check_compression(compression: int) -> None:
    if compression not in COMPRESSIONS:
        raise ProtocolError("unknown compression id %r" % compression)


def check_address(address: Any) -> tuple[str, int] | None:
    """A (host, port) from the wire, decoded; None stays None."""
    if address is None:
        return None
    host, port = address
    if not 0 < len(host) <= _MAX_HOST:
        raise ProtocolError("invalid host in address")
    try:
        text = host.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("invalid host in address: not ASCII") from None
    if not text.isprintable() or " " in text:
        raise ProtocolError("invalid host in address %r" % text)
    if not 0 < port <= 0xFFFF:
        raise ProtocolError("invalid port %r in address" % port)
    return text, port


def check_nid(node_type: NodeTypes, nid: int | None) -> None:
    """A proposed NID must be one of the namespace of the claimed type."""
    if nid is None:
        return
    try:
        kind = nid_type(nid)
    except ValueError:
        raise ProtocolError("invalid node id %r" % nid) from None
    if kind is not node_type or not -(1 << 31) <= nid < (1 << 31):
        raise ProtocolError("node id %s is not a %s id" % (nid_str(nid), node_type.name))


def check_extra(extra: dict) -> None:
    for key, types in _EXTRA_TYPES.items():
        value = extra.get(key)
        if value is not None and not isinstance(value, types):
            raise ProtocolError("invalid %r in identification" % key.decode())
    devpath = extra.get(b"devpath")
    if devpath is not None and (len(devpath) > 16 or not all(
            isinstance(p, (bytes, str, int)) and not isinstance(p, bool) for p in devpath)):
        raise ProtocolError("invalid devpath in identification")


def check_identification(node_type: NodeTypes, nid: int | None, address: Any,
                         id_timestamp: float | None, extra: dict) -> tuple[str, int] | None:
    """Validate a RequestIdentification; return its address decoded."""
    if not isinstance(node_type, NodeTypes):
        raise ProtocolError("invalid node type")
    check_nid(node_type, nid)
    if id_timestamp is not None and not 0 <= id_timestamp < 1e11:
        raise ProtocolError("invalid id timestamp %r" % id_timestamp)
    check_extra(extra)
    return check_address(address)


def host_of(peer: str) -> str:
    """The host of a connection's ``peer`` ("host:port")."""
    return peer.rsplit(":", 1)[0].strip("[]")
