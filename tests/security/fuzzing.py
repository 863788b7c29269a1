"""Pieces of the stateful protocol fuzzer (test_fuzz.py): a generator of
messages from the catalogue's signatures, raw-protocol sessions against
real nodes, and the filter that keeps the generated traffic within what a
peer of that role may not legitimately use to change committed data.

Values come from a ``random.Random`` seeded by Hypothesis, one seed per
batch: drawing every value through Hypothesis would overflow its per-example
buffer long before the hundreds of messages a batch holds.
"""
from __future__ import annotations

import errno
import hashlib
import random
import re
import select
import socket
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from neozodb.protocol import (
    HANDSHAKE,
    INVALID_PARTITION,
    MAX_TID,
    PACKETS,
    ZERO_HASH,
    ClusterStates,
    Decoder,
    NodeStates,
    NodeTypes,
    Packets,
    ProtocolError,
    encode,
    p64,
    u64,
)

# What each identified role normally sends; other catalogue messages are
# sent too, rarely, since they close the connection.
CLIENT_TO_MASTER = ("AskBeginTransaction", "AskNewOIDs", "AskFinishTransaction", "AskPackOrders",
                    "WaitForPack", "AbortTransaction", "FailedVote", "AskLastTransaction",
                    "AskFinalTID", "Ping")
CLIENT_TO_STORAGE = ("AskObject", "AskFinalTID", "AskObjectHistory", "AskTransactionInformation",
                     "AskTIDs", "AskTIDsFrom", "AskOIDsFrom", "AskObjectUndoSerial",
                     "AskStoreObject", "AskCheckCurrentSerial", "AskRelockObject",
                     "AskStoreTransaction", "AskVoteTransaction", "AbortTransaction", "Ping")
# neoctl's requests (Truncate and RecoverPartitionTable excluded, others
# restricted: see EXCLUDED)
CTL_TO_ADMIN = ("AskPrimary", "AskLastIDs", "AskLastTransaction", "AskRecovery",
                "AskPartitionList", "AskNodeList", "AskClusterState", "AskMonitorInformation",
                "AskPackOrders", "SetClusterState", "SetNodeState", "AddPendingNodes",
                "TweakPartitionTable", "SetNumReplicas", "Repair", "CheckReplicas",
                "FlushLog", "AskOlderPartitionTables", "Ping")
# What the filter (legitimate_only) changes in generated requests, and why:
# each is something a peer of that role may do, and that would change the
# real client's data or take the cluster apart legitimately (or through a
# finding already reported, Fn: test_fuzz_findings.py).
EXCLUDED = {
    "Truncate (neoctl)": "deletes every transaction after a TID: never sent",
    "RecoverPartitionTable (neoctl)":
        "starts from an older table, deleting what came after it: never sent",
    "SetClusterState(STOPPING) (neoctl)": "stops every node: sent as RUNNING (refused)",
    "SetNodeState(nid, DOWN or UNKNOWN) for a nid a node may have (neoctl)":
        "kill makes a storage exit, drop removes it: sent as RUNNING (refused)",
    "TweakPartitionTable(dry_run=False) (neoctl)": "moves cells: sent with dry_run=True",
    "SetNumReplicas(n), 0 <= n < 2**31, n != 1 (neoctl)":
        "a change of redundancy: sent as 1; negative and huge values go as generated",
    "AskStoreObject / AskCheckCurrentSerial with the current serial of a real-client object":
        "would overwrite or lock it: a wrong serial is sent",
    "writes of an oid < 2**62 not allocated to the fuzzer":
        "would take the real client's next oids: a random oid >= 2**62 is sent",
    "AskBeginTransaction(imposed TID) after the last committed TID":
        "F6: every later TID comes after it (beyond 64 bits: no begin works): sent as None",
    "AskFinishTransaction naming oids >= 2**62 not allocated to the fuzzer":
        "F11: the master takes them as allocated (ff*8: no OID can be allocated): removed",
    "FailedVote naming a node of the cluster": "F7: the master closes that node's connection",
    "RequestIdentification as STORAGE to the master (unidentified rule)":
        "a storage may legitimately be given cells: sent as CLIENT",
}
ROLES = {"master": CLIENT_TO_MASTER, "storage": CLIENT_TO_STORAGE, "admin": CTL_TO_ADMIN}

BOUNDARY_INTS = (0, 1, -1, 2, 7, 11, 12, 13, 255, 256, 10000, 10001, 2**31 - 1, -2**31,
                 2**32 - 1, 2**32, INVALID_PARTITION, 2**63 - 1, -2**63, 2**64 - 1)
SPECIAL_P64 = (b"\0" * 8, b"\xff" * 8, MAX_TID, p64(1), b"\x80" + b"\0" * 7)
# oids the master may hand the real client later: written only if allocated
# to the fuzzer (a client may legitimately write any oid: one it did not
# allocate would break the real client's next commits)
FOREIGN_OID_MIN = 1 << 62


@dataclass
class Pools:
    """What the cluster holds or told the fuzzer, reused in generated
    values so that requests reach past the first lookups."""
    model_oids: list[bytes] = field(default_factory=list)
    fuzz_oids: list[bytes] = field(default_factory=list)
    tids: list[bytes] = field(default_factory=list)
    ttids: list[bytes] = field(default_factory=list)
    nids: list[int] = field(default_factory=list)
    current: dict[bytes, bytes] = field(default_factory=dict)  # model oid -> serial

    def learn(self, name: str, args: tuple) -> None:
        """Remember ids from an answer (bounded lists)."""
        if name == "AnswerBeginTransaction":
            _keep(self.ttids, args[0])
        elif name == "AnswerNewOIDs":
            for oid in args[0][:4]:
                _keep(self.fuzz_oids, oid)
        elif name in ("AnswerTIDs", "AnswerTIDsFrom"):
            for tid in args[0][:4]:
                _keep(self.tids, tid)
        elif name == "AnswerLastTransaction":
            _keep(self.tids, args[0])
        elif name == "AnswerObject":
            _keep(self.tids, args[1])


def _keep(pool: list, value: Any, size: int = 64) -> None:
    if value not in pool:
        pool.append(value)
        if len(pool) > size:
            del pool[0]


class Generator:
    """Messages from signatures: mostly valid values, some boundary ones."""

    def __init__(self, seed: int, pools: Pools, cluster_name: bytes) -> None:
        self.r = random.Random(seed)
        self.pools = pools
        self.name = cluster_name

    # -- values ----------------------------------------------------------------
    def p64(self) -> bytes:
        r, pools = self.r, self.pools
        x = r.random()
        if x < 0.3 and pools.model_oids:
            return r.choice(pools.model_oids)
        if x < 0.5 and pools.tids:
            return r.choice(pools.tids)
        if x < 0.6 and pools.ttids:
            return r.choice(pools.ttids)
        if x < 0.7 and pools.fuzz_oids:
            return r.choice(pools.fuzz_oids)
        if x < 0.85:
            return r.choice(SPECIAL_P64)
        return p64(r.randrange(FOREIGN_OID_MIN, 1 << 64))

    def integer(self) -> int:
        r = self.r
        x = r.random()
        if x < 0.6:
            return r.randrange(0, 12)
        if x < 0.7 and self.pools.nids:
            return r.choice(self.pools.nids)
        if x < 0.95:
            return r.choice(BOUNDARY_INTS)
        return r.randrange(-2**63, 2**64)

    def binary(self) -> bytes:
        r = self.r
        x = r.random()
        if x < 0.3:
            return b""
        if x < 0.5:
            return self.name
        if x < 0.7:
            return r.randbytes(20)
        if x < 0.99:
            return r.randbytes(r.randrange(1, 64))
        return r.randbytes(r.choice((4096, 4096, 65536, 65536, 1 << 20)))

    def value(self, t: tuple, depth: int = 0) -> Any:
        r = self.r
        kind = t[0]
        if kind == "p64":
            return self.p64()
        if kind == "int":
            return self.integer()
        if kind == "bin":
            return self.binary()
        if kind == "bool":
            return r.random() < 0.5
        if kind == "float":
            return r.choice((time.time(), 0.0, -1.0, 1e300, float("inf"), float("nan"), 0))
        if kind == "any":
            return self.anything(depth)
        if kind == "oids":
            return [self.p64() for _ in range(r.randrange(3))]
        if kind == "enum":
            return r.choice(list(t[1]))
        if kind == "?":
            return None if r.random() < 0.3 else self.value(t[1], depth)
        if kind == "[]":
            return [self.value(t[1], depth + 1) for _ in range(self.length(depth))]
        if kind == "()":
            return tuple(self.value(x, depth + 1) for x in t[1])
        if kind == "{}":
            return {self.value(t[1], depth + 1): self.value(t[2], depth + 1)
                    for _ in range(self.length(depth))}
        raise ValueError(kind)

    def length(self, depth: int) -> int:
        r = self.r
        x = r.random()
        if x < 0.3 or depth > 2:
            return 0 if x < 0.5 else 1
        if x < 0.97:
            return r.randrange(1, 6)
        return r.choice((100, 1000, 5000))

    def anything(self, depth: int = 0) -> Any:
        r = self.r
        choices = [None, True, 1.5, "text", self.integer(), self.binary(),
                   msgpack.ExtType(r.randrange(8), msgpack.packb(r.randrange(-2, 9)))]
        if depth < 3:
            choices += [[self.anything(depth + 1)], {self.binary(): self.anything(depth + 1)}]
        return r.choice(choices)

    # -- messages --------------------------------------------------------------
    def message(self, names: Iterable[str]) -> tuple[Any, list]:
        packet = getattr(Packets, self.r.choice(tuple(names)))
        args = [self.value(t) for t in packet.types]
        if self.r.random() < 0.7:
            self.coherent(packet.name, args)
        return packet, args

    def coherent(self, name: str, args: list) -> None:
        """Make the arguments pass the first checks of the handler, so
        that the deeper logic runs too."""
        r = self.r
        if name == "AskStoreObject" and args[4] is not None:
            args[3] = hashlib.sha1(args[4]).digest()
            args[2] = r.choice((0, 0, 1))
        elif name in ("AskObjectHistory", "AskTIDs"):
            first, last = sorted((r.randrange(0, 20), r.randrange(0, 20)))
            args[1 if name == "AskObjectHistory" else 0] = first
            args[2 if name == "AskObjectHistory" else 1] = last + 1
            if name == "AskTIDs" and r.random() < 0.5:
                args[2] = INVALID_PARTITION
        elif name == "AskNewOIDs":
            args[0] = r.randrange(1, 100)
        if self.pools.ttids:
            # a transaction begun by the fuzzer, most likely still open
            ttid = self.pools.ttids[-1] if r.random() < 0.7 else r.choice(self.pools.ttids)
            if name in ("AskFinishTransaction", "AbortTransaction", "FailedVote", "AskFinalTID",
                        "AskStoreTransaction", "AskVoteTransaction", "AskCheckCurrentSerial",
                        "AskRelockObject", "AskObjectUndoSerial"):
                args[0] = ttid
            elif name == "AskStoreObject":
                args[6] = ttid

    def ill_typed(self, packet: Any, args: list) -> list:
        """The arguments, broken in one place (wrong arity, type, enum)."""
        r = self.r
        args = list(args)
        x = r.random()
        if x < 0.2 or not args:
            return args + [self.anything()] if x < 0.1 or not args else args[:-1]
        i = r.randrange(len(args))
        bad = [self.anything(), "a string", 1.5, -1, [], {}, b"\0" * 7, b"\0" * 9,
               msgpack.ExtType(r.randrange(5), msgpack.packb(99)),
               msgpack.ExtType(r.randrange(5, 128), b"\0"),
               msgpack.ExtType(r.randrange(5), b"\xc1")]
        args[i] = r.choice(bad)
        return args

    def garbage(self, good: bytes) -> bytes:
        """Bytes that are not one valid message (after a handshake)."""
        r = self.r
        return r.choice((
            lambda: r.randbytes(r.randrange(1, 256)),
            lambda: good[:r.randrange(1, max(2, len(good)))],
            lambda: good[:r.randrange(1, max(2, len(good)))] + good,
            lambda: b"\xc1",
            lambda: msgpack.packb([r.randrange(2**32), r.randrange(0x8000, 0x10000), []]),
            lambda: msgpack.packb([-1, 2, []]),
            lambda: msgpack.packb([2**32, 2, []]),
            lambda: msgpack.packb([0, 2]),
            lambda: msgpack.packb({"a": 1}),
            lambda: b"\x91" * 5000,                       # nesting too deep
            lambda: b"\xdd\xff\xff\xff\xff",               # 4G-element array announced
            lambda: b"\xc6\x7f\xff\xff\xff" + r.randbytes(100),  # 2 GiB bin announced
            lambda: b"\x93\x00\x02\xdc\xff\xff" + b"\xc0" * 100,
        ))()


def legitimate_only(role: str, packet: Any, args: list, pools: Pools, r: random.Random,
                    real_nids: set[int]) -> list:
    """Turn requests that would legitimately change committed data (or the
    cluster) into ones that cannot; see EXCLUDED."""
    name = packet.name
    if name in ("AskStoreObject", "AskCheckCurrentSerial"):
        oid, serial = (args[0], args[1]) if name == "AskStoreObject" else (args[1], args[2])
        where = (0, 1) if name == "AskStoreObject" else (1, 2)
        if type(oid) is bytes and len(oid) == 8 and u64(oid) < FOREIGN_OID_MIN \
                and oid not in pools.fuzz_oids:
            # the right serial would commit over the real client's data,
            # a small unallocated oid would take the real client's next one
            if oid in pools.current:
                if serial == pools.current[oid]:
                    args[where[1]] = p64(u64(serial) ^ 1)
            else:
                args[where[0]] = p64(r.randrange(FOREIGN_OID_MIN, 1 << 64))
    elif name == "AskBeginTransaction" and type(args[0]) is bytes and pools.current:
        # an imposed TID is accepted if greater than the last one, and every
        # later TID comes after it: one far ahead (or beyond 64 bits,
        # finding 6) and the cluster cannot commit any more
        if args[0] > max(pools.current.values()):
            args[0] = None
    elif name == "AskFinishTransaction" and type(args[1]) is list:
        # the master takes any oid listed as allocated (finding 11): one
        # near 2**64 and it cannot allocate oids any more
        args[1] = [oid for oid in args[1] if type(oid) is not bytes or len(oid) != 8
                   or u64(oid) < FOREIGN_OID_MIN or oid in pools.fuzz_oids]
    elif name == "FailedVote":
        # the master closes the connection of any node listed (finding 5):
        # listing the cluster's own nodes takes storages and clients out
        args[1] = [nid for nid in args[1] if nid not in real_nids]
    elif role == "admin":
        if name == "SetClusterState" and args[0] is ClusterStates.STOPPING:
            args[0] = ClusterStates.RUNNING
        elif name == "SetNodeState" and args[1] in (NodeStates.DOWN, NodeStates.UNKNOWN) \
                and (args[0] in real_nids or -0x30 << 24 <= args[0] < 1 << 24):
            # any nid a node of the cluster may have, known yet or not
            args[1] = NodeStates.RUNNING
        elif name == "TweakPartitionTable":
            args[0] = True
        elif name == "SetNumReplicas" and 0 <= args[0] < 2**31:
            args[0] = 1
    return args


# ---------------------------------------------------------------------------
# Sessions

class SessionClosed(Exception):
    pass


class Session:
    """A raw protocol-5 connection: pipelined sends, reads with a timeout."""

    def __init__(self, address: tuple[str, int], pools: Pools | None = None) -> None:
        self.address = address
        self.pools = pools
        self.sock = socket.create_connection(address, timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(HANDSHAKE)
        self.decoder = Decoder()
        self.head = b""
        self.next_id = 0
        self.closed = False
        self.answers: dict[int, tuple[Any, tuple]] = {}
        self.notifications: list[tuple[Any, tuple]] = []
        self.sent = 0
        # AcceptIdentification's arguments; for a client of the master,
        # its nid and id_timestamp (which its storages check)
        self.accepted: tuple = ()
        self.nid: int | None = None
        self.id_timestamp: float | None = None

    def frame(self, packet_or_code: Any, args: Any) -> tuple[int, bytes]:
        code = packet_or_code if type(packet_or_code) is int else packet_or_code.code
        msg_id = self.next_id
        self.next_id = (self.next_id + 1) & 0xFFFFFFFF
        return msg_id, encode(msg_id, code, args)

    def send(self, data: bytes, count: int = 1) -> None:
        if self.closed:
            raise SessionClosed("closed")
        try:
            self.sock.sendall(data)
        except OSError as e:
            self.closed = True
            raise SessionClosed(str(e)) from None
        self.sent += count

    def _read(self, timeout: float) -> bool:
        """Read what is there (waiting up to ``timeout``); False once closed."""
        if self.closed:
            return False
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return True
        try:
            data = self.sock.recv(1 << 20)
        except OSError as e:
            if e.errno not in (errno.ECONNRESET, errno.EPIPE):
                raise
            data = b""
        if not data:
            self.closed = True
            return False
        if len(self.head) < len(HANDSHAKE):
            need = len(HANDSHAKE) - len(self.head)
            self.head += data[:need]
            data = data[need:]
            if len(self.head) == len(HANDSHAKE) and self.head != HANDSHAKE:
                raise ProtocolError("bad handshake from node: %r" % self.head)
        if data:
            self.decoder.feed(data)  # a node sending malformed data is a finding
            for msg_id, code, args in self.decoder:
                packet = PACKETS[code]
                if packet.is_answer:
                    self.answers[msg_id] = (packet, args)
                    if self.pools is not None:
                        self.pools.learn(packet.name, args)
                else:
                    self.notifications.append((packet, args))
                    del self.notifications[:-100]
        return True

    def wait_answer(self, msg_id: int, timeout: float) -> tuple[Any, tuple] | None:
        """The answer to ``msg_id``; None if the node closed first.
        TimeoutError if it neither answers nor closes in time."""
        deadline = time.monotonic() + timeout
        while msg_id not in self.answers:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer to message %d from %s:%s within %g s" % (
                    msg_id, *self.address, timeout))
            if not self._read(min(left, 1.0)):
                return None
        return self.answers.pop(msg_id)

    def call(self, packet: Any, *args: Any, timeout: float = 10.0) -> tuple:
        msg_id, data = self.frame(packet, args)
        self.send(data)
        got = self.wait_answer(msg_id, timeout)
        if got is None:
            raise SessionClosed("closed by %s:%s instead of answering %s" % (
                *self.address, packet.name))
        answer, result = got
        if answer is Packets.Error:
            raise SessionClosed("%s refused: %r" % (packet.name, result))
        return result

    def barrier(self, timeout: float) -> bool:
        """Ping: True once everything sent before was processed, False if
        the node closed the connection; TimeoutError if it did neither."""
        if self.closed:
            return False
        msg_id, data = self.frame(Packets.Ping, ())
        try:
            self.send(data, 0)
        except SessionClosed:
            return False
        got = self.wait_answer(msg_id, timeout)
        self.answers.clear()  # answers delayed behind a lock come later, or never
        return got is not None

    def wait_closed(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not self._read(min(0.2, deadline - time.monotonic())):
                    return True
            except ProtocolError:
                return True
        return False

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass


def identify_client(address: tuple[str, int], name: bytes, pools: Pools | None,
                    nid: int | None = None, id_timestamp: float | None = None) -> Session:
    """A session identified as a CLIENT (to the master, or with the nid
    and id_timestamp the master gave, to a storage)."""
    s = Session(address, pools)
    try:
        s.accepted = s.call(Packets.RequestIdentification, NodeTypes.CLIENT, nid, None, name,
                            id_timestamp, {})
    except BaseException:
        s.close()
        raise
    return s


def own_entry(session: Session, nid: int, timeout: float = 10.0) -> tuple:
    """This client's (type, address, nid, state, id_timestamp) as the
    master announced it, and the storages' entries."""
    deadline = time.monotonic() + timeout
    while True:
        for packet, args in session.notifications:
            if packet is Packets.NotifyNodeInformation:
                for entry in args[1]:
                    if entry[2] == nid:
                        return entry
        if time.monotonic() > deadline:
            raise TimeoutError("the master did not announce node %d" % nid)
        if not session._read(0.2):
            raise SessionClosed("master closed the session")


def object_record(answer: tuple) -> tuple[bytes, bytes]:
    """(serial, data) of an AnswerObject, data decompressed."""
    _, serial, _, compression, checksum, data, _ = answer
    if checksum == ZERO_HASH and not data:
        return serial, b""
    return serial, zlib.decompress(data) if compression else data



_RECORD = re.compile(r"error handling (.+?) from (\S+)$|error handling (loss of \S+)$")
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|error)\b.*)$")


def log_problems(logfile: str, offset: int = 0) -> list[tuple[str, str, str]]:
    """(what was handled, the exception line, the record) of every
    traceback a node logged from ``offset`` on; also "Traceback" lines
    outside such records."""
    with open(logfile, "rb") as f:
        f.seek(offset)
        lines = f.read().decode("utf-8", "replace").splitlines()
    found = []
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _RECORD.search(line)
        if m or line.startswith("Traceback"):
            what = (m.group(1) or m.group(3)) if m else line
            j = i + 1
            exception = "?"
            while j < len(lines) and not _TIMESTAMP.match(lines[j]):
                e = _EXCEPTION.match(lines[j])
                if e:
                    exception = e.group(1)
                j += 1
            found.append((what, exception, "\n".join(lines[i:j])))
            i = j
        else:
            i += 1
    return found


_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
