"""``neozodb.client.Storage``: the ZODB storage an application opens.

A plain (non-MVCC) IStorage: ZODB wraps it in its MVCC adapter, which gets
invalidations through ``registerDB``.  Several transactions may commit at
once from different threads (there is no commit lock in the client: the
storages lock objects, not the database).
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from itertools import islice

import zope.interface
from ZODB import POSException
from ZODB.ConflictResolution import ConflictResolvingStorage
from ZODB.interfaces import (
    IBlobStorage,
    IBlobStorageRestoreable,
    IExternalGC,
    IMultiCommitStorage,
    IPrefetchStorage,
    IStorage,
    IStorageCurrentRecordIteration,
    IStorageIteration,
    IStorageRestoreable,
    IStorageUndoable,
    ReadVerifyingStorage,
)

from neozodb.client import iteration
from neozodb.client.app import ClientApp
from neozodb.client.blobs import BlobStorageMethods
from neozodb.client.bulk import BulkCopier
from neozodb.client.commit import Commit
from neozodb.client.compat import has_features
from neozodb.client.compress import parse_compress
from neozodb.client.copying import copy as copy_transactions
from neozodb.client.errors import NEOStorageError
from neozodb.client.iteration import loads_extension, transaction_description
from neozodb.client.loads import READ_AHEAD
from neozodb.deflate import record_compressor
from neozodb.net.endpoint import ConnectionClosed, RemoteError
from neozodb.net.tls import load_contexts
from neozodb.protocol import ZERO_TID, Packets
from neozodb.protocol.features import BEGIN_AHEAD, BEGIN_PARTITION, BULK_COPY, ORDERED_COPY

__all__ = ["Storage", "NEOStorageError", "loads_extension"]


def parse_master_nodes(text: str | list) -> list[tuple[str, int]]:
    if not isinstance(text, str):
        return [tuple(a) for a in text]
    from neozodb.cli.config import parse_masters
    return parse_masters(text)


# Finishes a copy leaves waiting for their answers (Storage.pipelined_copy):
# enough for the next transaction's vote and finish to be under way while
# the storages lock the previous ones
COPY_WINDOW = 4

# How many oids restore() remembers the last restored serial of (see Commit.restore)
RESTORED_MEMORY = 200_000


@zope.interface.implementer(IStorage, IMultiCommitStorage, ReadVerifyingStorage, IPrefetchStorage,
                            IStorageIteration, IStorageUndoable, IStorageCurrentRecordIteration,
                            IStorageRestoreable, IExternalGC)
class Storage(BlobStorageMethods, ConflictResolvingStorage):
    def __init__(self, master_nodes: str | list, name: str, read_only: bool = False,
                 compress: bool | str = True, cache_size: int = 20 << 20,
                 logfile: str | None = None, ignore_wrong_checksum: bool = False,
                 connect_timeout: float = 60.0, keepalive: float | None = None,
                 features: bool = True, ca: str | None = None, cert: str | None = None,
                 key: str | None = None, pack_gc: bool = True, blob_dir: str | None = None,
                 blob_cache_size: int | None = None, blob_cache_size_check: int = 10,
                 read_ahead: int = READ_AHEAD, server_sync: bool = True, **kw) -> None:
        if kw:
            raise TypeError("unexpected options: " + ", ".join(sorted(kw)))
        if isinstance(read_ahead, bool) or not isinstance(read_ahead, int) or read_ahead < 0:
            raise ValueError(f"read_ahead: not a count of objects: {read_ahead!r}")
        tls = None
        if ca or cert or key:
            # TLSConfigError (a ValueError) names what does not work
            tls = load_contexts(ca, cert, key)[1]  # type: ignore[arg-type]
        self._name = name
        self._read_only = bool(read_only)
        # what pack() does without a gc argument (as FileStorage's pack_gc):
        # false, only history is removed (an external GC uses deleteObject)
        self._pack_gc = bool(pack_gc)
        # what ZODB's sync() at each transaction.begin() costs: a round trip
        # to the master (true), or only reading what it sent (ZEO's default)
        self._server_sync = bool(server_sync)
        # shared by the commits: the default learns which classes compress
        self.compress_record = record_compressor(parse_compress(compress))
        if blob_dir:
            # ZEO's options: the client's blob cache (shared by processes)
            from neozodb.client.blobcache import BlobCache
            self._blob_cache = BlobCache(blob_dir, blob_cache_size, blob_cache_size_check)
            zope.interface.alsoProvides(self, IBlobStorage, IBlobStorageRestoreable)
        if logfile:
            import logging
            handler = logging.FileHandler(logfile)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
            logging.getLogger("neozodb").addHandler(handler)
        self.app = ClientApp(parse_master_nodes(master_nodes), name, read_only=self._read_only,
                             cache_size=cache_size, connect_timeout=connect_timeout,
                             ignore_wrong_checksum=ignore_wrong_checksum, keepalive=keepalive,
                             features=features, tls=tls)
        self.app.read_ahead = read_ahead
        self._commits: dict[object, Commit] = {}
        self._lock = threading.Lock()
        self._records: tuple | None = None  # (cursor, RecordIteration) of record_iternext
        self._records_lock = threading.Lock()
        # oid -> serial this client restored last, oldest first (bounded)
        self._restored: dict[bytes, bytes] = {}
        self.app.get_master()  # fail early when the cluster cannot be reached

    # -- information ---------------------------------------------------------------
    def getName(self) -> str:
        return self._name

    def sortKey(self) -> str:
        return "neozodb:" + self._name

    def _snapshot(self) -> bytes:
        """The last TID this client was told about: what whole-database
        reads (iteration, undo log, history) may show."""
        self.app.get_master()
        with self.app.lock:
            tid = self.app.last_tid
        self.app.unlocked.wait(tid)
        return tid

    def getSize(self) -> int:
        """Estimated bytes of object data as stored (compressed), history
        included: the object count (see __len__) times the mean stored size
        of all revisions of 100 objects picked at random.  Costs what
        __len__ costs, plus one pipelined round."""
        return iteration.estimate_size(self.app, self._snapshot())

    def __len__(self) -> int:
        """Number of objects (not deleted) at the client's last TID: every
        partition is listed (AskOIDsFrom, 5000 oids per request, one
        readable replica per partition, all partitions in each pipelined
        round), so it costs a transfer of every oid: O(objects)."""
        return iteration.count_objects(self.app, self._snapshot())[0]

    def __bool__(self) -> bool:
        return True  # never count objects for "if storage:"

    def isReadOnly(self) -> bool:
        return self._read_only

    def supportsUndo(self) -> bool:
        return True

    def lastTransaction(self) -> bytes:
        # Taking the lock the invalidation path holds means nobody sees the
        # new TID between the wrapper's invalidate() and the TID update: a
        # connection created in that window would otherwise start before the
        # commit and miss its invalidations forever after.
        with self.app.lock:
            return self.app.last_tid

    def registerDB(self, wrapper) -> None:
        ConflictResolvingStorage.registerDB(self, wrapper)
        self.app.invalidation_listener = wrapper

    def sync(self, force: bool = True) -> None:
        """ZODB's call at ``transaction.begin()``.  With ``server_sync``
        (the default), a barrier with the master: the transaction sees
        every commit completed before it began.  Without it, as ZEO's
        default: what the master sent so far (invalidations already in the
        socket included) is processed, with no round trip; a commit that
        completed a moment before may be seen only by the next transaction
        (docs/operations.md, "Client options")."""
        # A closed storage has no view to bring up to date.  ZODB calls this
        # for every connection registered with the thread's transaction
        # manager: one left open on a closed database must not fail the
        # transactions of the others (FileStorage's sync does nothing).
        if self.app.closed:
            return
        if self._server_sync:
            self.app.sync()
        else:
            # reads what waits in the master's socket without blocking (and
            # connects again if the master was lost)
            self.app.get_master()

    def close(self) -> None:
        self.app.close()

    # -- reads -----------------------------------------------------------------------
    def load(self, oid: bytes, version: str = "") -> tuple[bytes, bytes]:
        result = self._load(oid, None)
        if result is None:
            raise POSException.POSKeyError(oid)
        return result[0], result[1]

    def _load(self, oid, before):
        try:
            return self.app.load(oid, before)
        except KeyError:
            raise POSException.POSKeyError(oid) from None

    def loadBefore(self, oid: bytes, tid: bytes):
        """(data, serial, next_serial) before tid; None if the object did
        not exist yet; POSKeyError if it never existed, or if the revision
        before tid is a deletion or an undone creation (as FileStorage)."""
        return self._load(oid, tid)

    def loadSerial(self, oid: bytes, serial: bytes) -> bytes:
        try:
            return self.app.load_serial(oid, serial)
        except KeyError:
            raise POSException.POSKeyError(oid) from None

    def getTid(self, oid: bytes) -> bytes:
        return self.load(oid)[1]

    def prefetch(self, oids, tid: bytes) -> None:
        self.app.prefetch(oids, tid)

    def history(self, oid: bytes, size: int = 1) -> list[dict]:
        """Revisions of oid, newest first, up to the client's last TID
        (revisions committed since are not shown, as with undoLog)."""
        app = self.app
        snapshot = self._snapshot()
        serials: list[tuple[bytes, int]] = []
        offset = 0
        while len(serials) < size:
            want = size - len(serials)
            try:
                _, page = app.ask_storage(oid, Packets.AskObjectHistory, oid, offset, offset + want)
            except RemoteError as e:
                raise POSException.POSKeyError(oid) from e
            serials += [(serial, length) for serial, length in page if serial <= snapshot]
            offset += len(page)
            if len(page) < want:
                break
        if not serials:
            raise POSException.POSKeyError(oid)  # none, or created after our snapshot
        info = iteration.transaction_info(app, [serial for serial, _ in serials])
        result = []
        for serial, length in serials:
            if serial not in info:
                continue
            user, description, ext, _, _ = info[serial]
            d = transaction_description(serial, user, description, ext)
            del d["id"]
            d.update(tid=serial, serial=serial, size=length)
            result.append(d)
        return result

    # -- iteration and undo log ------------------------------------------------------------
    def iterator(self, start: bytes | None = None, stop: bytes | None = None):
        """Transactions from start to stop (both included), in TID order,
        as of now: nothing committed after the call is shown."""
        snapshot = self._snapshot()
        if stop is None or stop > snapshot:
            stop = snapshot
        if start is None:
            start = ZERO_TID
        if start > stop:
            return iter(())
        return iteration.iterate(self.app, start, stop)

    def undoLog(self, first: int = 0, last: int = -20, filter=None) -> list[dict]:
        return iteration.undo_log(self.app, self._snapshot(), first, last, filter)

    def undoInfo(self, first: int = 0, last: int = -20, specification: dict | None = None):
        if specification:
            spec = list(specification.items())

            def filter(d):
                return all(d.get(k) == v for k, v in spec)
        else:
            filter = None
        return self.undoLog(first, last, filter)

    def record_iternext(self, next: bytes | None = None):
        """``(oid, tid, data, next)`` of each existing object in oid order;
        ``next`` is opaque (the next oid and the snapshot the loop reads
        at); an 8-byte oid starts from that oid, at the current snapshot."""
        with self._records_lock:
            state = None
            if next is not None and self._records is not None and self._records[0] == next:
                state = self._records[1]
            if state is None:
                if next is None:
                    start, snapshot = bytes(8), self._snapshot()
                elif len(next) == 16:
                    start, snapshot = next[:8], next[8:]
                else:
                    start, snapshot = next, self._snapshot()
                state = iteration.RecordIteration(self.app, start, snapshot)
            record = state.next()
            if record is None:
                self._records = None
                raise ValueError("no more records")
            cursor = state.cursor()
            self._records = None if cursor is None else (cursor, state)
            oid, tid, data = record
            return oid, tid, data, cursor

    # -- writes ------------------------------------------------------------------------
    def _check_writable(self) -> None:
        if self._read_only:
            raise POSException.ReadOnlyError()

    def new_oid(self) -> bytes:
        self._check_writable()
        return self.app.new_oid()

    def _commit(self, txn) -> Commit:
        commit = self._commits.get(txn)
        if commit is None:
            raise POSException.StorageTransactionError(self, txn)
        return commit

    def tpc_begin(self, txn, tid: bytes | None = None, status: str = " ",
                  wait: bool = True) -> None:
        """Begin committing txn.  ``tid`` imposes the TID of the transaction
        (copyTransactionsFrom, restore): it must be greater than every TID
        the cluster committed or gave to a transaction in progress, else
        StorageTransactionError.  ``status`` is accepted and ignored (the
        protocol has no way to store it: transactions read back ' ').
        Without a ``tid``, the master's answer (the TTID) is not waited
        for here but when the transaction first needs it, at the latest at
        the vote, which raises if the begin failed.  ``wait`` false, with a
        ``tid``: the same, and the stores wait for the vote (a pipelined
        copy)."""
        self._check_writable()
        with self._lock:
            if txn in self._commits:
                raise POSException.StorageTransactionError("duplicate tpc_begin calls for same transaction")
        # the answer is read when the TTID is needed, at the latest at the
        # vote: the round trip overlaps the application's work
        # (serialization, stores) in between
        commit = Commit(self.app, self, txn, tid, self.compress_record)
        commit.imposed = tid is not None
        try:
            master = commit.master = self.app.get_master()
            features = master.peer_features
            # where partitions are on different storages, the begin waits
            # for the first store, whose partition the TTID is given in
            # (feature begin-partition); and with a TTID block reserved,
            # the first store takes the TTID in its partition there
            # (feature begin-ahead): Commit._send_begin
            commit.begin_unsent = tid is None and (
                BEGIN_PARTITION in features and self.app.spread()
                or BEGIN_AHEAD in features and self.app.reserved.holds(master))
            if tid is not None:
                commit.begin_answer = master.ask(Packets.AskBeginTransaction, tid)
            elif not commit.begin_unsent:
                commit._send_begin(None)
        except ConnectionClosed as e:
            raise POSException.StorageTransactionError(f"tpc_begin failed: {e}") from None
        if tid is not None and wait:
            commit._answered()  # raises if the TID is refused
        self._begun(txn, commit)

    def _begun(self, txn, commit: Commit) -> None:
        with self._lock:
            self._commits[txn] = commit
        if commit.ttid is not None:  # else once the master gave it
            self.app.transactions[commit.ttid] = commit

    def store(self, oid: bytes, serial: bytes | None, data: bytes, version: str, txn) -> None:
        if self._read_only:
            raise POSException.ReadOnlyError()
        if version:
            raise POSException.Unsupported("versions are not supported")
        commit = self._commits.get(txn)
        if commit is None:
            raise POSException.StorageTransactionError(self, txn)
        commit.store(oid, serial, data)
        if (commit.pending and not commit.queue.empty()) or commit.conflict_error is not None:
            commit._process(block=False)  # answers to take now, or an error to raise

    def restore(self, oid: bytes, serial: bytes, data: bytes | None, version: str,
                prev_txn: bytes | None, transaction) -> None:
        """Store a record as another database committed it (IStorageRestoreable,
        used by copyTransactionsFrom, zodbconvert and neomigrate), in a
        transaction begun with an imposed TID: no conflict check (the source
        history is authoritative) but the usual locks and two-phase commit.
        ``data`` None is a deletion (or an undone creation); ``prev_txn``,
        the record's back-pointer, is kept (iteration gives it back as
        ``data_txn``) and the storages share that revision's data.  The
        record gets the transaction's TID: ``serial`` (the source's TID of
        the record, the same unless copyTransactionsFrom had to reorder
        TIDs) is not used."""
        self._check_writable()
        if version:
            raise POSException.Unsupported("versions are not supported")
        commit = self._commit(transaction)
        commit.restore(oid, data, prev_txn, self._restored.get(oid, ZERO_TID))
        if commit.imposed:
            # the TID it will have: a restore of oid in the next transaction
            # of a pipelined copy, before this one is finished, is based on it
            self._remember_restored((oid,), commit.ttid)
        commit._process(block=False)

    def copyTransactionsFrom(self, other, verbose: int = 0) -> None:
        """Copy every transaction of ``other`` (any IStorageIteration) with
        its TID, metadata and back-pointers (ZODB's BaseStorage semantics;
        see neomigrate for a command with progress); each finish overlaps
        the copy of the next transaction (client/copying.py)."""
        def done(tid: bytes, records: int) -> None:
            print("copied %s: %d records" % (tid.hex(), records))

        copy_transactions(other, self, done=done if verbose else None)

    def pipelined_copy(self) -> int:
        """How many finishes a copy into this cluster may leave waiting
        for their answers (client/copying.py).  0 with NEO's master, which
        closes the connection of a client that begins a transaction with an
        imposed TID while earlier ones are being finished; COPY_WINDOW with
        a master that locks a copy's transactions in order (feature
        ordered-copy), else 1."""
        master = self.app.get_master()
        if not has_features(master):
            return 0
        return COPY_WINDOW if ORDERED_COPY in master.peer_features else 1

    def bulk_copier(self) -> BulkCopier | None:
        """What copies many transactions per commit into this cluster
        (client/bulk.py), None if its master lacks the feature or its
        partitions are not all on the same storages."""
        self._check_writable()
        master = self.app.get_master()
        pt = self.app.pt
        if BULK_COPY not in master.peer_features or pt.same_cells(range(pt.num_partitions)) \
                is None:
            return None
        return BulkCopier(self)

    def deleteObject(self, oid: bytes, serial: bytes, txn) -> None:
        """IExternalGC: a deletion record for oid, whose current serial must
        be ``serial`` (else ConflictError at vote); loadBefore still finds
        the revisions before it."""
        self._check_writable()
        self._commit(txn).store(oid, serial, None)

    def checkCurrentSerialInTransaction(self, oid: bytes, serial: bytes, txn) -> None:
        self._check_writable()
        self._commit(txn).check_current(oid, serial)

    def tpc_vote(self, txn):
        commit = self._commit(txn)
        try:
            return commit.vote() or None
        except POSException.ConflictError:
            raise
        except (ConnectionClosed, RemoteError) as e:
            raise POSException.StorageTransactionError(f"vote failed: {e}") from None

    def tpc_finish(self, txn, f=None) -> bytes:
        return self.tpc_finish_later(txn, f)()

    def tpc_finish_later(self, txn, f=None) -> Callable[[], bytes]:
        """tpc_finish in two steps: the request leaves now, and the
        function returned waits for the master's answer and returns the
        TID (or raises as tpc_finish).  A pipelined copy votes its next
        transaction in between (client/copying.py)."""
        commit = self._commit(txn)
        if not commit.voted:
            raise POSException.StorageTransactionError("tpc_finish before tpc_vote")
        try:
            queue = commit.send_finish(f)
        except BaseException:
            self._forget(txn, commit)
            raise

        def finished() -> bytes:
            try:
                tid = commit.finished(queue, f)
            finally:
                self._forget(txn, commit)
            if commit.blob_files:
                self._blobs_committed(commit, tid)
            if commit.restored:
                self._remember_restored(commit.restored, tid)
            return tid
        return finished

    def _remember_restored(self, oids, tid: bytes) -> None:
        """The serial the next restore() of these oids will be based on;
        the oldest entries go beyond RESTORED_MEMORY (a guess that is wrong
        only costs the storage's answer and the record sent again)."""
        with self._lock:
            restored = self._restored
            for oid in oids:
                restored.pop(oid, None)
                restored[oid] = tid
            excess = len(restored) - RESTORED_MEMORY
            if excess > 0:
                for oid in list(islice(restored, excess)):
                    del restored[oid]

    def tpc_abort(self, txn) -> None:
        with self._lock:
            commit = self._commits.get(txn)
        if commit is None:
            return
        try:
            commit.abort()
        finally:
            self._forget(txn, commit)
            if commit.blob_files:
                self._blobs_aborted(commit)

    def _forget(self, txn, commit: Commit) -> None:
        with self._lock:
            self._commits.pop(txn, None)
        self.app.transactions.pop(commit.ttid, None)

    def undo(self, transaction_id: bytes, txn):
        """Undo a transaction in txn (between tpc_begin and tpc_vote):
        returns (None, oids undone)."""
        self._check_writable()
        commit = self._commit(txn)
        if commit.voted:
            raise POSException.StorageTransactionError("undo after tpc_vote")
        return None, commit.undo(transaction_id)

    # -- not yet offered -----------------------------------------------------------------

    def pack(self, t, referencesf, gc: bool | None = None, wait: bool = True) -> None:
        """Remove the history up to time ``t`` and, with ``gc`` (default:
        the ``pack_gc`` option, true unless set), the objects unreachable
        then (see client/pack.py).  Waits until every running storage has
        applied it, unless ``wait`` is false."""
        self._check_writable()
        from neozodb.client.pack import pack
        pack(self, t, referencesf, gc=self._pack_gc if gc is None else gc, wait=wait)

