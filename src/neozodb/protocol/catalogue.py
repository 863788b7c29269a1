"""Message catalogue of protocol 5 and the argument-signature language.

Every message is data in ``_TABLE``; a loop turns each row into one
:class:`PacketType` per message (a request and its answer are distinct
types).  Signatures are parsed once, at import, into closures that the
decoder calls for every received message, so they avoid allocation and
use exact ``type(x) is ...`` tests (which also keeps ``bool`` out of
``int``).

Signature language: ``p64`` (8 bytes), ``bin``, ``int``, ``bool``,
``float`` (int accepted too), ``any``, ``?T`` (None or T), ``[T]``,
``(A,B,...)``, ``{K:V}`` and enum names.  Parsed types are tuples whose
first item is the kind: ``("p64",)``, ``("enum", NodeTypes)``,
``("?", T)``, ``("[]", T)``, ``("()", (A, B))``, ``("{}", K, V)``...
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

from .enums import ENUMS

__all__ = ["PacketType", "Packets", "PACKETS", "ProtocolError", "parse_sig", "format_type",
           "split_oids"]


class ProtocolError(Exception):
    """Malformed or unexpected data on the wire; the connection must close."""


# ---------------------------------------------------------------------------
# Signatures

Type = tuple  # parsed type, see module docstring
Check = Callable[[Any], bool]

_SCALARS = frozenset(("p64", "bin", "int", "bool", "float", "any", "oids"))
_ENUM_BY_NAME = {e.__name__: e for e in ENUMS}


def parse_sig(sig: str) -> tuple[Type, ...]:
    """Parse an argument signature ("p64,?int,[bin]") into parsed types."""
    sig = sig.replace(" ", "")
    if sig in ("", "(none)"):
        return ()
    types, pos = _parse_list(sig, 0, "")
    if pos != len(sig):
        raise ValueError(f"bad signature {sig!r} at {pos}")
    return tuple(types)


def _parse_list(s: str, pos: int, end: str) -> tuple[list[Type], int]:
    types = []
    while True:
        t, pos = _parse_type(s, pos)
        types.append(t)
        if pos < len(s) and s[pos] == ",":
            pos += 1
            continue
        if end and (pos >= len(s) or s[pos] != end):
            raise ValueError(f"bad signature {s!r}: expected {end!r} at {pos}")
        return types, pos + len(end)


def _parse_type(s: str, pos: int) -> tuple[Type, int]:
    c = s[pos:pos + 1]
    if c == "?":
        t, pos = _parse_type(s, pos + 1)
        return ("?", t), pos
    if c == "[":
        t, pos = _parse_type(s, pos + 1)
        if s[pos:pos + 1] != "]":
            raise ValueError(f"bad signature {s!r}: expected ']' at {pos}")
        return ("[]", t), pos + 1
    if c == "(":
        types, pos = _parse_list(s, pos + 1, ")")
        return ("()", tuple(types)), pos
    if c == "{":
        k, pos = _parse_type(s, pos + 1)
        if s[pos:pos + 1] != ":":
            raise ValueError(f"bad signature {s!r}: expected ':' at {pos}")
        v, pos = _parse_type(s, pos + 1)
        if s[pos:pos + 1] != "}":
            raise ValueError(f"bad signature {s!r}: expected '}}' at {pos}")
        return ("{}", k, v), pos + 1
    end = pos
    while end < len(s) and s[end].isalnum():
        end += 1
    name = s[pos:end]
    if name in _SCALARS:
        return (name,), end
    if name in _ENUM_BY_NAME:
        return ("enum", _ENUM_BY_NAME[name]), end
    raise ValueError(f"bad signature {s!r}: unknown type {name!r} at {pos}")


def format_type(t: Type) -> str:
    """Signature text of a parsed type (used in error messages)."""
    kind = t[0]
    if kind == "enum":
        return t[1].__name__
    if kind == "?":
        return "?" + format_type(t[1])
    if kind == "[]":
        return f"[{format_type(t[1])}]"
    if kind == "()":
        return "(" + ",".join(map(format_type, t[1])) + ")"
    if kind == "{}":
        return f"{{{format_type(t[1])}:{format_type(t[2])}}}"
    return kind


def _any(x: object) -> bool:
    return True


def _is_p64(x: object) -> bool:
    return type(x) is bytes and len(x) == 8


def _is_bin(x: object) -> bool:
    return type(x) is bytes


def _is_int(x: object) -> bool:
    return type(x) is int


def _is_bool(x: object) -> bool:
    return type(x) is bool


def _is_float(x: object) -> bool:
    return type(x) is float or type(x) is int


def _is_seq(x: object) -> bool:
    return type(x) is tuple or type(x) is list


def _is_oids(x: object) -> bool:
    # NEO's master passes on the oids of a pack order as its SQLite storage
    # keeps them, one byte string, where it otherwise sends a list
    if type(x) is bytes:
        return len(x) % 8 == 0
    return (type(x) is tuple or type(x) is list) and all(map(_is_p64, x))


def split_oids(oids: bytes | list | tuple) -> list[bytes]:
    """The oids of an ``oids`` argument as a list of 8-byte strings."""
    if type(oids) is bytes:
        return [oids[i:i + 8] for i in range(0, len(oids), 8)]
    return list(oids)


_SCALAR_CHECKS: dict[str, Check] = {
    "p64": _is_p64, "bin": _is_bin, "int": _is_int,
    "bool": _is_bool, "float": _is_float, "any": _any, "oids": _is_oids,
}
_call = operator.call


def compile_type(t: Type) -> Check:
    """Predicate telling whether a value matches parsed type ``t``."""
    kind = t[0]
    if kind in _SCALAR_CHECKS:
        return _SCALAR_CHECKS[kind]
    if kind == "enum":
        cls = t[1]
        return lambda x: type(x) is cls
    if kind == "?":
        f = compile_type(t[1])
        return lambda x: x is None or f(x)
    if kind == "[]":
        f = compile_type(t[1])
        if f is _any:
            return _is_seq
        return lambda x: (type(x) is tuple or type(x) is list) and all(map(f, x))
    if kind == "()":
        return _compile_fixed(tuple(map(compile_type, t[1])), False)
    if kind == "{}":
        fk = compile_type(t[1])
        fv = compile_type(t[2])
        return lambda x: (type(x) is dict and all(map(fk, x))
                          and all(map(fv, x.values())))
    raise ValueError(f"unknown type kind {kind!r}")


def _compile_fixed(fs: tuple[Check, ...], args: bool) -> Check:
    """Check a fixed-size sequence; the common small sizes are unrolled.

    For ``args`` (a whole argument list) the caller has already checked
    the container type, so only the length and items are tested.
    """
    n = len(fs)
    if not args:
        if n == 2:
            a, b = fs
            return lambda x: ((type(x) is tuple or type(x) is list)
                              and len(x) == 2 and a(x[0]) and b(x[1]))
        if n == 3:
            a, b, c = fs
            return lambda x: ((type(x) is tuple or type(x) is list)
                              and len(x) == 3 and a(x[0]) and b(x[1]) and c(x[2]))
        items = _compile_fixed(fs, True)
        return lambda x: (type(x) is tuple or type(x) is list) and items(x)
    if n == 0:
        return lambda x: len(x) == 0
    if n == 1:
        (a,) = fs
        return lambda x: len(x) == 1 and a(x[0])
    if n == 2:
        a, b = fs
        return lambda x: len(x) == 2 and a(x[0]) and b(x[1])
    if n == 3:
        a, b, c = fs
        return lambda x: len(x) == 3 and a(x[0]) and b(x[1]) and c(x[2])
    return lambda x: len(x) == n and all(map(_call, fs, x))


# ---------------------------------------------------------------------------
# Packet types

class PacketType:
    """One message of the catalogue (a request and its answer are two)."""

    __slots__ = ("code", "name", "sig", "types", "nargs", "answer", "request",
                 "acked", "is_answer", "is_request", "ignorable", "bulk",
                 "validate", "_arg_checks", "_keep")

    def __init__(self, code: int, name: str, sig: str, *, acked: bool = False,
                 keep_when_closed: bool = False, bulk: bool = False) -> None:
        self.code = code
        self.name = name
        self.sig = sig
        self.types = parse_sig(sig)
        self.nargs = len(self.types)
        self.answer: PacketType | None = None
        self.request: PacketType | None = None
        self.acked = acked
        self.is_answer = bool(code & 0x8000)
        # Set once answers are linked, see _build().
        self.is_request = acked
        self.ignorable = False
        self.bulk = bulk
        self._arg_checks = tuple(map(compile_type, self.types))
        # Validates an argument tuple/list whose container type is known.
        self.validate: Check = _compile_fixed(self._arg_checks, True)
        self._keep = keep_when_closed

    def __repr__(self) -> str:
        return f"<PacketType {self.name} 0x{self.code:04x} ({self.sig})>"

    def explain(self, args: object) -> str | None:
        """Why ``args`` does not match the signature, or None if it does."""
        if not _is_seq(args):
            return f"{self.name}: arguments are not an array"
        seq = cast("tuple | list", args)
        if len(seq) != self.nargs:
            return f"{self.name}: expected {self.nargs} arguments, got {len(seq)}"
        for i, (check, value) in enumerate(zip(self._arg_checks, seq, strict=True)):
            if not check(value):
                return f"{self.name}: argument {i + 1}: expected {format_type(self.types[i])}"
        return None

    def check(self, args: tuple | list) -> None:
        """Raise ProtocolError unless ``args`` matches the signature."""
        reason = self.explain(args)
        if reason is not None:
            raise ProtocolError(reason)


# Row flags.
_ACK = 1    # answered by Error (ACK on success, else a failure code)
_KEEP = 2   # processed even on a closed connection (not ignorable)
_BULK = 4   # may be buffered instead of sent immediately

# (code, name, args, answer name, answer args, flags).  Signatures are the
# recorded ones except where a comment says otherwise: the recording only
# saw nil / empty containers there, and neo-architecture.md 3.3 gives the
# real content.
_TABLE: tuple[tuple[int, str, str, str | None, str, int], ...] = (
    (0x8000, "Error", "int,bin", None, "", 0),
    (0x01, "RequestIdentification", "NodeTypes,?int,?(bin,int),bin,?float,{bin:any}",
     "AcceptIdentification", "NodeTypes,?int,?int", 0),
    (0x02, "Ping", "", "Pong", "", 0),
    (0x03, "CloseClient", "(none)", None, "", 0),
    (0x04, "AskPrimary", "", "AnswerPrimary", "int", 0),
    (0x05, "NotPrimaryMaster", "?int,[(bin,int)]", None, "", 0),
    (0x06, "NotifyNodeInformation",
     "float,[(NodeTypes,?(bin,int),?int,NodeStates,?float)]", None, "", 0),
    (0x07, "AskRecovery", "", "AnswerRecovery", "?int,?p64,?p64", 0),
    (0x08, "AskLastIDs", "", "AnswerLastIDs", "?p64,?p64,p64", 0),
    (0x09, "AskPartitionTable", "", "AnswerPartitionTable", "int,int,[[(int,CellStates)]]", 0),
    (0x0a, "SendPartitionTable", "?int,int,[[(int,CellStates)]]", None, "", 0),
    (0x0b, "NotifyPartitionChanges", "int,int,[(int,int,CellStates)]", None, "", 0),
    (0x0c, "StartOperation", "bool", None, "", 0),
    (0x0d, "StopOperation", "", None, "", 0),
    (0x0e, "AskUnfinishedTransactions", "[int]", "AnswerUnfinishedTransactions", "p64,[p64]", 0),
    (0x0f, "AskLockedTransactions", "", "AnswerLockedTransactions", "{p64:?p64}", 0),
    # Answer recorded as p64; 3.3: AnswerFinalTID(tid|None).
    (0x10, "AskFinalTID", "p64", "AnswerFinalTID", "?p64", 0),
    (0x11, "ValidateTransaction", "p64,p64", None, "", 0),
    (0x12, "AskBeginTransaction", "?p64", "AnswerBeginTransaction", "p64", 0),
    (0x13, "FailedVote", "p64,[int]", None, "", _ACK),
    (0x14, "AskFinishTransaction", "p64,[p64],[int],[int],?(?[p64],p64)",
     "AnswerTransactionFinished", "p64,p64", _KEEP),
    (0x15, "AskLockInformation", "p64,p64,bool", "AnswerInformationLocked", "p64", _KEEP),
    (0x16, "InvalidateObjects", "p64,[p64]", None, "", 0),
    (0x17, "InvalidatePartitions", "p64,[int]", None, "", 0),
    (0x18, "NotifyUnlockInformation", "p64", None, "", 0),
    (0x19, "AskNewOIDs", "int", "AnswerNewOIDs", "[p64]", 0),
    (0x1a, "NotifyDeadlock", "p64,p64", None, "", 0),
    (0x1b, "AskRelockObject", "p64,p64", "AnswerRelockObject", "?(p64,p64,?(int,bin,bin))", 0),
    (0x1c, "AskStoreObject", "p64,p64,int,bin,bin,?p64,?p64", "AnswerStoreObject", "?p64", 0),
    (0x1d, "AbortTransaction", "p64,[int]", None, "", 0),
    (0x1e, "AskStoreTransaction", "p64,bin,bin,bin,[p64],?(?[p64],p64)",
     "AnswerStoreTransaction", "", 0),
    (0x1f, "AskVoteTransaction", "p64", "AnswerVoteTransaction", "", 0),
    (0x20, "AskObject", "p64,?p64,?p64", "AnswerObject", "p64,p64,?p64,?int,bin,bin,?p64", 0),
    (0x21, "AskTIDs", "int,int,int", "AnswerTIDs", "[p64]", 0),
    (0x22, "AskTransactionInformation", "p64",
     "AnswerTransactionInformation", "p64,bin,bin,bin,bool,[p64]", 0),
    (0x23, "AskObjectHistory", "p64,int,int", "AnswerObjectHistory", "p64,[(p64,int)]", 0),
    # Recorded "int,int,?"; 3.3: third argument is a nid filter or None.
    (0x24, "AskPartitionList", "int,int,?int",
     "AnswerPartitionList", "int,int,[[(int,CellStates)]]", 0),
    # Recorded "NodeTypes"; 3.3: AskNodeList(type|None) lists all nodes.
    (0x25, "AskNodeList", "?NodeTypes",
     "AnswerNodeList", "[(NodeTypes,?(bin,int),?int,NodeStates,?float)]", 0),
    (0x26, "SetNodeState", "int,NodeStates", None, "", _ACK | _KEEP),
    (0x27, "AddPendingNodes", "[int]", None, "", _ACK | _KEEP),
    (0x28, "TweakPartitionTable", "bool,[int]",
     "AnswerTweakPartitionTable", "bool,[[(int,CellStates)]]", 0),
    (0x29, "SetNumReplicas", "int", None, "", _ACK | _KEEP),
    (0x2a, "SetClusterState", "ClusterStates", None, "", _ACK | _KEEP),
    (0x2b, "Repair", "[int],bool", None, "", _ACK),
    (0x2c, "NotifyRepair", "bool", None, "", 0),
    (0x2d, "NotifyClusterInformation", "ClusterStates", None, "", 0),
    (0x2e, "AskClusterState", "", "AnswerClusterState", "?ClusterStates", 0),
    (0x2f, "AskObjectUndoSerial", "p64,p64,p64,[p64]",
     "AnswerObjectUndoSerial", "{p64:(p64,?p64,bool)}", 0),
    (0x30, "AskTIDsFrom", "p64,p64,int,int", "AnswerTIDsFrom", "[p64]", 0),
    (0x31, "AskOIDsFrom", "int,int,p64,p64", "AnswerOIDsFrom", "?p64,[p64]", 0),
    (0x32, "WaitForPack", "p64", "WaitedForPack", "", 0),
    # oids: [p64], or (NEO's master, orders read back from its storages)
    # the same as one byte string
    (0x33, "AskPackOrders", "p64", "AnswerPackOrders", "[(p64,?bool,bool,?oids,p64)]", 0),
    (0x34, "NotifyPackSigned", "[p64],[p64]", None, "", 0),
    (0x35, "NotifyPackCompleted", "p64", None, "", 0),
    # Recorded "{int:?int},p64,?"; 3.3: third argument is max_tid or None.
    (0x36, "CheckReplicas", "{int:?int},p64,?p64", None, "", _ACK),
    (0x37, "CheckPartition", "int,(bin,?(bin,int)),p64,p64", None, "", 0),
    (0x38, "AskCheckTIDRange", "int,int,p64,p64", "AnswerCheckTIDRange", "int,bin,p64", 0),
    (0x39, "AskCheckSerialRange", "int,int,p64,p64,p64",
     "AnswerCheckSerialRange", "int,bin,p64,bin,p64", 0),
    (0x3a, "NotifyPartitionCorrupted", "int,[int]", None, "", 0),
    (0x3b, "NotifyReady", "", None, "", 0),
    (0x3c, "AskLastTransaction", "", "AnswerLastTransaction", "p64", 0),
    (0x3d, "AskCheckCurrentSerial", "p64,p64,p64", "AnswerCheckCurrentSerial", "?p64", 0),
    (0x3e, "NotifyTransactionFinished", "p64,p64", None, "", 0),
    (0x3f, "Replicate", "p64,bin,{int:?(bin,int)}", None, "", 0),
    (0x40, "NotifyReplicationDone", "int,p64", None, "", 0),
    # Answer recorded "?p64,[],?p64"; 3.3: the middle list holds TIDs to delete.
    (0x41, "AskFetchTransactions", "int,int,p64,p64,[p64],bool",
     "AnswerFetchTransactions", "?p64,[p64],?p64", 0),
    # Answer recorded "?p64,?p64,{:}"; 3.3: {serial: [oid to delete]}.
    (0x42, "AskFetchObjects", "int,int,p64,p64,p64,{p64:[p64]}",
     "AnswerFetchObjects", "?p64,?p64,{p64:[p64]}", 0),
    (0x43, "AddTransaction", "p64,bin,bin,bin,bool,p64,[p64],?(?bool,bool,?[p64],p64)",
     None, "", _BULK),
    (0x44, "AddObject", "p64,p64,int,bin,bin,?p64", None, "", _BULK),
    (0x45, "Truncate", "p64", None, "", _ACK),
    (0x46, "FlushLog", "(none)", None, "", 0),
    (0x47, "AskMonitorInformation", "", "AnswerMonitorInformation", "[?bin],[?bin],bin", 0),
    (0x48, "NotifyMonitorInformation", "{bin:any}", None, "", 0),
    (0x49, "NotifyUpstreamAdmin", "(bin,int)", None, "", 0),
    # neozodb only, never sent to a NEO peer (protocol/features.py)
    (0x7f00, "NotifyFeatures", "[bin]", None, "", 0),
    # many AddObject at once (feature "repl-batch")
    (0x7f01, "AddObjects", "[(p64,p64,int,bin,bin,?p64)]", None, "", _BULK),
    # AskStoreTransaction of a transaction sent to this storage alone
    # (feature "solo-vote"): its lock makes the vote durable
    (0x7f02, "AskSoloVote", "p64,bin,bin,bin,[p64],?(?[p64],p64)", "AnswerSoloVote", "", 0),
    # feature "older-pt" (neoctl print pt_history, recover_pt): a storage's
    # history of its readable partitions: its current ptid, (ptid, tid up to
    # which they are complete, partitions) oldest first, and the greatest
    # TID up to which a pack it applied went
    (0x7f03, "AskPartitionHistory", "",
     "AnswerPartitionHistory", "?int,[(int,?p64,[int])],?p64", 0),
    # the master's verdict on each table in those histories, for neoctl:
    # latest ptid, then (ptid, operational, truncate after, storages,
    # partitions without a copy, greatest pack TID on those storages)
    # newest first
    (0x7f04, "AskOlderPartitionTables", "",
     "AnswerOlderPartitionTables", "?int,[(int,bool,?p64,[int],[int],?p64)]", 0),
    # make an older table current (a new ptid) and truncate after its TID
    (0x7f05, "RecoverPartitionTable", "int", None, "", _ACK),
    # feature "begin-partition": AskBeginTransaction without an imposed
    # TID, for a TTID in this partition (that of the first object stored)
    (0x7f06, "AskBeginInPartition", "int", "AnswerBeginInPartition", "p64", 0),
    # AskStoreTransaction of a transaction whose every store went to the
    # storages that get its metadata, all of them (feature "lazy-vote"):
    # the first lock made durable carries it
    (0x7f07, "AskLazyVote", "p64,bin,bin,bin,[p64],?(?[p64],p64)", "AnswerLazyVote", "", 0),
    # feature "bulk-copy" (client/bulk.py): many transactions copied with
    # their TIDs through one two-phase commit.  The begin: first and last
    # TID of the batch (the TTID is the last)
    (0x7f08, "AskBulkBegin", "p64,p64", "AnswerBulkBegin", "p64", 0),
    # the vote of a batch on one storage: (tid, user, description,
    # extension, records) of each transaction in TID order, each record
    # (oid, compression, checksum, data, data_serial) as AskStoreObject's
    (0x7f09, "AskBulkVote", "p64,[(p64,bin,bin,bin,[(p64,int,bin,bin,?p64)])]",
     "AnswerBulkVote", "", 0),
    # the finish of a batch: (tid, oids) of each transaction, for the
    # invalidations; answered (ttid, tid) as AnswerTransactionFinished
    (0x7f0a, "AskBulkFinish", "p64,[(p64,[p64])]", "AnswerBulkFinish", "p64,p64", 0),
    # feature "blob" (protocol/blobs.py): a chunk of the content of the blob
    # a transaction stores for an object (ttid, oid, chunk number, bytes),
    # before the store of its record
    # feature "begin-ahead": a begin with a TTID the master reserved for
    # this connection (None: a new one, in the partition if given); the
    # answer is the TTID and the first of the next reserved block
    (0x7f0b, "AskBeginAhead", "?int,?p64", "AnswerBeginAhead", "p64,p64", 0),
    (0x7f10, "AskStoreBlobChunk", "p64,p64,int,bin", "AnswerStoreBlobChunk", "", 0),
    # a chunk of the content of the blob revision whose data has this
    # checksum (checksum, chunk number)
    (0x7f11, "AskBlobChunk", "bin,int", "AnswerBlobChunk", "bin", 0),
)

TABLE_ROWS = len(_TABLE)


def _build() -> dict[int, PacketType]:
    packets: dict[int, PacketType] = {}

    def add(pt: PacketType) -> None:
        if pt.code in packets:
            raise ValueError(f"duplicate code {pt!r} / {packets[pt.code]!r}")
        packets[pt.code] = pt

    for code, name, sig, answer_name, answer_sig, flags in _TABLE:
        req = PacketType(code, name, sig, acked=bool(flags & _ACK),
                         keep_when_closed=bool(flags & _KEEP), bulk=bool(flags & _BULK))
        add(req)
        if answer_name is not None:
            ans = PacketType(code | 0x8000, answer_name, answer_sig)
            ans.request = req
            req.answer = ans
            req.is_request = True
            add(ans)
    for pt in packets.values():
        # Only requests may be dropped on a closed connection; answers and
        # notifications are always processed (neo-architecture.md 3.1).
        pt.ignorable = pt.is_request and not pt._keep
    return packets


PACKETS: dict[int, PacketType] = _build()
Packets = SimpleNamespace(**{pt.name: pt for pt in PACKETS.values()})
