"""Bulk copy (feature bulk-copy): many transactions of a copy
(client/copying.py: neomigrate, copyTransactionsFrom), with their TIDs,
committed through one two-phase commit, so that a batch costs each storage
one durable vote and one durable lock instead of two per transaction.

A batch leaves as ``AskBulkBegin(first TID, last TID)`` to the master
(its TTID is the last TID, so the votes follow at once, not waiting for
the answer) and ``AskBulkVote`` to each storage with every transaction and
record; once both answered, ``AskBulkFinish`` gives the master the objects
of each transaction, for other clients' invalidations, and its answer says
the whole batch is committed.  The copy reads and sends the next batch
while a batch is being finished; the master locks a client's imposed
transactions in order (feature ordered-copy), so a batch is never
committed after one that was not.

Only while the batch's partitions (its objects' and its transactions')
have the same cells, all UP_TO_DATE: each storage then holds all of it,
and a crash can never leave a part of it committed without what comes
before (storage/bulk.py; docs/design.md, "Bulk copy").  Otherwise, or when
a storage refuses the vote (its table changed), the caller copies those
transactions one by one.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Any

from ZODB.POSException import StorageTransactionError

from neozodb.client.voting import final_tid, metadata
from neozodb.net.endpoint import ConnectionClosed, RemoteError
from neozodb.net.waiting import wait_any
from neozodb.protocol import ZERO_HASH, ErrorCodes, Packets, nid_str
from neozodb.protocol.features import BULK_COPY

log = logging.getLogger("neozodb.client")

# a batch ends at whichever comes first
BATCH_TRANSACTIONS = 1000
BATCH_BYTES = 4 << 20


@dataclass(eq=False)
class Batch:
    """Transactions read from the source, encoded for AskBulkVote."""

    limit: int = BATCH_TRANSACTIONS  # transactions
    txns: list = field(default_factory=list)  # (tid, user, description, ext, records)
    oids: list = field(default_factory=list)  # (tid, oids) of each, for AskBulkFinish
    copied: list = field(default_factory=list)  # (tid, source transaction, records)
    size: int = 0

    @property
    def full(self) -> bool:
        return len(self.txns) >= self.limit or self.size >= BATCH_BYTES

    @property
    def ttid(self) -> bytes:
        return self.txns[-1][0]


class Refused(Exception):
    """The storages did not take the batch (NOT_READY): nothing of it was
    committed, and its transactions are to be copied one by one."""


@dataclass(eq=False)
class Sent:
    """A batch whose begin and votes left."""

    batch: Batch
    master: Any
    conns: list
    begin: SimpleQueue
    votes: SimpleQueue
    finish: SimpleQueue | None = None


class BulkCopier:
    """Bulk copies into the cluster of ``storage`` (a client Storage)."""

    def __init__(self, storage: Any) -> None:
        self.storage = storage
        self.app = storage.app
        self.compress = storage.compress_record

    def add(self, batch: Batch, tid: bytes, txn: Any, records: list) -> None:
        """Encode a source transaction (``records`` as its iterator gave
        them, none a blob's) into ``batch``."""
        # an object stored twice keeps its last record, where it first
        # came (as a transaction of the client, Commit.store)
        encoded: dict[bytes, tuple] = {}
        size = 0
        for record in records:
            data = record.data
            if data is None:  # a deletion (or an undone creation)
                encoded[record.oid] = (record.oid, 0, ZERO_HASH, b"", None)
                continue
            compression, stored, checksum = self.compress(data)
            encoded[record.oid] = (record.oid, compression, checksum, stored, record.data_txn)
            size += len(stored)
        batch.txns.append((tid, *metadata(txn), list(encoded.values())))
        batch.oids.append((tid, list(encoded)))
        batch.copied.append((tid, txn, records))
        batch.size += size + 100

    def send(self, batch: Batch) -> Sent | None:
        """Begin and vote ``batch``, not waiting for the answers; None if
        it cannot go in bulk (its partitions are not all on the same
        storages, UP_TO_DATE, or a node lacks the feature)."""
        app = self.app
        # the table as the master has it now: storages learn its changes
        # from it, so one the master made but we did not read yet would
        # have them refuse the batch (its transactions are then copied one
        # by one: docs/design.md, "Bulk copy"; rare is better)
        app.sync()
        pt = app.pt
        partitions = set()
        for tid, oids in batch.oids:
            partitions.add(pt.partition(tid))
            partitions.update(pt.partition(oid) for oid in oids)
        nids = pt.same_cells(partitions)
        if nids is None:
            return None
        master = app.get_master()
        if BULK_COPY not in master.peer_features:
            return None
        try:
            conns = [app.storage_conn(nid, alive=True) for nid in nids]
        except (ConnectionClosed, OSError):
            return None
        if not all(BULK_COPY in conn.peer_features for conn in conns):
            return None
        ttid = batch.ttid
        begin = master.ask(Packets.AskBulkBegin, batch.txns[0][0], ttid)
        votes: SimpleQueue = SimpleQueue()
        for conn in conns:
            conn.ask(Packets.AskBulkVote, ttid, batch.txns, queue=votes, token=conn.nid)
        return Sent(batch, master, conns, begin, votes)

    def finish(self, sent: Sent) -> None:
        """Once the begin and every vote succeeded, ask the master to
        finish; Refused if the storages would not take the batch,
        StorageTransactionError if it failed (aborted, in both cases)."""
        ttid = sent.batch.ttid
        _, _, error, _ = sent.master.wait(sent.begin)
        errors = [error] if error is not None else []
        failed = []  # storages lost: each of the others holds all of the batch
        refused = set()  # storages that hold nothing of it (NOT_READY)
        for _ in sent.conns:
            nid, _, error, _ = wait_any(sent.votes, sent.conns)
            if isinstance(error, ConnectionClosed):
                failed.append(nid)
            elif error is not None:
                errors.append(error)
                if isinstance(error, RemoteError) and error.code == ErrorCodes.NOT_READY:
                    refused.add(nid)
        if not errors and sent.master is not self.app.master:
            errors.append(ConnectionClosed("master lost during the vote"))
        if not errors and failed:
            # as any commit (Commit.vote): the master drops them if the
            # cluster stays operational without them, else the copy fails
            try:
                if len(failed) == len(sent.conns):
                    raise ConnectionClosed("every storage lost")
                sent.master.call(Packets.FailedVote, ttid, sorted(failed), timeout=60)
            except (ConnectionClosed, RemoteError) as e:
                errors.append(e)
            else:
                log.warning("%s: bulk copy %s goes on without %s", self.app.label, ttid.hex(),
                            " ".join(map(nid_str, sorted(failed))))
        if errors:
            # not to those that refused it: they would remember its TTID,
            # the TID of its last transaction, as aborted, and refuse that
            # transaction when it is copied by itself
            self.abort(sent, skip=refused)
            if all(isinstance(e, RemoteError) and e.code == ErrorCodes.NOT_READY
                   for e in errors):
                log.info("%s: bulk copy %s refused (%s): copied one transaction at a time",
                         self.app.label, ttid.hex(), errors[0])
                raise Refused(str(errors[0]))
            raise StorageTransactionError("bulk copy %s failed: %s" % (
                ttid.hex(), "; ".join(map(str, errors))))
        sent.finish = sent.master.ask(Packets.AskBulkFinish, ttid, sent.batch.oids)

    def finished(self, sent: Sent) -> None:
        """Wait for the master's answer to the finish: every transaction of
        the batch committed (or StorageTransactionError)."""
        app = self.app
        ttid = sent.batch.ttid
        _, _, error, _ = sent.master.wait(sent.finish)
        if isinstance(error, ConnectionClosed):
            # it may have been committed or not: find out, never guess
            if final_tid(app, ttid) is None:
                raise StorageTransactionError(
                    "bulk copy %s failed: master lost (%s) and it was not committed" % (
                        ttid.hex(), error))
            log.warning("%s: master lost during the finish of bulk copy %s, committed",
                        app.label, ttid.hex())
        elif error is not None:
            raise StorageTransactionError("bulk copy %s failed: %s" % (ttid.hex(), error))
        for tid, oids in sent.batch.oids:
            app.committed(tid, dict.fromkeys(oids), None)
            self.storage._remember_restored(oids, tid)

    def abort(self, sent: Sent, skip: set | frozenset = frozenset()) -> None:
        """Drop the batch on the master and on its storages but ``skip``."""
        ttid = sent.batch.ttid
        conns = [conn for conn in sent.conns if conn.nid not in skip]
        for conn in conns:
            if not conn.closed:
                conn.notify(Packets.AbortTransaction, ttid, [])
        master = sent.master
        if not master.closed:
            master.notify(Packets.AbortTransaction, ttid, [conn.nid for conn in conns])
