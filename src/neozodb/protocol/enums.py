"""Protocol enumerations, constants and node-id helpers.

Enums are plain ``enum.Enum`` (not ``IntEnum``) on purpose: a member must
never be mistaken for an ``int`` by msgpack or by a signature check, since
enums travel as ext types while ints travel as ints.
"""

from __future__ import annotations

import enum
import re
import struct

__all__ = [
    "CellStates", "ClusterStates", "ErrorCodes", "NodeStates", "NodeTypes",
    "ENUMS",
    "ZERO_TID", "ZERO_OID", "INVALID_TID", "INVALID_OID", "MAX_TID", "ZERO_HASH",
    "INVALID_PARTITION",
    "p64", "u64", "nid_str", "parse_nid", "make_nid", "nid_type",
]


# Wire values are the 0-based positions in the spec; EXT_CODE is the enum's
# index in alphabetical order of enum names (the msgpack ext type code).

class CellStates(enum.Enum):
    EXT_CODE = enum.nonmember(0)
    OUT_OF_DATE = 0
    UP_TO_DATE = 1
    FEEDING = 2
    CORRUPTED = 3
    DISCARDED = 4


class ClusterStates(enum.Enum):
    EXT_CODE = enum.nonmember(1)
    RECOVERING = 0
    VERIFYING = 1
    RUNNING = 2
    STOPPING = 3
    STARTING_BACKUP = 4
    BACKINGUP = 5
    STOPPING_BACKUP = 6


class ErrorCodes(enum.Enum):
    EXT_CODE = enum.nonmember(2)
    ACK = 0
    DENIED = 1
    NOT_READY = 2
    OID_NOT_FOUND = 3
    TID_NOT_FOUND = 4
    OID_DOES_NOT_EXIST = 5
    PROTOCOL_ERROR = 6
    REPLICATION_ERROR = 7
    CHECKING_ERROR = 8
    BACKEND_NOT_IMPLEMENTED = 9
    NON_READABLE_CELL = 10
    READ_ONLY_ACCESS = 11
    INCOMPLETE_TRANSACTION = 12
    UNDO_PACK_ERROR = 13


class NodeStates(enum.Enum):
    EXT_CODE = enum.nonmember(3)
    UNKNOWN = 0
    DOWN = 1
    RUNNING = 2
    PENDING = 3


class NodeTypes(enum.Enum):
    EXT_CODE = enum.nonmember(4)
    MASTER = 0
    STORAGE = 1
    CLIENT = 2
    ADMIN = 3


# Indexed by ext code.
ENUMS: tuple[type[enum.Enum], ...] = (
    CellStates, ClusterStates, ErrorCodes, NodeStates, NodeTypes)
assert all(e.EXT_CODE == i for i, e in enumerate(ENUMS))


ZERO_TID = ZERO_OID = b"\x00" * 8
INVALID_TID = INVALID_OID = b"\xff" * 8
# Highest TID a signed 64-bit SQL integer can hold.
MAX_TID = b"\x7f" + b"\xff" * 7
ZERO_HASH = b"\x00" * 20
INVALID_PARTITION = 0xFFFFFFFF

_Q = struct.Struct(">Q")
_pack_q = _Q.pack
_unpack_q = _Q.unpack


def p64(n: int) -> bytes:
    """Pack an unsigned 64-bit int as 8 big-endian bytes (OIDs, TIDs)."""
    return _pack_q(n)


def u64(b: bytes) -> int:
    """Inverse of :func:`p64`."""
    return _unpack_q(b)[0]


# NID namespaces (high byte, signed) per node type.
_NAMESPACE = {
    NodeTypes.STORAGE: 0x00,
    NodeTypes.MASTER: -0x10,
    NodeTypes.CLIENT: -0x20,
    NodeTypes.ADMIN: -0x30,
}
_TYPE_OF_NAMESPACE = {ns: t for t, ns in _NAMESPACE.items()}
_LETTER = {
    NodeTypes.STORAGE: "S",
    NodeTypes.MASTER: "M",
    NodeTypes.CLIENT: "C",
    NodeTypes.ADMIN: "A",
}
_TYPE_OF_LETTER = {c: t for t, c in _LETTER.items()}
_NID_RE = re.compile(r"([SMCA])([0-9]+)\Z")


def make_nid(node_type: NodeTypes, n: int) -> int:
    """NID number ``n`` (0..0xffffff) in the namespace of ``node_type``."""
    if not 0 <= n <= 0xFFFFFF:
        raise ValueError(f"node number out of range: {n}")
    return (_NAMESPACE[node_type] << 24) + n


def nid_type(nid: int) -> NodeTypes:
    """Node type encoded in the high byte of a NID."""
    try:
        return _TYPE_OF_NAMESPACE[nid >> 24]
    except KeyError:
        raise ValueError(f"invalid node id: {nid!r}") from None


def nid_str(nid: int | None) -> str:
    """Human form of a NID: 'S1', 'M1', 'C3', 'A1'; 'None' for None."""
    if nid is None:
        return "None"
    t = _TYPE_OF_NAMESPACE.get(nid >> 24)
    if t is None:
        # Not produced by a NEO master; keep it printable and parseable.
        return str(nid)
    return f"{_LETTER[t]}{nid & 0xFFFFFF}"


def parse_nid(text: str) -> int:
    """Inverse of :func:`nid_str` (also accepts a plain decimal int)."""
    m = _NID_RE.match(text)
    if m is not None:
        return make_nid(_TYPE_OF_LETTER[m.group(1)], int(m.group(2)))
    try:
        nid = int(text, 10)
    except ValueError:
        raise ValueError(f"invalid node id: {text!r}") from None
    if not -(1 << 31) <= nid < (1 << 31):
        raise ValueError(f"invalid node id: {text!r}")
    return nid
