"""Copying whole transactions from another database, with their TIDs
(copyTransactionsFrom, zodbconvert, neomigrate): ZODB's copy semantics
(``ZODB.BaseStorage.copy``: tpc_begin with the source TID and status, one
restore per record, vote, finish), in TID order.

Into a cluster whose master is ours (``Storage.pipelined_copy``), the
round trips of each transaction overlap the copy of the next ones: the caller's thread begins each transaction without
waiting for the master's answer (the TID is imposed: the answer only says
yes or no) and restores its records, buffered; a thread of its own votes
(checking the begin's answer first, then sending the stores and the vote
in one write) and finishes the transactions, one at a time and in order.
So the storages get each transaction's stores in TID order, and the
master commits in TID order anyway; a restore of an object that a
transaction still being committed wrote waits for its lock on the
storage, as any store does, and is based on its TID (the client
remembers it at the restore).  A transaction is counted as
copied when its finish returned, so what was reported copied is exactly
what the destination has, and an interrupted copy can go on from the
destination's last TID (``neomigrate --incremental``).

Blobs go along when both sides keep them (``IBlobStorage``): a blob
record's content is read from the source's blob file and restored with it.
"""
from __future__ import annotations

import logging
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from ZODB.blob import is_blob_record
from ZODB.interfaces import IBlobStorage
from ZODB.POSException import POSKeyError
from ZODB.TimeStamp import TimeStamp

log = logging.getLogger("neozodb.client")

# restored transactions waiting for their vote, beyond the one being
# voted and finished: what the caller's thread may be ahead
PIPELINE = 2


class CopyResult:
    """What was copied so far: transactions finished, their records, and
    the last TID finished (None before the first)."""

    def __init__(self, done: Callable[[bytes, int], None] | None) -> None:
        self.transactions = 0
        self.objects = 0
        self.last: bytes | None = None
        self._done = done

    def finished(self, tid: bytes, records: int) -> None:
        self.transactions += 1
        self.objects += records
        self.last = tid
        if self._done is not None:
            self._done(tid, records)


class _Finisher:
    """tpc_vote and tpc_finish of restored transactions, in order, in a
    thread of its own.  After a failure, what is still queued is aborted."""

    def __init__(self, destination: Any, result: CopyResult) -> None:
        self.destination = destination
        self.result = result
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=PIPELINE)
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="neozodb copy finisher")
        self._thread.start()

    def put(self, txn: Any, tid: bytes, records: int) -> None:
        """Queue a restored transaction (blocks while PIPELINE wait); from
        then on the finisher votes and finishes it, or aborts it."""
        self._queue.put((txn, tid, records))

    def close(self) -> None:
        """Wait until every queued transaction is finished (or aborted)."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        destination = self.destination
        while True:
            item = self._queue.get()
            if item is None:
                return
            txn, tid, records = item
            if self.error is None:
                try:
                    destination.tpc_vote(txn)
                    destination.tpc_finish(txn)
                except BaseException as e:  # reported by put() or close()'s caller
                    self.error = e
                else:
                    self.result.finished(tid, records)
                    continue
            destination.tpc_abort(txn)


def _blob_copy(source: Any, destination: Any, record: Any) -> str | None:
    """A copy of the content of a blob record, in the destination's
    temporary directory (which the destination takes); None for a record
    that is not a blob's, or whose content the source does not have."""
    if not is_blob_record(record.data):
        return None
    try:
        filename = source.loadBlob(record.oid, record.tid)
    except POSKeyError:
        return None
    fd, name = tempfile.mkstemp(suffix=".tmp", dir=destination.temporaryDirectory())
    with os.fdopen(fd, "wb") as copy, open(filename, "rb") as original:
        shutil.copyfileobj(original, copy, 1 << 20)
    return name


def copy(source: Any, destination: Any, start: bytes | None = None,
         done: Callable[[bytes, int], None] | None = None,
         warn: Callable[[str], None] = log.warning, pipelined: bool = True) -> CopyResult:
    """Copy the transactions of ``source`` from ``start`` (all if None)
    into ``destination``; ``done(tid, records)`` is called as each one is
    finished, in order.  ``pipelined``: vote and finish in a thread of its
    own (the destination must be a cluster's client: ``tpc_begin`` with
    ``wait``, several transactions at once)."""
    result = CopyResult(done)
    blobs = IBlobStorage.providedBy(source) and IBlobStorage.providedBy(destination)
    finisher = _Finisher(destination, result) if pipelined else None
    previous = None
    iterator = source.iterator(start)
    try:
        for txn in iterator:
            tid = txn.tid
            if previous is not None and tid <= previous:
                # as ZODB's copy: a TID out of order is moved just after
                # the previous one
                tid = TimeStamp(tid).laterThan(TimeStamp(previous)).raw()
                warn("TID %s out of order, copied as %s" % (txn.tid.hex(), tid.hex()))
            if finisher is None:
                destination.tpc_begin(txn, tid, txn.status)
            else:
                destination.tpc_begin(txn, tid, txn.status, wait=False)
            records = 0
            try:
                for record in txn:
                    blob = _blob_copy(source, destination, record) if blobs else None
                    if blob is None:
                        destination.restore(record.oid, record.tid, record.data, "",
                                            record.data_txn, txn)
                    else:
                        destination.restoreBlob(record.oid, record.tid, record.data, blob,
                                                record.data_txn, txn)
                    records += 1
                if finisher is None:
                    destination.tpc_vote(txn)
                    destination.tpc_finish(txn)
                else:
                    finisher.put(txn, tid, records)
            except BaseException:
                destination.tpc_abort(txn)
                raise
            previous = tid
            if finisher is None:
                result.finished(tid, records)
            elif finisher.error is not None:
                raise finisher.error
    finally:
        if finisher is not None:
            finisher.close()
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    if finisher is not None and finisher.error is not None:
        raise finisher.error
    return result
