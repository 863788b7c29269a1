"""Packet handlers of a storage node: from the master and from clients."""
from __future__ import annotations

import logging
import time
from time import monotonic
from typing import TYPE_CHECKING

from neozodb.net.bootstrap import FollowsPrimary
from neozodb.net.connection import Handler, HandlerError, NotReady
from neozodb.protocol import (
    INVALID_PARTITION,
    MAX_TID,
    CellStates,
    ErrorCodes,
    NodeTypes,
    Packets,
    ProtocolError,
    p64,
    u64,
)
from neozodb.protocol.features import BLOB, FEATURES, greet
from neozodb.protocol.values import (
    LIST_CAP,
    MAX_ID,
    check_id,
    check_identification,
    check_request_ids,
)
from neozodb.storage.backends.base import Unsupported
from neozodb.storage.blobs import Blobs, answer_record
from neozodb.storage.bulk import BulkWrites
from neozodb.storage.pack import PAGE_OIDS, wire_order
from neozodb.storage.pt_history import clamped, packed_up_to
from neozodb.storage.undo import undo_serials
from neozodb.storage.writes import Retry, Writes

if TYPE_CHECKING:
    from neozodb.storage.app import StorageApp

log = logging.getLogger("neozodb.storage")

# AskTIDs reads every TID up to its offset: the undo log is not browsed
# further back than this (ZODB's undoLog pages are tens of entries)
MAX_UNDO_OFFSET = 1000000


def _p64(value: int | None) -> bytes | None:
    return None if value is None else p64(value)


class BaseHandler(Handler):
    def __init__(self, app: StorageApp) -> None:
        self.app = app

    def dispatch(self, conn, msg_id, packet, args):
        self.app.last_request = time.monotonic()  # background work yields to requests
        try:
            super().dispatch(conn, msg_id, packet, args)
        except Unsupported as e:
            # e.g. an Importer asked to list what it has not imported yet
            raise HandlerError(str(e), ErrorCodes.BACKEND_NOT_IMPLEMENTED) from None

    def Ping(self, conn, msg_id):
        conn.answer(msg_id, Packets.Pong)


class MasterHandler(FollowsPrimary, BaseHandler):
    """Everything the primary master tells or asks a storage."""

    def dispatch(self, conn, msg_id, packet, args) -> None:
        self.app.activity += 1  # commits go through here too: pack yields (storage/pack.py)
        super().dispatch(conn, msg_id, packet, args)

    def NotifyNodeInformation(self, conn, msg_id, timestamp, entries):
        app = self.app
        for node in app.nm.update(entries):
            app.node_changed(node)
        app.replay()

    def NotifyClusterInformation(self, conn, msg_id, state):
        pass

    def SendPartitionTable(self, conn, msg_id, ptid, replicas, rows):
        self.app.set_pt(ptid, replicas, rows)

    def NotifyPartitionChanges(self, conn, msg_id, ptid, replicas, changes):
        try:
            self.app.change_pt(ptid, replicas, changes)
        except ValueError as e:
            raise ProtocolError(str(e)) from None

    def AskRecovery(self, conn, msg_id):
        app = self.app
        pt = app.pt
        conn.answer(msg_id, Packets.AnswerRecovery, pt.ptid if pt else None, None,
                    _p64(app.backend.get_truncate_tid()))

    def Truncate(self, conn, msg_id, tid):
        """Persist a truncation; it is applied when verification asks our
        last ids (or, if we miss verification, when operation starts)."""
        self.app.set_truncation(u64(tid))
        conn.ack(msg_id)

    def AskPartitionHistory(self, conn, msg_id):
        """Our readable partitions in the tables we were given (feature
        ``older-pt``, storage/pt_history.py): with a truncation pending,
        nothing after its TID counts (verification deletes it)."""
        app = self.app
        ptid = app.pt.ptid if app.pt is not None else None
        entries = [e for e in app.pt_history.report() if ptid is not None and e.ptid <= ptid]
        pending = app.backend.get_truncate_tid()
        if pending is not None:
            entries = clamped(entries, pending)
        conn.answer(msg_id, Packets.AnswerPartitionHistory, ptid,
                    [(e.ptid, _p64(e.end), sorted(e.readable)) for e in entries],
                    _p64(packed_up_to(app.backend, app.assigned_partitions())))

    def AskPartitionTable(self, conn, msg_id):
        pt = self.app.pt
        if pt is None:
            raise HandlerError("no partition table", ErrorCodes.NOT_READY)
        rows = [[(nid, CellStates(state)) for nid, state in row] for row in pt.rows()]
        conn.answer(msg_id, Packets.AnswerPartitionTable, pt.ptid, pt.num_replicas, rows)

    def AskLockedTransactions(self, conn, msg_id):
        self.app.verified = True
        locked = self.app.backend.get_locked_transactions()
        self.app.group_sync.answer(conn.answer, msg_id, Packets.AnswerLockedTransactions,
                                   {p64(ttid): _p64(tid) for ttid, tid in locked.items()})

    def AskFinalTID(self, conn, msg_id, ttid):
        self.app.group_sync.answer(conn.answer, msg_id, Packets.AnswerFinalTID,
                                   _p64(self.app.backend.get_final_tid(u64(ttid))))

    def ValidateTransaction(self, conn, msg_id, ttid, tid):
        app = self.app
        app.backend.validate_transaction(u64(ttid), u64(tid))
        # locked under the previous master and never unlocked: its read
        # locks would hold back loads of its objects forever
        if app.locks.finish(ttid) is not None:
            app.replay()

    def AskLastIDs(self, conn, msg_id):
        self.app.apply_truncation()
        backend = self.app.backend
        last_tid, last_oid = backend.last_ids(self.app.assigned_partitions())
        first = backend.first_tid()
        conn.answer(msg_id, Packets.AnswerLastIDs, _p64(last_tid), _p64(last_oid),
                    p64(first or 0))

    def StartOperation(self, conn, msg_id, backup):
        self.app.start_operation(conn)

    def StopOperation(self, conn, msg_id):
        self.app.stop_operation()

    def AskLockInformation(self, conn, msg_id, ttid, tid, pack):
        app = self.app
        if ttid in app.locks.aborted and ttid not in app.locks.txns:
            # it was here and is gone: saying "locked" would let the master
            # report a commit whose data no storage has
            log.error("%s: lock of %s (tid %s) refused: the transaction was aborted here",
                      app.label, ttid.hex(), tid.hex())
            raise HandlerError("transaction %s was aborted on %s" % (ttid.hex(), app.label),
                               ErrorCodes.DENIED, close=False)
        txn = app.locks.txns.get(ttid)
        if txn is None or not txn.voted:
            # Never voted here (a client that skipped us, or a cell we got
            # after its stores): our copy would silently lack it.  Refused,
            # the master commits only if other storages hold every part
            # and has our cells replicated again.
            log.error("%s: lock of %s (tid %s) refused: the transaction was %s here",
                      app.label, ttid.hex(), tid.hex(),
                      "never stored" if txn is None else "not voted")
            raise HandlerError("transaction %s was not voted on %s" % (ttid.hex(), app.label),
                               ErrorCodes.DENIED, close=False)
        if txn.subs is not None and tid != ttid:
            raise HandlerError("bulk copy %s locked as %s" % (ttid.hex(), tid.hex()),
                               ErrorCodes.DENIED, close=False)
        app.locks.lock(ttid, tid)
        with app.backend.sync_later():
            if txn.subs is None:
                app.backend.lock_transaction(u64(ttid), u64(tid), pack)
            else:
                app.backend.lock_bulk(txn.subs)
        app.group_sync.answer_on(conn, msg_id, Packets.AnswerInformationLocked, ttid)
        # stores based on its revisions may take their locks now (nothing
        # was released: the replicator has nothing new to wait for)
        app.replay(poke=False)

    def AskPackOrders(self, conn, msg_id, min_tid):
        """The master rebuilds its list of pack orders (verification), or
        learns the details of a new one."""
        orders = self.app.backend.get_pack_orders(u64(min_tid), max_oids=PAGE_OIDS)
        conn.answer(msg_id, Packets.AnswerPackOrders, [wire_order(o) for o in orders])

    def NotifyPackSigned(self, conn, msg_id, approved, rejected):
        app = self.app
        for tids, flag in ((approved, True), (rejected, False)):
            if tids:
                app.backend.sign_pack_orders([u64(t) for t in tids], flag)
                app.pending_written()
        app.packer.signed(approved, rejected)

    def NotifyUnlockInformation(self, conn, msg_id, ttid):
        app = self.app
        app.serials.clear()  # none is expected here; none may outlive a commit
        txn = app.locks.finish(ttid)
        if txn is not None and txn.tid is not None:
            if txn.subs is None:
                app.backend.unlock_transaction(u64(ttid), u64(txn.tid))
            else:
                for sub in txn.subs:
                    app.backend.unlock_transaction(sub, sub)
            app.pending_written(len(txn.objects))
        app.replay()

    def AbortTransaction(self, conn, msg_id, ttid, nids):
        self.app.abort(ttid)
        # NEO's master tells a storage waiting for the end of this
        # transaction (it was unfinished when the replication asked) only
        # this: without it the cell waited for good and stayed OUT_OF_DATE
        self.app.replicator.transaction_finished(ttid, None)

    def NotifyRepair(self, conn, msg_id, dry_run):
        """`neoctl prune_orphan`: delete the data rows no revision uses."""
        app = self.app
        if dry_run:
            log.info("%s: prune_orphan dry run: nothing deleted", app.label)
            return
        log.info("%s: prune_orphan: %d data rows deleted", app.label, app.backend.prune_orphans())

    def CheckPartition(self, conn, msg_id, partition, source, min_tid, max_tid):
        app = self.app
        if not 0 <= partition < app.pt.num_partitions:
            raise ProtocolError("invalid partition %r" % partition)
        check_id(min_tid, "min_tid")
        check_id(max_tid, "max_tid")
        app.checker.check(partition, source, min_tid, max_tid)

    def NotifyTransactionFinished(self, conn, msg_id, ttid, max_tid):
        # A transaction our replication waited for is over.  If it is not
        # locked here, the master committed (or dropped) it without us in
        # its lock phase: NEO's master involves the storages that were
        # ready when the transaction began, and we became ready after.  Its
        # stores in our OUT_OF_DATE cells, voted here lockless, would never
        # be locked nor unlocked, and kept those cells from being reported
        # (lockless_pending) for good: they go, replication brings the
        # commit (its tid raises the target), as NEO's storage does.  One
        # locked here is not touched (abort skips it): its unlock comes
        # before this message.
        app = self.app
        txn = app.locks.txns.get(ttid)
        if txn is not None and not txn.locked:
            log.info("%s: transaction %s finished (tid %s) without being locked here: what it"
                     " stored here is dropped, replication brings it", app.label, ttid.hex(),
                     max_tid.hex() if max_tid is not None else None)
        app.abort(ttid)
        app.replicator.transaction_finished(ttid, max_tid)

    def connection_lost(self, conn) -> None:
        pass  # the master cycle notices through the connection's closed future


class IdentificationHandler(BaseHandler):
    def RequestIdentification(self, conn, msg_id, node_type, nid, address, name, id_timestamp, extra):
        app = self.app
        # once per connection (a delayed one is replayed with its msg_id)
        first = getattr(conn, "identification", None)
        if first is not None and first != msg_id:
            raise ProtocolError("identification already requested on this connection")
        conn.identification = msg_id
        if name != app.name_bytes:
            # PROTOCOL_ERROR: answered, then the connection closes; the
            # name is not told back
            log.warning("%s: refused %s: wrong cluster name", app.label, conn.peer)
            raise HandlerError("wrong cluster name", ErrorCodes.PROTOCOL_ERROR)
        check_identification(node_type, nid, address, id_timestamp, extra)
        if not app.operational:
            raise NotReady("storage is not operational")
        if node_type not in (NodeTypes.CLIENT, NodeTypes.STORAGE):
            raise HandlerError("%s nodes are not served" % node_type.name, ErrorCodes.PROTOCOL_ERROR)
        node = app.nm.get(nid)
        if node is None or node.id_timestamp != id_timestamp:
            if node is not None and id_timestamp is not None and node.id_timestamp is not None \
                    and id_timestamp < node.id_timestamp:
                raise NotReady("unknown by master")
            # the master's notification about this client may still be on its way
            app.delay(b"", Retry(self, conn, msg_id, Packets.RequestIdentification, (
                node_type, nid, address, name, id_timestamp, extra)))
            return
        conn.nid = nid
        conn.node = node
        if node_type is NodeTypes.STORAGE:
            if node.type is not NodeTypes.STORAGE or nid == app.nid:
                raise HandlerError("%s is not another storage" % node.label, ErrorCodes.PROTOCOL_ERROR)
            conn.handler = app.source_handler()
            app.source_conns.add(conn)
        else:
            conn.handler = ClientHandler(app)
            app.client_conns.add(conn)
        greet(conn, extra, FEATURES if app.backend.blobs else FEATURES - {BLOB})
        conn.answer(msg_id, Packets.AcceptIdentification, NodeTypes.STORAGE, app.nid, nid)


# reads whose every 8-byte argument is an OID or a TID (storage/writes.py
# checks the writes field by field)
_READS_OF_IDS = frozenset(p.code for p in (
    Packets.AskObject, Packets.AskFinalTID, Packets.AskObjectHistory,
    Packets.AskTransactionInformation, Packets.AskTIDsFrom, Packets.AskOIDsFrom,
    Packets.AskObjectUndoSerial))


class ClientHandler(Writes, BulkWrites, Blobs, BaseHandler):
    # a burst of stores: their oids' serials looked up together (writes.py)
    batched = Packets.AskStoreObject

    def dispatch(self, conn, msg_id, packet, args) -> None:
        # BaseHandler's and Handler's dispatch in one frame: every store
        # and load of every client comes through here
        app = self.app
        app.activity += 1  # pack yields to clients (storage/pack.py)
        app.last_request = monotonic()  # background work yields to requests
        code = packet.code
        if code in _READS_OF_IDS:
            check_request_ids(packet.name, args)
        name = self._table.get(code)
        if name is None:
            raise ProtocolError(f"unexpected packet {packet.name}")
        try:
            getattr(self, name)(conn, msg_id, *args)
        except Unsupported as e:
            raise HandlerError(str(e), ErrorCodes.BACKEND_NOT_IMPLEMENTED) from None

    def connection_lost(self, conn) -> None:
        app = self.app
        app.client_conns.discard(conn)
        # transactions that did not vote cannot finish without this connection
        for txn in app.locks.connection_transactions(conn):
            if not txn.voted:
                app.abort(txn.ttid)

    # -- reads ---------------------------------------------------------------------------
    def AskObject(self, conn, msg_id, oid, at, before):
        app = self.app
        if at is not None and before is not None:
            raise ProtocolError("AskObject with both a serial and a before TID")
        partition = app.pt.partition(oid)
        if not app.readable(partition):
            conn.error(msg_id, ErrorCodes.NON_READABLE_CELL, "partition %d not readable here" % partition)
            return
        if oid in app.locks.read_locks:
            app.delay(b"", Retry(self, conn, msg_id, Packets.AskObject, (oid, at, before)))
            return
        found = app.backend.get_object(u64(oid), None if at is None else u64(at),
                                       None if before is None else u64(before))
        if found is None:
            conn.error(msg_id, ErrorCodes.OID_DOES_NOT_EXIST, "%s does not exist" % oid.hex())
        elif found is False:
            conn.error(msg_id, ErrorCodes.OID_NOT_FOUND, "%s not found" % oid.hex())
        else:
            serial, next_serial, compression, checksum, data, data_serial = found
            compression, checksum, data = answer_record(conn, compression, checksum, data)
            conn.answer(msg_id, Packets.AnswerObject, oid, p64(serial), _p64(next_serial),
                        compression, checksum, data, _p64(data_serial))

    def AskFinalTID(self, conn, msg_id, ttid):
        self.app.group_sync.answer(conn.answer, msg_id, Packets.AnswerFinalTID,
                                   _p64(self.app.backend.get_final_tid(u64(ttid))))

    def AskObjectHistory(self, conn, msg_id, oid, first, last):
        app = self.app
        if not app.readable(app.pt.partition(oid)):
            raise HandlerError("partition not readable here", ErrorCodes.NON_READABLE_CELL)
        if not 0 <= first < last or first > MAX_ID:  # an SQL offset: 63 bits
            raise ProtocolError("invalid history range")
        last = min(last, first + LIST_CAP)
        if oid in app.locks.read_locks:
            # a commit of it is between lock and unlock: wait, so that
            # whoever was told about the commit sees it
            app.delay(b"", Retry(self, conn, msg_id, Packets.AskObjectHistory, (oid, first, last)))
            return
        history = app.backend.get_object_history(u64(oid), first, last - first)
        if history is None:
            raise HandlerError("%s does not exist" % oid.hex(), ErrorCodes.OID_DOES_NOT_EXIST)
        conn.answer(msg_id, Packets.AnswerObjectHistory, oid,
                    [(p64(serial), size) for serial, size in history])

    def AskTransactionInformation(self, conn, msg_id, tid):
        app = self.app
        if not app.readable(app.pt.partition(tid)):
            raise HandlerError("partition not readable here", ErrorCodes.NON_READABLE_CELL)
        found = app.backend.get_transaction(u64(tid))
        if found is None and any(u64(tid) in t.tids() for t in app.locks.txns.values()):
            app.delay(b"", Retry(self, conn, msg_id, Packets.AskTransactionInformation, (tid,)))
            return
        if found is None:
            raise HandlerError("%s not found" % tid.hex(), ErrorCodes.TID_NOT_FOUND)
        oids, user, description, ext, packed, _ = found
        conn.answer(msg_id, Packets.AnswerTransactionInformation, tid, user, description, ext,
                    packed, [p64(oid) for oid in oids])

    # -- iteration and undo ----------------------------------------------------------------
    def _readable_partition(self, partition: int) -> None:
        app = self.app
        if not 0 <= partition < app.pt.num_partitions:
            raise ProtocolError("invalid partition %r" % partition)
        if not app.readable(partition):
            raise HandlerError("partition %d not readable here" % partition,
                               ErrorCodes.NON_READABLE_CELL)

    def _locked_tids(self, partitions, min_tid: int = 0, max_tid: int = u64(MAX_TID)) -> list[int]:
        """Transactions locked here but not unlocked yet, in ``partitions``:
        they are committed (the lock is the commit point) and their clients
        may already have been told so, but they are not in ``trans`` yet.
        Their metadata and objects are read-locked: requests about them
        wait for the unlock."""
        pt = self.app.pt
        return [tid for t in self.app.locks.txns.values() for tid in t.tids()
                if min_tid <= tid <= max_tid and pt.partition(tid) in partitions]

    def AskTIDs(self, conn, msg_id, first, last, partition):
        """Committed TIDs, newest first, [first:last] (undo log)."""
        app = self.app
        if not 0 <= first <= last <= MAX_UNDO_OFFSET:
            raise ProtocolError("invalid TID range %r-%r" % (first, last))
        last = min(last, first + LIST_CAP)
        if partition == INVALID_PARTITION:
            partitions = set(app.pt.partitions_of(app.nid, readable=True))
        else:
            self._readable_partition(partition)
            partitions = {partition}
        tids = app.backend.get_tids(0, last, partitions)
        locked = self._locked_tids(partitions)
        if locked:
            tids = sorted(set(tids).union(locked), reverse=True)
        conn.answer(msg_id, Packets.AnswerTIDs, [p64(tid) for tid in tids[first:last]])

    def AskTIDsFrom(self, conn, msg_id, min_tid, max_tid, length, partition):
        """Committed TIDs of a partition from min_tid to max_tid, ascending
        (iteration)."""
        self._readable_partition(partition)
        if length <= 0:
            raise ProtocolError("invalid length %r" % length)
        length = min(length, LIST_CAP)
        low, high = u64(min_tid), u64(max_tid)
        tids = self.app.backend.get_tids_from(low, high, length, [partition])
        locked = self._locked_tids({partition}, low, high)
        if locked:
            tids = sorted(set(tids).union(locked))[:length]
        conn.answer(msg_id, Packets.AnswerTIDsFrom, [p64(tid) for tid in tids])

    def AskOIDsFrom(self, conn, msg_id, partition, length, min_oid, tid):
        """Objects of a partition that exist at tid, from min_oid."""
        app = self.app
        self._readable_partition(partition)
        if length <= 0:
            raise ProtocolError("invalid length %r" % length)
        length = min(length, LIST_CAP)
        pt = app.pt
        # A transaction locked at or before tid is not in obj yet: wait for
        # its unlock.  Only finitely many can be: new ones get greater TIDs.
        if any(t.low is not None and t.low <= tid and any(pt.partition(o) == partition
                                                          for o in t.objects)
               for t in app.locks.txns.values()):
            app.delay(b"", Retry(self, conn, msg_id, Packets.AskOIDsFrom,
                                 (partition, length, min_oid, tid)))
            return
        oids, next_oid = app.backend.get_oids_from(partition, length, u64(min_oid), u64(tid))
        conn.answer(msg_id, Packets.AnswerOIDsFrom, _p64(next_oid), [p64(oid) for oid in oids])

    def AskObjectUndoSerial(self, conn, msg_id, ttid, ltid, undone_tid, oids):
        """Per oid of an undone transaction: the serial it has now, the one
        to go back to, and whether the undone state is current (undo.py)."""
        app = self.app
        pt = app.pt
        for oid in oids:
            self._readable_partition(pt.partition(oid))
        if any(oid in app.locks.read_locks for oid in oids):
            app.delay(b"", Retry(self, conn, msg_id, Packets.AskObjectUndoSerial,
                                 (ttid, ltid, undone_tid, oids)))
            return
        result = undo_serials(app.backend, app.locks.txns.get(ttid), ttid, ltid, undone_tid, oids)
        conn.answer(msg_id, Packets.AnswerObjectUndoSerial, result)
