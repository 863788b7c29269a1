"""Storage-to-storage connections: a replicating (or checking) node asks a
readable replica for chunks of a partition.

The *source* side (``SourceHandler``) answers ``AskFetchTransactions`` /
``AskFetchObjects`` by streaming ``AddTransaction`` / ``AddObject`` for
what the asker lacks, then the answer (where the chunk ended and what the
asker has that the source does not), and answers the replica checks.  The
*destination* side (``DestinationHandler``) writes what it receives.

The streamed ``AddTransaction`` / ``AddObject`` carry the msg_id of the
fetch they belong to, not one of their own: that is how NEO's replicator
tells them from leftovers of an aborted fetch, and it ignores any other.
We require the same of a source.

Chunk boundaries: both sides list at most ``length`` items from the same
start; the chunk covers up to the smaller of the two last items when a list
is full (beyond it, one side's list says nothing), and the source may end
it earlier when it has sent enough bytes.
"""
from __future__ import annotations

import hashlib
import logging

from neozodb.net.connection import HandlerError
from neozodb.protocol import ZERO_HASH, CellStates, ErrorCodes, Packets, ProtocolError, p64, u64
from neozodb.protocol.blobs import BLOB_FLAG
from neozodb.protocol.features import REPL_BATCH
from neozodb.protocol.values import LIST_CAP

from . import checker
from .blobs import answer_blob_chunk, answer_record, check_replicated
from .handlers import BaseHandler, Retry
from .pack import order_from_wire, wire_order

log = logging.getLogger("neozodb.storage")

#: Bytes of object data after which the source ends a chunk early, so that
#: large objects do not pile up in its output buffer.
CHUNK_BYTES = 4 << 20
#: Records, and bytes of object data, after which an ``AddObjects`` is sent
#: (to a destination with the "repl-batch" feature).
BATCH_RECORDS = 256
BATCH_BYTES = 1 << 20
_MAX_OID = (1 << 64) - 1
_FETCHES = (Packets.AskFetchTransactions, Packets.AskFetchObjects)
_sha1 = hashlib.sha1
_from_bytes = int.from_bytes


def _object_keys(by_serial: dict) -> list[tuple[int, int]]:
    return sorted((u64(serial), u64(oid)) for serial, oids in by_serial.items() for oid in oids)


def _by_serial(keys) -> dict:
    grouped: dict[bytes, list[bytes]] = {}
    for tid, oid in keys:
        grouped.setdefault(p64(tid), []).append(p64(oid))
    return grouped


class SourceHandler(BaseHandler):
    """Requests from another storage node (replication, checks)."""

    def connection_lost(self, conn) -> None:
        self.app.peer_lost(conn)

    def _readable(self, partition: int) -> None:
        app = self.app
        if not 0 <= partition < app.pt.num_partitions:
            raise ProtocolError("invalid partition %d" % partition)
        if not app.readable(partition):
            raise HandlerError("partition %d is not readable on %s" % (partition, app.label),
                               ErrorCodes.REPLICATION_ERROR)

    def _ready(self, conn, msg_id, packet, args) -> bool:
        """Check a fetch request ``(partition, length, min_tid, max_tid,
        ...)``; False if it was delayed: a transaction at or below max_tid
        is locked and not unlocked yet (committed, but not in our tables)."""
        partition, length, _, max_tid = args[:4]
        self._readable(partition)
        if length <= 0:
            raise ProtocolError("bad chunk length")
        if any(t.low is not None and t.low <= max_tid for t in self.app.locks.txns.values()):
            self.app.delay(b"", Retry(self, conn, msg_id, packet, args))
            return False
        return True

    def AskFetchTransactions(self, conn, msg_id, partition, length, min_tid, max_tid, tids,
                             pack_info):
        app = self.app
        if not self._ready(conn, msg_id, Packets.AskFetchTransactions, (
                partition, length, min_tid, max_tid, tids, pack_info)):
            return
        length = min(length, LIST_CAP)  # one request, one bounded answer
        backend = app.backend
        low, high = u64(min_tid), u64(max_tid)
        mine = backend.fetch_tids(partition, length, low, high)
        theirs = [u64(t) for t in tids]
        bound = high
        if len(mine) >= length:
            bound = mine[-1]
        if len(theirs) >= length:
            bound = min(bound, max(theirs))
        have = set(theirs)
        missing = [tid for tid in mine if tid <= bound and tid not in have]
        packs = {}
        if missing:
            packs = {o[0]: o for o in backend.get_pack_orders(missing[0], missing[-1])}
        for tid in missing:
            oids, user, description, ext, packed, ttid = backend.get_transaction(tid)
            pack = packs.get(tid)
            # the pack order, if any, goes with its transaction
            conn.answer(msg_id, Packets.AddTransaction, p64(tid), user, description, ext,
                        packed, p64(ttid), [p64(o) for o in oids],
                        None if pack is None else wire_order(pack)[1:])
        mine_set = set(mine)
        delete = [p64(t) for t in theirs if t <= bound and t not in mine_set]
        completed = None
        if pack_info:
            # the last pack order applied here (NEO's completed pack): the
            # destination learns whether it missed packs
            progress = backend.get_pack_progress(partition)
            if progress is not None and progress[0]:
                completed = p64(progress[0])
        conn.answer(msg_id, Packets.AnswerFetchTransactions,
                    p64(bound + 1) if bound < high else None, delete, completed)

    def AskFetchObjects(self, conn, msg_id, partition, length, min_tid, max_tid, min_oid, objects):
        app = self.app
        if not self._ready(conn, msg_id, Packets.AskFetchObjects, (
                partition, length, min_tid, max_tid, min_oid, objects)):
            return
        length = min(length, LIST_CAP)
        backend = app.backend
        high = u64(max_tid)
        mine = backend.fetch_object_keys(partition, length, u64(min_tid), high, u64(min_oid))
        theirs = _object_keys(objects)
        bound = (high, _MAX_OID)
        if len(mine) >= length:
            bound = mine[-1]
        if len(theirs) >= length:
            bound = min(bound, theirs[-1])
        have = set(theirs)
        wanted = []
        for key in mine:
            if key > bound:
                break
            if key not in have:
                wanted.append(key)
        sent = 0
        batched = REPL_BATCH in conn.peer_features
        batch: list = []
        batch_start = 0
        records = backend.fetch_objects(partition, wanted)
        try:
            for oid, tid, compression, checksum, data, data_serial in records:
                if compression & BLOB_FLAG:
                    compression, checksum, data = answer_record(conn, compression, checksum,
                                                                data)
                record = (p64(oid), p64(tid), compression, checksum, data,
                          None if data_serial is None else p64(data_serial))
                sent += len(data)
                if batched:
                    batch.append(record)
                    if len(batch) >= BATCH_RECORDS or sent - batch_start >= BATCH_BYTES:
                        conn.answer(msg_id, Packets.AddObjects, batch)
                        batch, batch_start = [], sent
                else:
                    conn.answer(msg_id, Packets.AddObject, *record)
                if sent >= CHUNK_BYTES:
                    bound = (tid, oid)
                    break
        finally:
            records.close()
        if batch:
            conn.answer(msg_id, Packets.AddObjects, batch)
        mine_set = set(mine)
        delete = _by_serial(k for k in theirs if k <= bound and k not in mine_set)
        if bound == (high, _MAX_OID):
            next_tid = next_oid = None
        else:
            next_tid, next_oid = p64(bound[0]), p64(bound[1] + 1)
        conn.answer(msg_id, Packets.AnswerFetchObjects, next_tid, next_oid, delete)

    def _checkable(self, partition: int) -> None:
        # CHECKING_ERROR: NEO's checker ignores a REPLICATION_ERROR there
        try:
            self._readable(partition)
        except HandlerError as e:
            raise HandlerError(str(e), ErrorCodes.CHECKING_ERROR) from None

    def AskBlobChunk(self, conn, msg_id, checksum, n):
        answer_blob_chunk(self.app, conn, msg_id, checksum, n)

    # the digests' form depends on the asker (NEO's or ours): checker.py
    def AskCheckTIDRange(self, conn, msg_id, *args):
        self._checkable(args[0])
        if self._ready(conn, msg_id, Packets.AskCheckTIDRange, args):
            partition, length, min_tid, max_tid = args
            conn.answer(msg_id, Packets.AnswerCheckTIDRange, *checker.tid_range_answer(
                self.app.backend, conn.peer_features, partition, length, u64(min_tid),
                u64(max_tid)))

    def AskCheckSerialRange(self, conn, msg_id, *args):
        self._checkable(args[0])
        if self._ready(conn, msg_id, Packets.AskCheckSerialRange, args):
            partition, length, min_tid, max_tid, min_oid = args
            conn.answer(msg_id, Packets.AnswerCheckSerialRange, *checker.serial_range_answer(
                self.app.backend, conn.peer_features, partition, length, u64(min_tid),
                u64(max_tid), u64(min_oid)))


class DestinationHandler(BaseHandler):
    """What a source streams to us while we replicate from it."""

    # NEO's checker asks over the connection we opened to replicate from it
    # (it would not open a second one)
    _readable = SourceHandler._readable
    _ready = SourceHandler._ready
    _checkable = SourceHandler._checkable
    AskCheckTIDRange = SourceHandler.AskCheckTIDRange
    AskCheckSerialRange = SourceHandler.AskCheckSerialRange

    def connection_lost(self, conn) -> None:
        self.app.peer_lost(conn)

    def _replicating(self, conn, msg_id: int, packet, tid_or_oid: bytes) -> tuple[object, int]:
        """(the fetch that ``msg_id`` answers, the partition of ``tid_or_oid``)."""
        app = self.app
        pending = conn.endpoint.pending.get(msg_id)
        if pending is None or pending[0] not in _FETCHES:
            # NEO's replicator drops such data silently: a source that sent
            # it would see its destination reported up to date without it
            raise ProtocolError("%s with msg_id %d answers no fetch in progress" % (
                packet.name, msg_id))
        partition = app.pt.partition(tid_or_oid)
        if app.cell_state(partition) != CellStates.OUT_OF_DATE.value:
            raise ProtocolError("unrequested replication data for partition %d" % partition)
        return pending[1], partition

    # Records are handed to the replicator, which writes each chunk at once
    # when the source's answer ends it.
    def AddTransaction(self, conn, msg_id, tid, user, description, ext, packed, ttid, oids,
                       pack_info):
        fetch, partition = self._replicating(conn, msg_id, Packets.AddTransaction, tid)
        self.app.replicator.transaction_received(
            fetch, partition, (u64(tid), [u64(o) for o in oids], user, description, ext,
                               packed, u64(ttid)),
            None if pack_info is None else order_from_wire(tid, *pack_info))

    def AddObject(self, conn, msg_id, oid, serial, compression, checksum, data, data_serial):
        fetch, partition = self._replicating(conn, msg_id, Packets.AddObject, oid)
        if not (checksum == ZERO_HASH and not data) and hashlib.sha1(data).digest() != checksum:
            raise ProtocolError("wrong checksum for %s at %s from %s" % (
                oid.hex(), serial.hex(), conn.label))
        check_replicated(conn, compression, data)
        self.app.replicator.object_received(
            fetch, partition, (u64(oid), u64(serial), compression, checksum, data,
                               None if data_serial is None else u64(data_serial)))

    def AddObjects(self, conn, msg_id, records):
        if REPL_BATCH not in conn.peer_features or not records:
            raise ProtocolError("unexpected AddObjects")
        fetch, partition = self._replicating(conn, msg_id, Packets.AddObjects, records[0][0])
        np = self.app.pt.num_partitions
        received = []
        for oid, serial, compression, checksum, data, data_serial in records:
            oid_int = _from_bytes(oid, "big")
            if oid_int % np != partition:
                raise ProtocolError("AddObjects mixes partitions")
            if _sha1(data).digest() != checksum and not (checksum == ZERO_HASH and not data):
                raise ProtocolError("wrong checksum for %s at %s from %s" % (
                    oid.hex(), serial.hex(), conn.label))
            check_replicated(conn, compression, data)
            received.append((oid_int, _from_bytes(serial, "big"), compression, checksum, data,
                             None if data_serial is None else _from_bytes(data_serial, "big")))
        self.app.replicator.batch_received(fetch, partition, received)
