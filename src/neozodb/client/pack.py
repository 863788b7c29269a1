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

Only a master with the ``gc-pack`` feature gets such an order (its
storages are neozodb's).  NEO's master would take it for a partial history
pack, so with it the client deletes the unreachable objects itself, in
ordinary transactions, then packs their history away (``delete_garbage``):
the same objects are collected, at the cost of a few more transactions.

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

from neozodb.client.compat import PACK_TID_KEY
from neozodb.client.compress import WrongChecksum
from neozodb.net.endpoint import ConnectionClosed, RemoteError
from neozodb.net.waiting import wait_any
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
#: The feature of a master that takes GC orders (protocol/features.py).
GC_FEATURE = b"gc-pack"
#: Without it: objects deleted a transaction, and oids a partial history
#: pack order, at most (delete_garbage).
DELETE_CHUNK = 10000
ORDER_OIDS = 100000
ROOT = ZERO_TID


class Mark:
    """The mark phase: which objects existing at ``pack_tid`` are unreachable."""

    def __init__(self, app, pack_tid: bytes, referencesf) -> None:
        self.app = app
        self.pack_tid = pack_tid
        self.before = p64(u64(pack_tid) + 1)
        self.referencesf = referencesf
        self.loads = 0
        #: unreachable candidates -> their serial (at pack_tid, none since)
        self.serials: dict[bytes, bytes] = {}
        #: every oid committed since the mark began (ours and others')
        self.changed: set[bytes] = set()
        self._watch = None

    def __enter__(self) -> Mark:
        # Commits are watched until the pack is committed: an object
        # changed meanwhile is not garbage.
        self._watch = self.app.watch_changes()
        return self

    def __exit__(self, *exc) -> None:
        self.app.unwatch_changes(self._watch)

    def take_changes(self) -> set[bytes]:
        """Oids committed since the last call (all of them since the mark
        began are in ``changed``)."""
        new = self._watch.take()
        self.changed |= new
        return new

    def run(self) -> set[bytes]:
        app = self.app
        last = app.last_tid
        existing = self.existing(self.pack_tid)
        # created (or brought back) since pack_tid
        new = self.existing(last) - existing
        reachable: set[bytes] = set()
        self.visit({ROOT} | new, reachable)
        unreachable = existing - reachable
        # objects with revisions after pack_tid are kept, with what
        # those revisions reference
        later = set()
        for oid, answer in self.load_many(unreachable, self.before, data=False):
            if isinstance(answer, tuple):
                if answer[2] is not None:
                    later.add(oid)
                else:
                    self.serials[oid] = answer[1]
        self.visit(later, reachable)
        while True:
            # commits made meanwhile (by us or others)
            changed = self.take_changes() - reachable
            if not changed:
                break
            self.visit(changed, reachable)
        return existing - reachable

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
        asked = set()  # every connection an answer may still come from
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
                asked.add(conn)
                pending += 1
            if not pending:
                return
            for conn in conns:
                conn.flush()
            conns.clear()
            oid, result, error, _ = wait_any(queue, asked)
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
    """Pack the database as of time ``t``; return the TID of the (last)
    pack transaction, or None if the database is empty."""
    app = storage.app
    app.sync()  # every commit so far is in last_tid
    last = app.last_tid
    if last == ZERO_TID:
        log.info("%s: nothing to pack: the database is empty", app.label)
        return None
    pack_tid = min(p64(tid_from_time(t)), last)
    started = time.monotonic()
    if not gc:
        tid = commit_pack_order(storage, None, pack_tid)
    else:
        # NEO's master (no gc-pack) takes a GC order for a partial history
        # pack: never send it one; delete the garbage ourselves instead
        by_order = GC_FEATURE in app.get_master().peer_features
        with Mark(app, pack_tid, referencesf) as mark:
            try:
                unreachable = mark.run()
            except RemoteError as e:
                if e.code is not ErrorCodes.BACKEND_NOT_IMPLEMENTED:
                    raise
                # e.g. a storage still importing cannot list its objects
                raise POSException.StorageError("cannot pack: %s" % e.message) from None
            if len(unreachable) > MAX_GC_OIDS:
                log.warning("%s: %d unreachable objects: this pack collects %d of them, pack"
                            " again for the others", app.label, len(unreachable), MAX_GC_OIDS)
                unreachable = set(sorted(unreachable)[:MAX_GC_OIDS])
            log.info("%s: pack up to %s: %d unreachable objects (%d loads in %.3f s)",
                     app.label, pack_tid.hex(), len(unreachable), mark.loads,
                     time.monotonic() - started)
            if by_order:
                tid = commit_pack_order(storage, sorted(unreachable), pack_tid, {GC_MARK: True})
            else:
                unreachable, tid = delete_garbage(storage, mark, unreachable, pack_tid)
        app.forget(unreachable)
    app.packed(pack_tid)
    if wait:
        app.wait_for_pack(tid)
        storage._blobs_packed(pack_tid)
        log.info("%s: packed up to %s in %.3f s", app.label, pack_tid.hex(),
                 time.monotonic() - started)
    return tid


def commit_pack_order(storage, oids: list[bytes] | None, pack_tid: bytes,
                      extension: dict | None = None) -> bytes:
    """Commit NEO's pack transaction (no object) carrying the order
    ``(oids, pack_tid)``; return its TID.  A pack of every object's
    history (``oids`` None, or a GC order) records its pack_tid in the
    extension: NEO's storages keep what it packed in the undo log, and the
    client leaves that out (compat.UndoLogPacks)."""
    extension = dict(extension or {})
    if oids is None or extension.get(GC_MARK):
        extension[PACK_TID_KEY] = pack_tid
    txn = TransactionMetaData(description=PACK_DESCRIPTION, extension=extension)
    storage.tpc_begin(txn)
    try:
        storage._commit(txn).pack = (oids, pack_tid)
        storage.tpc_vote(txn)
        return storage.tpc_finish(txn)
    except BaseException:
        storage.tpc_abort(txn)
        raise


def delete_garbage(storage, mark: Mark, unreachable: set[bytes], pack_tid: bytes
                   ) -> tuple[set[bytes], bytes]:
    """GC with a master that only knows NEO's history packs: delete the
    unreachable objects in ordinary transactions (IExternalGC deletions,
    each checked against the serial the mark saw, DELETE_CHUNK objects a
    transaction, described ``IStorage.pack`` so that the undo log leaves
    them out), then commit partial history packs of the deleted objects up
    to the last deletion (their revisions and the deletions go), then the
    history pack up to ``pack_tid``.  An object changed since the mark
    (watched, or a conflict on its deletion) is not deleted.  Returns the
    deleted oids and the TID of the last pack transaction."""
    app = storage.app
    todo = sorted(oid for oid in unreachable if oid in mark.serials)
    deleted: set[bytes] = set()
    last_deletion = None
    for i in range(0, len(todo), DELETE_CHUNK):
        chunk = todo[i:i + DELETE_CHUNK]
        while True:
            mark.take_changes()
            chunk = [oid for oid in chunk if oid not in mark.changed]
            if not chunk:
                break
            txn = TransactionMetaData(description=PACK_DESCRIPTION)
            storage.tpc_begin(txn)
            try:
                for oid in chunk:
                    storage.deleteObject(oid, mark.serials[oid], txn)
                storage.tpc_vote(txn)
                last_deletion = storage.tpc_finish(txn)
            except POSException.ConflictError as e:
                storage.tpc_abort(txn)
                if e.oid is None or e.oid not in chunk:
                    raise
                mark.changed.add(e.oid)  # changed since the mark: kept
                continue
            except BaseException:
                storage.tpc_abort(txn)
                raise
            deleted.update(chunk)
            break
    if deleted:
        log.info("%s: deleted %d unreachable objects (last deletion %s)", app.label,
                 len(deleted), last_deletion.hex())
        oids = sorted(deleted)
        for i in range(0, len(oids), ORDER_OIDS):
            commit_pack_order(storage, oids[i:i + ORDER_OIDS], last_deletion)
    return deleted, commit_pack_order(storage, None, pack_tid)
