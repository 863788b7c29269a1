"""The client's cluster view: master connection, node list, partition
table, storage connections, object cache and last TID.

Called from ZODB's application threads; notifications are processed by
the thread reading their connection (``neozodb.net.threaded``).  ``self.lock`` protects the
cache, ``last_tid`` and the loading bookkeeping, so that invalidations and
loads never interleave badly: an object loaded while an invalidation for it
arrives is cached with the right ``next_serial``.
"""
from __future__ import annotations

import logging
import ssl
import threading
import time
from queue import SimpleQueue

from neozodb.client.begin import Reserved
from neozodb.client.blobtails import BlobTails
from neozodb.client.cache import ClientCache
from neozodb.client.cells import Cells
from neozodb.client.compat import UnlockBarrier
from neozodb.client.compress import WrongChecksum
from neozodb.client.errors import NEOStorageError
from neozodb.client.handlers import Changes, MasterHandler, StorageHandler
from neozodb.client.loads import Loads
from neozodb.client.oids import OidPool
from neozodb.net.bootstrap import CONNECT_TIMEOUT, next_masters, reorder
from neozodb.net.endpoint import ConnectionClosed, RemoteError
from neozodb.net.threaded import ThreadedConnection
from neozodb.net.waiting import wait_any
from neozodb.nodes import NodeManager
from neozodb.protocol import (
    ZERO_TID,
    ErrorCodes,
    NodeStates,
    NodeTypes,
    Packets,
    nid_str,
)
from neozodb.protocol.features import ANNOUNCEMENT
from neozodb.pt import PartitionTable

log = logging.getLogger("neozodb.client")

# seconds a storage whose connection timed out is not tried again (it may
# be cut off from this client only: the master still says it runs)
UNREACHABLE_PAUSE = 10.0
# seconds a conflict resolution waits for the transaction it conflicts with
# to complete (catch_up): it is locked on a storage, so the master is
# completing it, unless the master fails (a new one then finishes it)
CATCH_UP_TIMEOUT = 30.0


class ClientApp(Loads, Cells):
    """Loads and prefetches are a mixin (client/loads.py), so are the cells
    of the partition table (client/cells.py)."""

    def __init__(self, master_nodes: list[tuple[str, int]], name: str, read_only: bool = False,
                 cache_size: int = 20 << 20, connect_timeout: float = 60.0,
                 ignore_wrong_checksum: bool = False, keepalive: float | None = None,
                 features: bool = True, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls  # client TLS context (net/tls.py) of every connection; None: plain
        # without features, nodes take us for NEO's client and we use only
        # what NEO's nodes offer (see compat.py)
        self.announcement = ANNOUNCEMENT if features else {}
        self.ignore_wrong_checksum = ignore_wrong_checksum
        self.keepalive = keepalive  # of every connection; None: threaded.DEFAULT_KEEPALIVE
        self.master_nodes = master_nodes
        # the order masters are tried in: unreachable ones go last
        self._master_order = list(master_nodes)
        self.name = name
        self.read_only = read_only
        self.connect_timeout = connect_timeout
        self.nid: int | None = None
        self.nm = NodeManager()
        self.pt: PartitionTable | None = None
        self.cluster_state = None
        self.cache = ClientCache(cache_size)
        # what the blob revisions loaded say of their contents (client/blobs.py)
        self.blob_tails = BlobTails()
        self.lock = threading.RLock()
        self.last_tid = ZERO_TID
        self._connected_before = False
        self._last_tid_at_loss = ZERO_TID
        self._loss_noted: ThreadedConnection | None = None  # see _note_master_loss
        self._tid_since_connect = ZERO_TID  # newest invalidation on this master connection
        self._loading: dict[bytes, list] = {}  # oid -> [loads in progress, invalidating tid]
        self.master: ThreadedConnection | None = None
        self._storages: dict[int, ThreadedConnection] = {}
        self._storage_lock = threading.Lock()  # _storages and _connecting
        self._connecting: dict[int, threading.Lock] = {}  # nid -> held while connecting
        self._unreachable: dict[int, float] = {}  # nid -> not tried before (monotonic)
        self._connect_lock = threading.Lock()
        self._changed = threading.Condition()
        self.invalidation_listener = None  # ZODB's storage wrapper, set by registerDB
        self.transactions: dict[bytes, object] = {}  # ttid -> commit context (deadlock notices)
        self.reserved = Reserved()  # TTID blocks from the master (client/begin.py)
        self.begins_again = 0  # commits whose reserved TTID the master refused
        self._oids = OidPool()  # new OIDs from the master (client/oids.py)
        self._cells: dict[int, list[int]] = {}
        self._readable: dict[int, list[int]] = {}  # as _cells, readable ones
        self._spread: bool | None = None  # see spread()
        self._oid_lock = threading.Lock()
        self._watchers: list[Changes] = []  # see watch_changes
        self.unlocked = UnlockBarrier(self)  # NEO storages: see compat.py
        self.closed = False
        # early votes (client/voting.py) the storage took, and refused
        # (a store was not settled yet: voted again)
        self.early_votes = [0, 0]
        # early votes on several storages skipped after one that had to be
        # voted again (client/voting.py, EARLY_LAZY_BACKOFF)
        self.early_lazy_skip = 0
        # locks given back to an older transaction (NotifyDeadlock): relocks asked
        self.relocks = 0

    @property
    def label(self) -> str:
        return nid_str(self.nid) if self.nid is not None else "C?"

    def wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    # -- master ------------------------------------------------------------------
    def get_master(self) -> ThreadedConnection:
        conn = self.master
        if conn is not None and conn.alive():
            return conn
        with self._connect_lock:
            if self.master is not None:
                if self.master.alive():
                    return self.master
                # Its reader thread may not have reported the end yet (an
                # application thread read it): the last tid at the loss is
                # taken now, before a new master replaces this one.
                self._note_master_loss(self.master)
            self._connect()
            return self.master

    def _connect(self) -> None:
        deadline = time.monotonic() + self.connect_timeout
        delay = 0.05
        last_error = "no master reachable"
        while not self.closed:
            queue = list(self._master_order)
            tried: set = set()
            while queue:
                address = queue.pop(0)
                if address in tried:
                    continue
                tried.add(address)
                with self.lock:
                    self._tid_since_connect = ZERO_TID
                conn = ThreadedConnection(address, MasterHandler(self), self.label,
                                          keepalive=self.keepalive, tls=self.tls)
                try:
                    try:
                        conn.connect(timeout=max(0.1, min(CONNECT_TIMEOUT,
                                                          deadline - time.monotonic())))
                    except OSError:
                        reorder(self._master_order, address)  # tried last from now on
                        raise
                    extra = {**self.announcement, b"read_only": True} if self.read_only \
                        else self.announcement
                    _, master_nid, nid = conn.call(
                        Packets.RequestIdentification, NodeTypes.CLIENT, self.nid, None,
                        self.name.encode(), None, extra,
                        # the master holds clients until the cluster runs
                        timeout=max(10.0, deadline - time.monotonic()))
                except (OSError, ConnectionClosed) as e:
                    last_error = "%s:%s: %s" % (address[0], address[1], e)
                    if conn.sock is not None:
                        conn.close()
                    # a secondary master names the primary
                    queue[:0] = next_masters(self.master_nodes, conn)
                    continue
                except RemoteError as e:
                    last_error = "%s:%s: %s" % (address[0], address[1], e)
                    conn.close()
                    if e.code is ErrorCodes.PROTOCOL_ERROR:
                        raise NEOStorageError(f"master refused the connection: {e.message}") from None
                    continue
                conn.nid = master_nid
                self.nid = nid
                conn.owner_label = self.label
                self.master = conn
                self._wait_operational(deadline)
                (tid,) = conn.call(Packets.AskLastTransaction, timeout=30)
                self._reconnected(tid)
                log.info("%s: connected to master %s at %s:%s", self.label, nid_str(master_nid),
                         *address)
                return
            if time.monotonic() > deadline:
                raise NEOStorageError(f"cannot connect to cluster {self.name!r}: {last_error}")
            time.sleep(delay)  # reconnection backoff, not synchronisation
            delay = min(delay * 2, 1.0)
        raise NEOStorageError("storage closed")

    def _wait_operational(self, deadline: float) -> None:
        with self._changed:
            while not (self.pt is not None and self.pt.operational(self.running_storages())):
                if self.master.closed:
                    raise ConnectionClosed("master lost while connecting")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise NEOStorageError("cluster not operational")
                self._changed.wait(min(remaining, 1.0))

    def _reconnected(self, tid: bytes) -> None:
        """``tid`` answers AskLastTransaction, sent after identification:
        invalidations received since identification may already be newer,
        so last_tid only moves forward, unless the database was truncated."""
        with self.lock:
            listener = self.invalidation_listener
            if self._connected_before and tid < self._last_tid_at_loss:
                # truncated (neoctl truncate): cached revisions, current or
                # not, may be gone, and the last tid goes back
                log.warning("%s: the database was truncated: last tid %s, was %s", self.label,
                            tid.hex(), self._last_tid_at_loss.hex())
                self.cache.clear()
                self.unlocked.forget()
                self.last_tid = max(tid, self._tid_since_connect)
                if listener is not None:
                    listener.invalidateCache()
                    # ZODB's connections read as of the newest tid they were
                    # told about: tell them the new last one, changing nothing
                    listener.invalidate(self.last_tid, ())
            elif self._connected_before and tid != self._last_tid_at_loss:
                # commits we were not told about: anything current may be stale
                self.cache.clear_current()
                if listener is not None:
                    listener.invalidateCache()
            self._connected_before = True
            if tid > self.last_tid:
                self.last_tid = tid

    def master_lost(self, conn) -> None:
        if conn is self.master:
            self._note_master_loss(conn)
            self.wake()

    def _note_master_loss(self, conn: ThreadedConnection) -> None:
        """Once per master connection: the last tid when it was lost, which
        ``_reconnected`` compares with the new master's to see a truncation."""
        with self.lock:
            if conn is self._loss_noted or conn is not self.master:
                return
            self._loss_noted = conn
            self._last_tid_at_loss = self.last_tid
        if not self.closed:
            log.warning("%s: lost the master: %s", self.label, conn.close_reason)

    # -- storages --------------------------------------------------------------------
    def storage_conn(self, nid: int, alive: bool = False) -> ThreadedConnection:
        """The connection to storage ``nid``, made if needed.  ``alive``:
        one that the storage may have closed without anybody having read
        it yet is checked first (``ThreadedConnection.alive``): what a
        transaction sends on a connection that turns out closed is lost
        with it, while a new connection would have taken it."""
        conn = self._storages.get(nid)
        if conn is not None and not conn.closed and (not alive or conn.alive()):
            return conn
        # One connection attempt per storage at a time, under that storage's
        # own lock: _storage_lock is only held for a lookup or an update.
        # Connecting to an unreachable storage takes up to the connection
        # timeout, and the master connection's reader thread takes
        # _storage_lock to drop a storage the master says is down: held
        # while connecting, it left the master's keep-alive pings
        # unanswered, and the master dropped the client.
        with self._storage_lock:
            connecting = self._connecting.setdefault(nid, threading.Lock())
        with connecting:
            conn = self._storages.get(nid)
            if conn is not None and not conn.closed and (not alive or conn.alive()):
                return conn
            # A storage we could not reach is not waited for again at once:
            # each attempt costs the connection timeout, for every commit
            # and read involving it (a storage cut off from the clients
            # only stays RUNNING for the master).  Reads try it last.
            until = self._unreachable.get(nid, 0.0)
            if time.monotonic() < until:
                raise ConnectionClosed("%s unreachable: connecting timed out %.1fs ago" % (
                    nid_str(nid), time.monotonic() - until + UNREACHABLE_PAUSE))
            try:
                conn = self._connect_storage(nid)
            except TimeoutError:
                self._unreachable[nid] = time.monotonic() + UNREACHABLE_PAUSE
                raise
            self._unreachable.pop(nid, None)
            with self._storage_lock:
                node = self.nm.get(nid)
                if not self.closed and node is not None \
                        and node.state is NodeStates.RUNNING:
                    self._storages[nid] = conn
                    return conn
            # dropped (or the client closed) while we connected
            conn.close("storage not running")
            raise ConnectionClosed("%s is not running" % nid_str(nid))

    def _connect_storage(self, nid: int) -> ThreadedConnection:
        node = self.nm.get(nid)
        if node is None or node.address is None or node.state is not NodeStates.RUNNING:
            raise ConnectionClosed("%s is not running" % nid_str(nid))
        conn = ThreadedConnection(node.address, StorageHandler(self), self.label,
                                  keepalive=self.keepalive, tls=self.tls)
        conn.connect(timeout=CONNECT_TIMEOUT)
        conn.nid = nid
        me = self.nm.get(self.nid)
        try:
            conn.call(Packets.RequestIdentification, NodeTypes.CLIENT, self.nid, None,
                      self.name.encode(), me.id_timestamp if me else None, self.announcement,
                      timeout=30)
        except RemoteError as e:
            # e.g. NOT_READY from a storage back from a disconnection and
            # not operational yet: unreachable for now, like a dead one
            # (callers then use other cells, or report it at vote)
            conn.close()
            raise ConnectionClosed("%s refused us: %s" % (nid_str(nid), e)) from None
        except BaseException:
            conn.close()
            raise
        return conn

    def drop_storage(self, nid: int) -> None:
        with self._storage_lock:
            conn = self._storages.pop(nid, None)
        if conn is not None:
            conn.close("storage not running")

    def storage_lost(self, conn) -> None:
        with self._storage_lock:
            if self._storages.get(conn.nid) is conn:
                del self._storages[conn.nid]

    def ask_storage(self, oid: bytes, packet, *args, check=None):
        """Ask a readable replica of oid's partition, trying others on failure.

        ``check(answer)`` may raise WrongChecksum: then another replica is
        asked, and if none has good data, the error is raised (or, with
        ``ignore_wrong_checksum``, the data is used anyway)."""
        last_error: Exception | None = None
        bad = None
        for _ in range(3):
            for nid in self.readable_nids(oid):
                try:
                    answer = self.storage_conn(nid).call(packet, *args)
                except (ConnectionClosed, OSError) as e:
                    last_error = e
                    continue
                except RemoteError as e:
                    if e.code is not ErrorCodes.NON_READABLE_CELL:
                        raise
                    last_error = e
                    continue
                if check is None:
                    return answer
                try:
                    return answer, check(answer)
                except WrongChecksum as e:
                    log.error("%s: %s from %s", self.label, e, nid_str(nid))
                    bad, last_error = answer, e
            if bad is not None:
                if self.ignore_wrong_checksum:
                    return bad, check(bad, verify=False)
                raise last_error
            self.sync()
        raise NEOStorageError(f"no storage could answer {packet.name}: {last_error}")

    def ask_many(self, requests, check=None, exclude=()) -> list[tuple]:
        """Pipeline requests to readable replicas and wait for all answers.

        ``requests`` are ``(partition, packet, args)``: each goes to a random
        readable cell of its partition, all of them buffered and sent before
        any answer is awaited.  A request whose storage closes the
        connection or no longer has a readable cell (``NON_READABLE_CELL``)
        is sent to the next replica; after a pass over all of them, the
        master is pinged (the partition table may be late) and the
        remaining ones tried again, three passes in all.  ``check`` is as
        in ``ask_storage``.  Nodes in ``exclude`` are not asked.

        Returns ``(answer, error)`` per request, in order: answer is
        ``(answer, check(answer))`` with ``check``; error is any other
        RemoteError, or NEOStorageError when no replica answered."""
        requests = list(requests)
        results: list = [None] * len(requests)
        errors: dict[int, Exception] = {}
        bad: dict[int, tuple] = {}
        waiting = list(range(len(requests)))
        for attempt in range(3):
            if attempt:
                self.sync()
            nids_of: dict[int, list[int]] = {}
            tried: dict[int, set] = {i: set() for i in waiting}
            failed: set[int] = set()  # nodes that cannot be reached in this pass
            exhausted = []
            while waiting:
                queue: SimpleQueue = SimpleQueue()
                conns = set()
                sent = 0
                again = []
                for i in waiting:
                    partition = requests[i][0]
                    nids = nids_of.get(partition)
                    if nids is None:
                        nids = nids_of[partition] = [
                            n for n in self.readable_nids_of(partition) if n not in exclude]
                    nid = next((n for n in nids if n not in tried[i] and n not in failed), None)
                    if nid is None:
                        exhausted.append(i)
                        continue
                    tried[i].add(nid)
                    try:
                        conn = self.storage_conn(nid)
                    except (ConnectionClosed, OSError) as e:
                        errors[i] = e
                        failed.add(nid)
                        again.append(i)
                        continue
                    conn.ask(requests[i][1], *requests[i][2], queue=queue, token=i, buffer=True)
                    conns.add(conn)
                    sent += 1
                for conn in conns:
                    conn.flush()
                for _ in range(sent):
                    i, answer, error, conn = wait_any(queue, conns)
                    if error is not None:
                        if isinstance(error, (ConnectionClosed, OSError)):
                            failed.add(conn.nid)
                        elif not (isinstance(error, RemoteError)
                                  and error.code is ErrorCodes.NON_READABLE_CELL):
                            results[i] = (None, error)
                            continue
                        errors[i] = error
                        again.append(i)
                        continue
                    if check is not None:
                        try:
                            answer = (answer, check(answer))
                        except WrongChecksum as e:
                            log.error("%s: %s from %s", self.label, e, nid_str(conn.nid))
                            errors[i] = e
                            bad[i] = answer
                            again.append(i)
                            continue
                    results[i] = (answer, None)
                waiting = again
            waiting = []
            for i in exhausted:
                if i not in bad:
                    waiting.append(i)
                elif self.ignore_wrong_checksum:
                    results[i] = ((bad[i], check(bad[i], verify=False)), None)
                else:
                    results[i] = (None, errors[i])
            if not waiting:
                break
        for i in waiting:
            results[i] = (None, NEOStorageError(
                f"no storage could answer {requests[i][1].name}: {errors.get(i)}"))
        return results

    # -- the cache (loads: client/loads.py) --------------------------------------------

    def invalidate(self, tid: bytes, oids) -> None:
        """Another client committed: in the thread reading the master
        connection, in TID order."""
        with self.lock:
            cache = self.cache
            for oid in oids:
                cache.invalidate(oid, tid)
                loading = self._loading.get(oid)
                if loading is not None:
                    loading[1].append(tid)
            for watcher in self._watchers:
                watcher.oids.update(oids)
            listener = self.invalidation_listener
            if listener is not None:
                try:
                    listener.invalidate(tid, oids)
                except Exception:
                    # e.g. the DB closed under us: never lose the connection for it
                    log.exception("%s: error invalidating %s", self.label, tid.hex())
            if tid > self.last_tid:
                self.last_tid = tid
            if tid > self._tid_since_connect:
                self._tid_since_connect = tid

    def committed(self, tid: bytes, stored: dict, callback) -> None:
        """Our own commit: in the thread reading the master connection, before any later
        invalidation, update the cache, run ZODB's callback, move last_tid."""
        with self.lock:
            self.cache.committed(tid, stored)
            for watcher in self._watchers:
                watcher.oids.update(stored)
            if callback is not None:
                callback(tid)
            if tid > self.last_tid:
                self.last_tid = tid

    def sync(self) -> None:
        """A barrier with the master: every earlier invalidation is processed."""
        self.get_master().call(Packets.Ping, timeout=60)

    def catch_up(self, tid: bytes, timeout: float = CATCH_UP_TIMEOUT) -> bool:
        """Barriers with the master until ``tid`` is known committed (its
        invalidation processed), for at most ``timeout`` seconds; whether
        it is.  A storage reports a conflict with the transaction that
        holds the object's lock, which may be locked there and not yet
        completed by the master: until it is, another replica may not have
        that revision to load.  Each barrier reads what the master sent
        before it: no wait beyond the master's own answers."""
        deadline = time.monotonic() + timeout
        while self.last_tid < tid:
            if time.monotonic() > deadline:
                return False
            self.sync()
        return True

    # -- pack (client/pack.py) -------------------------------------------------------------
    def watch_changes(self) -> Changes:
        """Collect the oids of every commit from now on (ours and others')."""
        watcher = Changes(self.lock)
        with self.lock:
            self._watchers.append(watcher)
        return watcher

    def unwatch_changes(self, watcher: Changes) -> None:
        with self.lock:
            self._watchers.remove(watcher)

    def forget(self, oids) -> None:
        """Garbage collected objects: out of the cache."""
        with self.lock:
            for oid in oids:
                self.cache.forget(oid)

    def packed(self, pack_tid: bytes) -> None:
        """Our pack up to pack_tid: the history it removes, out of the cache
        (a loadBefore would otherwise find there what storages dropped)."""
        with self.lock:
            self.cache.drop_history(pack_tid)

    def wait_for_pack(self, tid: bytes) -> None:
        """Until every running storage applied the pack order ``tid``; asked
        again to a new master if the master is lost meanwhile."""
        while True:
            master = self.get_master()
            try:
                master.call(Packets.WaitForPack, tid)
                return
            except ConnectionClosed:
                if self.closed:
                    raise

    # -- misc ----------------------------------------------------------------------------------
    def new_oid(self) -> bytes:
        with self._oid_lock:
            return self._oids.take(self.master, self.get_master)

    def deadlock(self, conn, ttid: bytes, oid: bytes) -> None:
        ctx = self.transactions.get(ttid)
        if ctx is not None:
            ctx.deadlock(conn, oid)

    def close(self) -> None:
        self.closed = True
        self.invalidation_listener = None
        with self._storage_lock:
            conns = list(self._storages.values())
            self._storages.clear()
        for conn in conns:
            conn.close("client closing")
        if self.master is not None:
            self.master.close("client closing")
