"""``Storage.pack``: history removal and, with ``gc``, garbage collection.

NEO's pack only removes history: the client commits an empty transaction
(description ``IStorage.pack``) carrying a pack order ``(oids, pack_tid)``
that the storages apply in the background.  For garbage collection, the
client first finds the objects that are unreachable as of ``pack_tid`` (the
mark phase, below) and sends them as the order's oids, marking the
transaction's extension with ``{"neozodb_gc": True}``: a storage seeing
the mark packs the history of every object and deletes every revision up to
``pack_tid`` of the listed ones.  Without the mark (NEO clients), listed
oids mean a partial history pack.

What is reachable, as in FileStorage plus what happened after ``pack_tid``:

- the root (oid 0) and, transitively, what the revisions current at
  ``pack_tid`` reference;
- every object with revisions after ``pack_tid`` (created, changed or
  deleted since), and what those revisions reference, transitively;
- objects changed by commits made while the mark runs (invalidations
  are watched), and what they reference.

The candidates are the objects that exist at ``pack_tid``, listed by the
storages partition by partition (``AskOIDsFrom``).  Loads are pipelined
(``WINDOW`` requests in flight) and bypass the object cache.
"""
from __future__ import annotations

import logging
import time
from queue import SimpleQueue

from ZODB import POSException
from ZODB.Connection import TransactionMetaData

from neozodb.client.compress import WrongChecksum
from neozodb.net.endpoint import ConnectionClosed, RemoteError
from neozodb.protocol import ZERO_TID, ErrorCodes, Packets, p64, u64
from neozodb.tid import tid_from_time

log = logging.getLogger("neozodb.client")

#: The extension key marking a GC pack (read by the storages).
GC_MARK = "neozodb_gc"
#: NEO's description of a pack transaction.
PACK_DESCRIPTION = "IStorage.pack"
#: Loads in flight during the mark: enough to hide round trips, few enough
#: that other clients' requests do not queue long behind them on a storage.
WINDOW = 64
#: Oids per AskOIDsFrom.
OIDS_CHUNK = 10000
#: Unreachable objects one pack collects at most: the order travels in one
#: message (msgpack's limit is 64 MiB); the next pack collects the rest.
MAX_GC_OIDS = 5000000
ROOT = ZERO_TID


class Mark:
    """The mark phase: which objects existing at ``pack_tid`` are unreachable."""

    def __init__(self, app, pack_tid: bytes, referencesf) -> None:
        self.app = app
        self.pack_tid = pack_tid
        self.before = p64(u64(pack_tid) + 1)
        self.referencesf = referencesf
        self.loads = 0

    def run(self) -> set[bytes]:
        app = self.app
        watch = app.watch_changes()
        try:
            last = app.last_tid
            existing = self.existing(self.pack_tid)
            # created (or brought back) since pack_tid
            new = self.existing(last) - existing
            reachable: set[bytes] = set()
            self.visit({ROOT} | new, reachable)
            unreachable = existing - reachable
            # objects with revisions after pack_tid are kept, with what
            # those revisions reference
            later = {oid for oid, answer in self.load_many(unreachable, self.before, data=False)
                     if isinstance(answer, tuple) and answer[2] is not None}
            self.visit(later, reachable)
            while True:
                # commits made meanwhile (by us or others)
                changed = watch.take() - reachable
                if not changed:
                    break
                self.visit(changed, reachable)
            return existing - reachable
        finally:
            app.unwatch_changes(watch)

    def existing(self, tid: bytes) -> set[bytes]:
        """Every object that exists at ``tid`` (last revision not a deletion)."""
        app = self.app
        oids: set[bytes] = set()
        for partition in range(app.pt.num_partitions):
            min_oid = ZERO_TID
            while min_oid is not None:
                min_oid, chunk = app.ask_storage(p64(partition), Packets.AskOIDsFrom,
                                                 partition, OIDS_CHUNK, min_oid, tid)
                oids.update(chunk)
        return oids

    def visit(self, roots, reachable: set[bytes]) -> None:
        """Add ``roots`` and what they reference, transitively, to
        ``reachable``: the revision current at pack_tid and every later one
        of each object."""
        frontier = set(roots) - reachable
        while frontier:
            reachable |= frontier
            refs: set[bytes] = set()
            for oid, answer in self.load_many(frontier, self.before):
                if answer is KeyError:
                    continue  # never existed: a dangling reference
                if answer is None or answer[2] is not None:
                    # revisions after pack_tid (or only after it)
                    for data in self.later(oid):
                        refs.update(self.referencesf(data))
                if answer is not None and answer[0]:
                    refs.update(self.referencesf(answer[0]))
            frontier = refs - reachable

    def later(self, oid: bytes):
        """Data of the revisions of ``oid`` after pack_tid, newest first."""
        app = self.app
        first = 0
        while True:
            try:
                _, history = app.ask_storage(oid, Packets.AskObjectHistory, oid, first, first + 100)
            except RemoteError:
                return
            for serial, _ in history:
                if serial <= self.pack_tid:
                    return
                try:
                    data = app.load_serial(oid, serial)
                except KeyError:
                    continue  # deletion, or packed meanwhile
                self.loads += 1
                yield data
            if len(history) < 100:
                return
            first += 100

    def load_many(self, oids, before: bytes, data: bool = True):
        """(oid, answer) for each oid, pipelined: answer is ``(data, serial,
        next_serial)`` (data None for a deletion, and always without
        ``data``: not checked nor decompressed), None if the object had no
        revision before ``before``, KeyError if it never existed."""
        app = self.app
        queue: SimpleQueue = SimpleQueue()
        pending = 0
        conns = set()
        todo = iter(oids)
        exhausted = False
        while True:
            while not exhausted and pending < WINDOW:
                oid = next(todo, None)
                if oid is None:
                    exhausted = True
                    break
                try:
                    conn = app.storage_conn(app.readable_nids(oid)[0])
                except (IndexError, ConnectionClosed, OSError):
                    yield oid, self._load(oid, before)
                    continue
                conn.ask(Packets.AskObject, oid, None, before, queue=queue, token=oid,
                         buffer=True)
                conns.add(conn)
                pending += 1
            if not pending:
                return
            for conn in conns:
                conn.flush()
            conns.clear()
            oid, result, error, _ = queue.get()
            pending -= 1
            self.loads += 1
            if error is None:
                if not data:
                    yield oid, (None, result[1], result[2])
                    continue
                try:
                    yield oid, (app._object_data(result), result[1], result[2])
                    continue
                except WrongChecksum:
                    pass
            elif isinstance(error, RemoteError) and error.code is ErrorCodes.OID_NOT_FOUND:
                yield oid, None
                continue
            elif isinstance(error, RemoteError) and error.code is ErrorCodes.OID_DOES_NOT_EXIST:
                yield oid, KeyError
                continue
            # connection lost, cell not readable, bad checksum: the slow way
            yield oid, self._load(oid, before)

    def _load(self, oid: bytes, before: bytes):
        try:
            answer, data = self.app.ask_storage(oid, Packets.AskObject, oid, None, before,
                                                check=self.app._object_data)
        except RemoteError as e:
            if e.code is ErrorCodes.OID_DOES_NOT_EXIST:
                return KeyError
            if e.code is ErrorCodes.OID_NOT_FOUND:
                return None
            raise
        return data, answer[1], answer[2]


def pack(storage, t: float, referencesf, gc: bool = True, wait: bool = True) -> bytes | None:
    """Pack the database as of time ``t``; return the pack transaction's
    TID, or None if the database is empty."""
    app = storage.app
    app.sync()  # every commit so far is in last_tid
    last = app.last_tid
    if last == ZERO_TID:
        log.info("%s: nothing to pack: the database is empty", app.label)
        return None
    pack_tid = min(p64(tid_from_time(t)), last)
    oids = None
    extension = {}
    unreachable: set[bytes] = set()
    started = time.monotonic()
    if gc:
        mark = Mark(app, pack_tid, referencesf)
        try:
            unreachable = mark.run()
        except RemoteError as e:
            if e.code is not ErrorCodes.BACKEND_NOT_IMPLEMENTED:
                raise
            # e.g. a storage still importing cannot list its objects
            raise POSException.StorageError("cannot pack: %s" % e.message) from None
        oids = sorted(unreachable)
        if len(oids) > MAX_GC_OIDS:
            log.warning("%s: %d unreachable objects: this pack collects %d of them, pack again"
                        " for the others", app.label, len(oids), MAX_GC_OIDS)
            oids = oids[:MAX_GC_OIDS]
            unreachable = set(oids)
        extension = {GC_MARK: True}
        log.info("%s: pack up to %s: %d unreachable objects (%d loads in %.3f s)", app.label,
                 pack_tid.hex(), len(oids), mark.loads, time.monotonic() - started)
    txn = TransactionMetaData(description=PACK_DESCRIPTION, extension=extension)
    storage.tpc_begin(txn)
    try:
        storage._commit(txn).pack = (oids, pack_tid)
        storage.tpc_vote(txn)
        tid = storage.tpc_finish(txn)
    except BaseException:
        storage.tpc_abort(txn)
        raise
    app.forget(unreachable)
    if wait:
        app.wait_for_pack(tid)
        log.info("%s: packed up to %s in %.3f s", app.label, pack_tid.hex(),
                 time.monotonic() - started)
    return tid
