"""Helpers of the security tests: clients of a real cluster that speak the
protocol message by message (through a real client's connections, so they
are identified like any client), and a recording handler for raw ones."""
from __future__ import annotations

import hashlib
import threading

from neozodb.client import Storage
from neozodb.protocol import Packets

TIMEOUT = 10


class Recorder:
    """Handler of a raw ThreadedConnection: every message received is
    kept in ``messages`` as (packet name, args); ``reply(conn, msg_id,
    packet, args)`` may answer it."""

    def __init__(self, reply=None) -> None:
        self.reply = reply
        self.messages: list[tuple[str, tuple]] = []
        self.changed = threading.Condition()
        self.lost = False

    def dispatch(self, conn, msg_id, packet, args) -> None:
        with self.changed:
            self.messages.append((packet.name, args))
            self.changed.notify_all()
        if self.reply is not None:
            self.reply(conn, msg_id, packet, args)

    def connection_lost(self, conn) -> None:
        with self.changed:
            self.lost = True
            self.changed.notify_all()

    def names(self) -> list[str]:
        with self.changed:
            return [name for name, _ in self.messages]

    def wait(self, condition, timeout: float = 30.0, what: str = "condition") -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: condition(self), timeout):
                raise TimeoutError("timed out waiting for " + what)


class Client:
    """A real client of ``cluster``, whose connections send what a test
    says, message by message."""

    def __init__(self, cluster) -> None:
        self.storage = Storage(cluster.masters, cluster.name)
        self.app = self.storage.app

    def close(self) -> None:
        self.storage.close()

    @property
    def master(self):
        return self.app.get_master()

    def conn(self, nid: int):
        return self.app.storage_conn(nid)

    def cells(self, oid_or_tid: bytes) -> list[int]:
        return self.app.writable_cells(oid_or_tid)

    def begin(self, tid: bytes | None = None) -> bytes:
        (ttid,) = self.master.call(Packets.AskBeginTransaction, tid, timeout=TIMEOUT)
        return ttid

    def store(self, ttid: bytes, oid: bytes, data: bytes, serial: bytes = bytes(8),
              compression: int = 0, data_serial: bytes | None = None) -> None:
        checksum = hashlib.sha1(data).digest()
        for nid in self.cells(oid):
            (conflict,) = self.conn(nid).call(Packets.AskStoreObject, oid, serial, compression,
                                              checksum, data, data_serial, ttid, timeout=TIMEOUT)
            assert conflict is None, conflict

    def vote(self, ttid: bytes, oids: list[bytes]) -> list[int]:
        """Vote on every storage involved; returns their nids."""
        meta = set(self.cells(ttid))
        others = {nid for oid in oids for nid in self.cells(oid)} - meta
        for nid in sorted(meta):
            self.conn(nid).call(Packets.AskStoreTransaction, ttid, b"user", b"desc", b"",
                                oids, None, timeout=TIMEOUT)
        for nid in sorted(others):
            self.conn(nid).call(Packets.AskVoteTransaction, ttid, timeout=TIMEOUT)
        return sorted(meta | others)

    def finish(self, ttid: bytes, oids: list[bytes]) -> bytes:
        _, tid = self.master.call(Packets.AskFinishTransaction, ttid, oids, [], [], None,
                                  timeout=TIMEOUT)
        return tid

    def new_oid(self) -> bytes:
        return self.storage.new_oid()


def load(cluster, oid: bytes) -> bytes:
    """The current data of ``oid``, read by a fresh client."""
    storage = Storage(cluster.masters, cluster.name)
    try:
        data, _ = storage.load(oid)
        return data
    finally:
        storage.close()


def commit_one(cluster, data: bytes, oid: bytes | None = None) -> tuple[bytes, bytes]:
    """An ordinary commit by a real client through ZODB's storage API:
    (oid, tid)."""
    from ZODB.Connection import TransactionMetaData
    storage = Storage(cluster.masters, cluster.name)
    try:
        oid = oid or storage.new_oid()
        try:
            _, serial = storage.load(oid)
        except KeyError:
            serial = bytes(8)
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        storage.store(oid, serial, data, "", txn)
        storage.tpc_vote(txn)
        tid = storage.tpc_finish(txn)
        return oid, tid
    finally:
        storage.close()


def huge(prefix: int = 0xFF) -> bytes:
    """An 8-byte id beyond 63 bits."""
    return bytes((prefix,)) + b"\xff" * 7
