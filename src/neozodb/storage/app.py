"""The storage node: one backend, a copy of the partition table, object
locks, and the answers to clients' reads and writes.

One asyncio loop runs everything, backend calls included (they are short
and the durable ones are the commit points).  The node connects to the
primary master, answers its recovery and verification questions, and serves
clients once the master sends StartOperation.  Losing the master closes the
client connections and starts over.
"""
from __future__ import annotations

import asyncio
import logging
import os

from neozodb.net.bootstrap import follow_master
from neozodb.net.connection import Connection, RemoteError, connect
from neozodb.net.listener import listen
from neozodb.net.tasks import watch
from neozodb.nodes import NodeManager
from neozodb.protocol import (
    CellStates,
    NodeStates,
    NodeTypes,
    Packets,
    nid_str,
)
from neozodb.protocol.features import ANNOUNCEMENT, BLOB, EXTRA_KEY, FEATURES
from neozodb.pt import PartitionTable
from neozodb.storage import handlers, peers
from neozodb.storage.blobs import drop_uploads
from neozodb.storage.checker import Checker
from neozodb.storage.groupsync import GroupSync
from neozodb.storage.pack import Packer
from neozodb.storage.pt_history import PartitionHistory
from neozodb.storage.replicator import Replicator
from neozodb.storage.transactions import LockManager

log = logging.getLogger("neozodb.storage")

# pending writes of a transaction of at least this many objects are
# committed (and synced) at the next turn of the event loop, not within the
# second (bench/README.md, "The end of a big commit")
EARLY_WRITE_OBJECTS = 64
_READABLE = (CellStates.UP_TO_DATE.value, CellStates.FEEDING.value)
# seconds a stopping storage waits for its peers to close the connections
# it closed, handling what they still send (StorageApp.run)
EXIT_LINGER = 1.0
# what a storage whose backend keeps no blob contents announces to others
NO_BLOB_ANNOUNCEMENT = {EXTRA_KEY: sorted(FEATURES - {BLOB})}


class StorageApp:
    tls = None  # net.tls.TLS, set by the command line before run()

    def __init__(self, name: str, masters: list[tuple[str, int]], backend,
                 bind: tuple[str, int] = ("127.0.0.1", 0), replication_rate: int = 0,
                 pack_rate: int = 0) -> None:
        self.name = name
        self.name_bytes = name.encode()
        self.masters = masters
        self.bind = bind
        self.address: tuple[str, int] | None = None
        self.backend = backend
        self.nid: int | None = backend.get_nid()
        self.nm = NodeManager()
        self.pt: PartitionTable | None = None
        self.locks = LockManager()
        self.group_sync = GroupSync(backend, lambda: self.label, self._stop_unsafe)
        self.operational = False
        self.master_conn: Connection | None = None
        self.client_conns: set[Connection] = set()
        self.peer_conns: dict[int, Connection] = {}  # outgoing, to storages we replicate from
        self.source_conns: set[Connection] = set()   # incoming, from storages replicating
        self._connecting: dict[int, asyncio.Future] = {}
        self.replicator = Replicator(self, replication_rate)
        self.packer = Packer(self, pack_rate)
        self.activity = 0  # requests from clients and the master (pack yields to them)
        self.checker = Checker(self)
        # verification ran with us since we connected to this master: our
        # locked transactions were either validated or will be
        self.verified = False
        self.delayed: list = []  # (ttid or b'', callable) retried on lock changes
        # oid -> last serial (None: none), looked up for a burst of stores
        # (storage/writes.py, Writes.prefetch); empty between bursts
        self.serials: dict[int, int | None] = {}
        # (oid, checksum, compression) -> data ids taken for a burst's stores
        self.prestored: dict[tuple[int, bytes, int], list[int]] = {}
        self._delayed_prune_at = 1024
        self._pending_timer: asyncio.Handle | None = None
        self._exit = asyncio.Event()
        self.exit_status = 0
        self.last_request = 0.0  # time.monotonic() of the last request from a peer
        self.importer = None
        if getattr(backend, "read_source", None) is not None:  # Importer backend
            from neozodb.storage.importer import Importer
            self.importer = Importer(self)
        self._load_pt()
        # the tables we were given (neoctl print pt_history, recover_pt)
        self.pt_history = PartitionHistory(backend, lambda: self.label)
        self._pt_changed()

    @property
    def label(self) -> str:
        return nid_str(self.nid) if self.nid is not None else "S?"

    def _load_pt(self) -> None:
        ptid, replicas, rows = self.backend.get_pt()
        num = self.backend.get_num_partitions()
        if ptid is not None and num:
            pt = PartitionTable(num, replicas)
            pt.load(ptid, replicas, rows)
            self.pt = pt

    # -- partition table ---------------------------------------------------------
    def set_pt(self, ptid: int, replicas: int, rows) -> None:
        pt = PartitionTable(len(rows), replicas)
        pt.load(ptid, replicas, rows)
        old = self._own_cells()
        self.pt = pt
        if self.backend.get_num_partitions() != len(rows):
            self.backend.set_num_partitions(len(rows))
        self.backend.save_pt(ptid, replicas, pt.rows())
        self._pt_changed()
        if self.operational:
            self._own_cells_changed(old)
            if self.importer is not None:
                self.importer.check_pt()
        else:
            # before verification validates transactions in our cells
            self.replicator.note_resume_points()

    def change_pt(self, ptid: int, replicas: int, changes) -> None:
        old = self._own_cells()
        self.pt.apply_changes(ptid, replicas, changes)
        self.backend.change_pt(ptid, replicas, [(o, n, s.value) for o, n, s in changes])
        self._pt_changed()
        if self.operational:
            self._own_cells_changed(old)
            if self.importer is not None:
                self.importer.check_pt()
        else:
            self.replicator.note_resume_points()

    def _pt_changed(self) -> None:
        """Record our readable partitions in the history, and forget older
        entries' partitions whose data we drop (no cell) or erase (CORRUPTED)."""
        pt = self.pt
        if pt is None or self.nid is None or pt.ptid is None:
            return
        cells = {p: self.cell_state(p) for p in pt.partitions_of(self.nid)}
        self.pt_history.table_changed(
            pt.ptid, frozenset(p for p, s in cells.items() if s in _READABLE),
            frozenset(p for p, s in cells.items() if s != CellStates.CORRUPTED.value))

    def _own_cells(self) -> dict[int, int]:
        if self.pt is None or self.nid is None:
            return {}
        return {p: self.cell_state(p) for p in self.pt.partitions_of(self.nid)}

    def _own_cells_changed(self, old: dict[int, int]) -> None:
        new = self._own_cells()
        for partition in sorted(set(old) | set(new)):
            before, after = old.get(partition), new.get(partition, CellStates.DISCARDED.value)
            if before != after:
                self.replicator.cell_changed(partition, before, after)
                self.packer.cell_changed(partition, before, after)

    def cell_state(self, partition: int) -> int | None:
        # on every store and load: a dict lookup, no sorted copy of the row
        return self.pt.state_of(partition, self.nid)

    def readable(self, partition: int) -> bool:
        return self.pt.state_of(partition, self.nid) in _READABLE

    def assigned_partitions(self) -> list[int]:
        return self.pt.partitions_of(self.nid) if self.pt is not None else []

    def dump_state(self) -> None:
        """SIGUSR1: log locks and waiting requests (to diagnose stalls)."""
        locks = self.locks
        log.warning("%s: %d transactions, %d write locks, %d read locks, %d delayed",
                    self.label, len(locks.txns), len(locks.write_locks), len(locks.read_locks),
                    len(self.delayed))
        for ttid, txn in sorted(locks.txns.items()):
            log.warning("%s:   txn %s client %s voted=%s tid=%s objects=%s checked=%s", self.label,
                        ttid.hex(), nid_str(txn.client), txn.voted,
                        txn.tid.hex() if txn.tid else None,
                        [o.hex() for o in txn.objects], [o.hex() for o in txn.checked])
        for oid, ttid in sorted(locks.write_locks.items()):
            log.warning("%s:   lock %s by %s", self.label, oid.hex(), ttid.hex())
        for key, retry in self.delayed:
            log.warning("%s:   delayed %s %r", self.label, key.hex(), retry)

    # -- delayed requests -------------------------------------------------------------
    def delay(self, key: bytes, retry) -> None:
        delayed = self.delayed
        delayed.append((key, retry))
        if len(delayed) >= self._delayed_prune_at:
            # requests of connections gone since are dropped here, not only
            # at the next replay: a peer that keeps asking then leaves must
            # not grow the list while nothing replays (amortised: the
            # threshold doubles with what is really waiting)
            self.delayed = delayed = [
                item for item in delayed
                if not getattr(getattr(item[1], "conn", None), "closed", False)]
            self._delayed_prune_at = max(1024, 2 * len(delayed))

    def replay(self, poke: bool = True) -> None:
        """Retry delayed requests, oldest transaction first; ``poke``: the
        replicator too (it may wait for locks to go)."""
        if poke:
            self.replicator.locks_released()
        if not self.delayed:
            return
        delayed, self.delayed = self.delayed, []
        delayed.sort(key=lambda item: item[0])
        for _, retry in delayed:
            try:
                retry()
            except Exception as e:
                if self.fatal_error(e, "a delayed request"):
                    return
                # one broken request must not strand the others
                log.exception("%s: error replaying a delayed request", self.label)

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        self.server = await listen(
            self, self.bind, lambda: Connection(self, handlers.IdentificationHandler(self)))
        self.address = self.server.sockets[0].getsockname()[:2]
        log.info("%s: listening on %s:%s, backend %s", self.label, *self.address,
                 self.backend.describe())

    async def run(self) -> int:
        await self.start()
        cycle = watch(self, asyncio.ensure_future(self._master_cycle()), "master cycle",
                      lambda: self.exit(1))
        await self._exit.wait()
        cycle.cancel()
        self.server.close()
        self.replicator.stop()
        self.packer.stop()
        if self.importer is not None:
            self.importer.stop()
        closing = [*self.client_conns, *self.source_conns, *self.peer_conns.values()]
        if self.master_conn is not None:
            closing.append(self.master_conn)
        for conn in closing:
            conn.close("storage exiting", flush=True)
        # What the peers sent before they saw us go (the master's unlock of
        # the last commit, say) is handled with the database still open,
        # and kept by its clean close; at most EXIT_LINGER for peers that
        # do not answer.
        pending = [conn.closed_future for conn in closing if not conn.closed_future.done()]
        if pending:
            await asyncio.wait(pending, timeout=EXIT_LINGER)
            for conn in closing:
                conn.close()  # still lingering: abort, nothing more reaches the database
        gs = self.group_sync
        if gs.syncs:
            log.info("%s: group commit: %d syncs for %d durable points", self.label,
                     gs.syncs, gs.covered)
        self.backend.close()
        return self.exit_status

    def exit(self, status: int = 0) -> None:
        self.exit_status = status
        self._exit.set()

    def fatal_error(self, exc: BaseException, what: str) -> bool:
        """Stop the node if ``exc`` comes from the database (a write failed:
        disk full, I/O error...): what it holds is in an unknown state, and
        answering or carrying on could report as durable what is not.  One
        log line; the peers see the node go.  False for other errors."""
        backend = self.backend
        if not isinstance(exc, backend.errors) or isinstance(exc, backend.input_errors):
            return False
        if not self._exit.is_set():
            log.error("%s: database error (%s: %s) handling %s: stopping, the database is"
                      " in an unknown state", self.label, type(exc).__name__, exc, what)
        self._stop_unsafe(exc)
        return True

    def _stop_unsafe(self, exc: BaseException) -> None:
        """Nothing more is answered: abort every connection now and exit."""
        if self._exit.is_set():
            return
        for conn in [*self.client_conns, *self.source_conns, *self.peer_conns.values()]:
            conn.close()
        if self.master_conn is not None:
            self.master_conn.close()
        self.exit(1)

    async def _master_cycle(self) -> None:
        await follow_master(self, self.masters, lambda: handlers.MasterHandler(self),
                            self._identify, self.master_lost)

    async def _identify(self, conn: Connection) -> None:
        addr = (self.address[0].encode(), self.address[1])
        devpath = [os.uname().nodename.encode()]
        # topology: replicas of a partition should not share a disk either;
        # a database server's backend says where its files are
        device_path = getattr(self.backend, "device_path", None)
        database = getattr(self.backend, "database", None)
        where = device_path() if device_path is not None else (
            os.path.dirname(os.path.abspath(database))
            if database and database != ":memory:" else None)
        if where and os.path.exists(where):
            devpath.append(str(os.stat(where).st_dev).encode())
        node_type, master_nid, my_nid = await conn.ask(
            Packets.RequestIdentification, NodeTypes.STORAGE, self.nid, addr,
            self.name_bytes, None, {b"devpath": devpath, **ANNOUNCEMENT})
        if node_type is not NodeTypes.MASTER:
            raise RemoteError(None, "peer is not a master")  # type: ignore[arg-type]
        conn.nid = master_nid
        if my_nid != self.nid:
            self.nid = my_nid
            self.backend.set_nid(my_nid)
            if self.backend.get_name() is None:
                self.backend.set_name(self.name)
        self.master_conn = conn
        log.info("%s: identified by master %s", self.label, nid_str(master_nid))

    def master_lost(self) -> None:
        log.warning("%s: lost the master", self.label)
        self.master_conn = None
        self.verified = False
        self.stop_operation()

    def start_operation(self, conn: Connection) -> None:
        # conn, not self.master_conn: StartOperation may arrive in the same
        # chunk as AcceptIdentification, before _identify() resumes
        # a truncation we missed verification for: our cells are OUT_OF_DATE
        # (we were not there), so what we have after it is dropped and
        # replication fetches what the cluster committed since
        self.apply_truncation()
        self.backend.drop_unfinished()
        if self.backend.blobs:
            dropped = self.backend.drop_unattached_blobs()
            if dropped:
                log.info("%s: %d blob uploads of unfinished transactions dropped",
                         self.label, dropped)
        if not self.verified:
            self._drop_locked()
        # Transactions still in memory were locked under a previous master
        # and not validated by verification: the master died before their
        # metadata holders locked them, so they are not committed (their
        # rows went with drop_unfinished).  Their locks must go too, or
        # loads and stores of their objects would wait forever.
        for ttid in list(self.locks.txns):
            log.info("%s: forgetting transaction %s locked under the previous master",
                     self.label, ttid.hex())
            self.locks.finish(ttid)
        if self.importer is not None:
            why = self.importer.refusal()
            if why is not None:
                log.error("%s: %s", self.label, why)
                self.exit(2)
                return
        self.operational = True
        self.replicator.start()
        if self.importer is not None:
            self.importer.start()
        log.info("%s: operational", self.label)
        conn.notify(Packets.NotifyReady)
        self.packer.start()

    def _drop_locked(self) -> None:
        """We join a cluster that ran verification without us: it completed
        or dropped our locked transactions without telling us, and our
        cells are OUT_OF_DATE, so replication brings the committed ones."""
        for ttid, tid in self.backend.get_locked_transactions().items():
            if tid is not None:
                log.info("%s: dropping transaction %#x locked before we left", self.label, ttid)
                self.locks.finish(ttid.to_bytes(8, "big"))
                self.backend.abort_transaction(ttid)
        self.backend.commit_pending()

    def set_truncation(self, tid: int) -> None:
        """The master asks to truncate after ``tid``: persist it (a lower
        pending one is kept: truncating more only drops what replication
        brings back to OUT_OF_DATE cells)."""
        pending = self.backend.get_truncate_tid()
        if pending is None or tid < pending:
            self.backend.set_truncate_tid(tid)
        log.warning("%s: truncation after %#x pending", self.label, min(tid, pending or tid))

    def apply_truncation(self) -> None:
        """Apply a pending truncation: delete what was committed after it."""
        tid = self.backend.get_truncate_tid()
        if tid is None:
            return
        log.warning("%s: truncating the database after %#x", self.label, tid)
        # locked transactions committed after it are gone: their read locks
        # must not hold loads back
        for ttid, txn in list(self.locks.txns.items()):
            if txn.tid is not None and int.from_bytes(txn.tid, "big") > tid:
                self.locks.finish(ttid)
        self.backend.truncate(tid)
        self.serials.clear()
        self.pt_history.truncated(tid)
        self.replay()

    def stop_operation(self) -> None:
        self.operational = False
        self.replicator.stop()
        self.packer.stop()
        if self.importer is not None:
            self.importer.stop()
        self.checker.stop()
        for conn in [*self.client_conns, *self.source_conns, *self.peer_conns.values()]:
            conn.close("operation stopped", flush=True)
        for ttid, txn in list(self.locks.txns.items()):
            if txn.voted and not txn.locked:
                # Keep its rows: the master may have died after sending its
                # lock to other storages only, and the next verification
                # then validates it here too.  Unfinished transactions are
                # dropped when operation starts again (drop_unfinished).
                self.locks.abort(ttid)
            elif not txn.locked:
                self.abort(ttid)
        # what was delayed is not replayed: its peer learns it by the close
        # (an identification waiting for the master's word about a client
        # is on no list above, and would wait for its answer forever)
        for _, retry in self.delayed:
            conn = getattr(retry, "conn", None)
            if conn is not None and not conn.closed:
                conn.close("operation stopped", flush=True)
        self.delayed.clear()

    # -- other storage nodes ---------------------------------------------------------
    async def peer_connection(self, nid: int) -> Connection:
        """An identified connection to storage ``nid`` (replication source)."""
        conn = self.peer_conns.get(nid)
        if conn is not None and not conn.closed:
            return conn
        pending = self._connecting.get(nid)
        if pending is not None:
            return await asyncio.shield(pending)
        future = self._connecting[nid] = asyncio.get_running_loop().create_future()
        try:
            conn = await self._connect_peer(nid)
            future.set_result(conn)
            return conn
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: nobody else may be waiting
            raise
        finally:
            del self._connecting[nid]

    async def _connect_peer(self, nid: int) -> Connection:
        node = self.nm.get(nid)
        if node is None or node.address is None:
            raise ConnectionError("no address for %s" % nid_str(nid))
        me = self.nm.get(self.nid)
        conn = await connect(self, peers.DestinationHandler(self), node.address)
        conn.nid = nid
        try:
            addr = (self.address[0].encode(), self.address[1])
            node_type, peer_nid, _ = await conn.ask(
                Packets.RequestIdentification, NodeTypes.STORAGE, self.nid, addr,
                self.name_bytes, me.id_timestamp if me is not None else None,
                ANNOUNCEMENT if self.backend.blobs else NO_BLOB_ANNOUNCEMENT)
        except BaseException:
            conn.close("identification failed")
            raise
        if node_type is not NodeTypes.STORAGE or peer_nid != nid:
            conn.close("not the expected storage")
            raise ConnectionError("%s:%s is not %s" % (*node.address, nid_str(nid)))
        self.peer_conns[nid] = conn
        return conn

    def source_handler(self) -> peers.SourceHandler:
        return peers.SourceHandler(self)

    def peer_lost(self, conn: Connection) -> None:
        self.source_conns.discard(conn)
        if self.peer_conns.get(conn.nid) is conn:
            del self.peer_conns[conn.nid]

    # -- lockless writes (our OUT_OF_DATE cells) ----------------------------------------
    def lockless_pending(self, partition: int) -> bool:
        pt = self.pt
        return any(pt.partition(oid) == partition
                   for txn in self.locks.txns.values() for oid in txn.lockless)

    def lock_lockless(self, partition: int) -> None:
        """Our cell became UP_TO_DATE: writes accepted lockless in it by
        transactions still in progress take real locks, so that later
        transactions conflict with them here too."""
        pt = self.pt
        for ttid, txn in sorted(self.locks.txns.items()):
            for oid in [o for o in txn.lockless if pt.partition(o) == partition]:
                if self.locks.acquire(ttid, oid) is None:
                    txn.lockless.discard(oid)
                    if txn.locked:
                        self.locks.read_locks[oid] = ttid

    # -- transactions -----------------------------------------------------------------------
    def abort(self, ttid: bytes) -> None:
        txn = self.locks.txns.get(ttid)
        if txn is not None and txn.locked:
            return
        self.locks.abort(ttid)
        if txn is None:
            return
        if txn.uploads:
            drop_uploads(self.backend, txn)
            self.pending_written()
        if txn.voted or txn.objects:
            data_ids = [] if txn.voted else [d for _, d, _ in txn.objects.values() if d is not None]
            for sub in txn.subs or (int.from_bytes(ttid, "big"),):  # a bulk copy's: each
                self.backend.abort_transaction(sub, data_ids)
                data_ids = []
            self.pending_written()
        self.replay()

    def pending_written(self, objects: int = 0) -> None:
        """The backend may hold non-durable writes (unlocks, aborts): make
        sure they reach the disk within a second even if nothing durable
        follows.  Those of ``objects`` >= EARLY_WRITE_OBJECTS (the unvoted
        rows or the unlock of a big transaction) are written as soon as
        the requests already received are handled: the next lock, which a
        client waits for, would write them otherwise."""
        if objects >= EARLY_WRITE_OBJECTS:
            if self._pending_timer is not None:
                self._pending_timer.cancel()
            self._pending_timer = asyncio.get_event_loop().call_soon(self._commit_pending)
        elif self._pending_timer is None:
            self._pending_timer = asyncio.get_event_loop().call_later(1.0, self._commit_pending)

    def _commit_pending(self) -> None:
        self._pending_timer = None
        try:
            self.backend.commit_pending()
        except Exception as e:
            if not self.fatal_error(e, "pending changes"):
                log.exception("%s: cannot write pending changes", self.label)
                self.exit(1)

    def node_changed(self, node) -> None:
        if node.nid == self.nid:
            if node.state is NodeStates.DOWN:
                log.info("%s: told to stop by the master", self.label)
                self.exit(0)
            elif node.state is NodeStates.UNKNOWN:
                log.warning("%s: dropped from the cluster: erasing the database", self.label)
                self.backend.erase()
                self.exit(0)
        elif node.type is NodeTypes.CLIENT and node.state is NodeStates.UNKNOWN:
            # the master forgot the client: none of its unlocked transactions can finish
            for txn in self.locks.client_transactions(node.nid):
                self.abort(txn.ttid)
