"""``neozodb.client.Storage``: the ZODB storage an application opens.

A plain (non-MVCC) IStorage: ZODB wraps it in its MVCC adapter, which gets
invalidations through ``registerDB``.  Several transactions may commit at
once from different threads (there is no commit lock in the client: the
storages lock objects, not the database).
"""
from __future__ import annotations

import threading

import zope.interface
from ZODB import POSException
from ZODB.ConflictResolution import ConflictResolvingStorage
from ZODB.Connection import TransactionMetaData
from ZODB.interfaces import (
    IMultiCommitStorage,
    IPrefetchStorage,
    IStorage,
    ReadVerifyingStorage,
)
from ZODB.TimeStamp import TimeStamp

from neozodb.client.app import ClientApp, NEOStorageError
from neozodb.client.commit import Commit
from neozodb.client.compress import parse_compress
from neozodb.net.endpoint import ConnectionClosed, RemoteError
from neozodb.protocol import Packets

__all__ = ["Storage", "NEOStorageError"]


def loads_extension(ext: bytes) -> dict:
    """Transaction extension bytes as ZODB stores them (a pickled dict)."""
    try:
        return dict(TransactionMetaData(extension=ext).extension)
    except Exception:
        return {}


def parse_master_nodes(text: str | list) -> list[tuple[str, int]]:
    if not isinstance(text, str):
        return [tuple(a) for a in text]
    from neozodb.cli.config import parse_masters
    return parse_masters(text)


@zope.interface.implementer(IStorage, IMultiCommitStorage, ReadVerifyingStorage, IPrefetchStorage)
class Storage(ConflictResolvingStorage):
    def __init__(self, master_nodes: str | list, name: str, read_only: bool = False,
                 compress: bool | str = True, cache_size: int = 20 << 20,
                 logfile: str | None = None, ignore_wrong_checksum: bool = False,
                 connect_timeout: float = 60.0, keepalive: float | None = None, **kw) -> None:
        if kw:
            raise TypeError("unexpected options: " + ", ".join(sorted(kw)))
        self._name = name
        self._read_only = bool(read_only)
        self._compress = parse_compress(compress)
        if logfile:
            import logging
            handler = logging.FileHandler(logfile)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
            logging.getLogger("neozodb").addHandler(handler)
        self.app = ClientApp(parse_master_nodes(master_nodes), name, read_only=self._read_only,
                             cache_size=cache_size, connect_timeout=connect_timeout,
                             ignore_wrong_checksum=ignore_wrong_checksum, keepalive=keepalive)
        self._commits: dict[object, Commit] = {}
        self._lock = threading.Lock()
        self.app.get_master()  # fail early when the cluster cannot be reached

    # -- information ---------------------------------------------------------------
    def getName(self) -> str:
        return self._name

    def sortKey(self) -> str:
        return "neozodb:" + self._name

    def getSize(self) -> int:
        return 0

    def __len__(self) -> int:
        return 0

    def isReadOnly(self) -> bool:
        return self._read_only

    def supportsUndo(self) -> bool:
        return False

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
        self.app.sync()

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
        try:
            _, serials = self.app.ask_storage(oid, Packets.AskObjectHistory, oid, 0, size)
        except RemoteError as e:
            raise POSException.POSKeyError(oid) from e
        result = []
        for serial, length in serials:
            tid, user, description, ext, _, _ = self.app.ask_storage(
                serial, Packets.AskTransactionInformation, serial)
            d = {"tid": tid, "serial": serial, "time": TimeStamp(tid).timeTime(),
                 "user_name": user, "description": description, "size": length}
            if ext:
                d.update(loads_extension(ext))
            result.append(d)
        return result

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

    def tpc_begin(self, txn, tid: bytes | None = None, status: str = " ") -> None:
        self._check_writable()
        with self._lock:
            if txn in self._commits:
                raise POSException.StorageTransactionError("duplicate tpc_begin calls for same transaction")
        try:
            (ttid,) = self.app.get_master().call(Packets.AskBeginTransaction, tid, timeout=None)
        except (RemoteError, ConnectionClosed) as e:
            raise POSException.StorageTransactionError(f"tpc_begin failed: {e}") from None
        commit = Commit(self.app, self, txn, ttid, self._compress)
        with self._lock:
            self._commits[txn] = commit
        self.app.transactions[ttid] = commit

    def store(self, oid: bytes, serial: bytes | None, data: bytes, version: str, txn) -> None:
        self._check_writable()
        if version:
            raise POSException.Unsupported("versions are not supported")
        commit = self._commit(txn)
        commit.store(oid, serial, data)
        commit._process(block=False)

    def deleteObject(self, oid: bytes, serial: bytes, txn) -> None:
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
        commit = self._commit(txn)
        if not commit.voted:
            raise POSException.StorageTransactionError("tpc_finish before tpc_vote")
        try:
            return commit.finish(f)
        finally:
            self._forget(txn, commit)

    def tpc_abort(self, txn) -> None:
        with self._lock:
            commit = self._commits.get(txn)
        if commit is None:
            return
        try:
            commit.abort()
        finally:
            self._forget(txn, commit)

    def _forget(self, txn, commit: Commit) -> None:
        with self._lock:
            self._commits.pop(txn, None)
        self.app.transactions.pop(commit.ttid, None)

    # -- not yet offered -----------------------------------------------------------------
    def undo(self, transaction_id, txn):
        self._check_writable()
        raise POSException.UndoError("undo is not supported by this version of neozodb")

    def pack(self, t, referencesf, gc: bool = True, wait: bool = True) -> None:
        """Remove the history up to time ``t`` and, with ``gc``, the objects
        unreachable then (see client/pack.py).  Waits until every running
        storage has applied it, unless ``wait`` is false."""
        self._check_writable()
        from neozodb.client.pack import pack
        pack(self, t, referencesf, gc=gc, wait=wait)

