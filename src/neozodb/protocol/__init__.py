"""NEO wire protocol 5: enums, constants, message catalogue and codec.

This package owns the byte-level format only (see
``/work/shared/reference/PROTOCOL.md``): the handshake, the framing of
``[msg_id, code, args]`` msgpack messages, the signature of every message
and their validation on receipt.  It is pure: it imports nothing else of
neozodb and does no I/O (no sockets, no threads), so every node type and
the tests can use it directly.
"""

from .catalogue import PACKETS, Packets, PacketType, ProtocolError
from .codec import HANDSHAKE, PROTOCOL_VERSION, Decoder, check_handshake, encode
from .enums import (
    INVALID_OID,
    INVALID_PARTITION,
    INVALID_TID,
    MAX_TID,
    ZERO_HASH,
    ZERO_OID,
    ZERO_TID,
    CellStates,
    ClusterStates,
    ErrorCodes,
    NodeStates,
    NodeTypes,
    make_nid,
    nid_str,
    nid_type,
    p64,
    parse_nid,
    u64,
)

__all__ = [
    "PROTOCOL_VERSION", "HANDSHAKE", "check_handshake", "ProtocolError",
    "CellStates", "ClusterStates", "ErrorCodes", "NodeStates", "NodeTypes",
    "ZERO_TID", "ZERO_OID", "INVALID_TID", "INVALID_OID", "MAX_TID", "ZERO_HASH",
    "INVALID_PARTITION",
    "p64", "u64", "nid_str", "parse_nid", "make_nid", "nid_type",
    "Packets", "PACKETS", "PacketType", "encode", "Decoder",
]
