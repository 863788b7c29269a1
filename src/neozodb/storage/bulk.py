"""A storage's side of a bulk copy (feature bulk-copy, client/bulk.py), a
mixin of the client handler: the vote of many transactions copied with
their TIDs, all written in one durable point.

Each transaction of the batch gets its own ``ttrans``/``tobj`` rows under
its own TID as TTID (a batch's TIDs come after everything the cluster has,
so none is another transaction's TTID), and the batch is one transaction
for the locks (storage/transactions.py: ``subs``, ``serials``), the
master's lock, unlock and abort, which apply to every transaction in it.
After a crash each of them is a transaction locked (or only voted) like
any other, which verification commits (or drops) one by one.

A batch is voted only while every partition it writes to (its objects' and
its transactions' metadata) has the same cells, all UP_TO_DATE, one of them
ours: each storage that votes it then holds all of it, so whichever locks
it first has every one of its transactions, and verification never commits
a part of it without the rest (docs/design.md, "Bulk copy").  Otherwise it
is refused with NOT_READY and the client copies these transactions one by
one.
"""
from __future__ import annotations

import hashlib

from neozodb.net.connection import HandlerError
from neozodb.protocol import ZERO_HASH, ZERO_TID, ErrorCodes, Packets, ProtocolError, u64
from neozodb.protocol.blobs import BLOB_FLAG
from neozodb.protocol.features import BULK_COPY
from neozodb.protocol.values import check_compression, check_id
from neozodb.storage.writes import Retry


def _checked(app, ttid: bytes, txns) -> tuple[dict, set]:
    """Every value of an AskBulkVote checked: (oid -> TID of its last
    revision in the batch, partitions written)."""
    last = check_id(ttid, "ttid")
    if not txns:
        raise ProtocolError("bulk copy %s without transactions" % ttid.hex())
    partition = app.pt.partition
    serials: dict[bytes, bytes] = {}
    partitions = set()
    previous = 0
    for tid, _, _, _, records in txns:
        n = check_id(tid, "TID")
        if n <= previous:
            raise ProtocolError("bulk copy %s: TIDs not in order" % ttid.hex())
        previous = n
        partitions.add(partition(tid))
        if len({record[0] for record in records}) != len(records):
            raise ProtocolError("bulk copy %s: an object twice in %s" % (ttid.hex(), tid.hex()))
        for oid, compression, checksum, data, data_serial in records:
            check_id(oid, "oid")
            if data_serial is not None:
                check_id(data_serial, "data serial")
            if not (checksum == ZERO_HASH and not data):
                if compression & BLOB_FLAG:
                    raise ProtocolError("bulk copy %s: blob record of %s" % (
                        ttid.hex(), oid.hex()))
                check_compression(compression)
                if len(checksum) != 20 or hashlib.sha1(data).digest() != checksum:
                    raise ProtocolError("wrong checksum for %s in %s" % (oid.hex(), tid.hex()))
            serials[oid] = tid
            partitions.add(partition(oid))
    if previous != last:
        raise ProtocolError("bulk copy %s does not end with its TTID" % ttid.hex())
    return serials, partitions


class BulkWrites:
    """ClientHandler's bulk votes (see the module docstring)."""

    def AskBulkVote(self, conn, msg_id, ttid, txns):
        app = self.app
        if BULK_COPY not in conn.peer_features:
            raise ProtocolError("unexpected AskBulkVote")
        self._writable(Packets.AskBulkVote)
        serials, partitions = _checked(app, ttid, txns)
        if ttid in app.locks.aborted:
            raise HandlerError("transaction %s was aborted" % ttid.hex(), ErrorCodes.DENIED)
        if ttid in app.locks.txns:
            raise ProtocolError("bulk copy %s voted twice" % ttid.hex())
        nids = app.pt.same_cells(partitions)
        if nids is None or app.nid not in nids:
            raise HandlerError(
                "bulk copy %s refused: its partitions are not all on the same storages,"
                " UP_TO_DATE" % ttid.hex(), ErrorCodes.NOT_READY)
        # all its locks or none: waiting, it holds none (nor is it known
        # here), so it is never part of a deadlock
        if app.locks.acquire_all(ttid, serials) is not None:
            app.delay(ttid, Retry(self, conn, msg_id, Packets.AskBulkVote, (ttid, txns)))
            return
        txn = app.locks.get(ttid, conn.nid, conn)
        txn.held.update(serials)
        txn.subs = [u64(tid) for tid, _, _, _, _ in txns]
        txn.serials = serials
        txn.objects = dict.fromkeys(serials, (ZERO_TID, None, None))
        try:
            self._write_bulk(txns)
        except BaseException:
            app.abort(ttid)
            raise
        txn.voted = True
        app.group_sync.answer_on(conn, msg_id, Packets.AnswerBulkVote)

    def _write_bulk(self, txns) -> None:
        """The rows of every transaction of the batch, in one commit."""
        backend = self.app.backend
        data_ids = iter(backend.store_data_many([
            (checksum, compression, data, u64(oid))
            for _, _, _, _, records in txns
            for oid, compression, checksum, data, _ in records
            if not (checksum == ZERO_HASH and not data)]))
        last = len(txns) - 1
        with backend.sync_later():
            for i, (tid, user, description, ext, records) in enumerate(txns):
                objects = [(u64(oid),
                            None if checksum == ZERO_HASH and not data else next(data_ids),
                            None if data_serial is None else u64(data_serial))
                           for oid, _, checksum, data, data_serial in records]
                meta = ([oid for oid, _, _ in objects], user, description, ext, False)
                backend.store_transaction(u64(tid), objects, meta, None, durable=i == last)
