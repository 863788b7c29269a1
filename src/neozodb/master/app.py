"""A master: as primary, cluster state, node registry, partition table,
OID/TID allocation and two-phase commit coordination; as secondary, a
mirror of the primary's state (``master/secondary.py``).

Runs in one asyncio loop.  A master plays primary from its start and
whenever it loses its primary; the election (``master/election.py``) may
make it yield and follow another.  As primary, the cluster goes RECOVERING
-> VERIFYING -> RUNNING, back to RECOVERING when the partition table stops
being operational, and to STOPPING on request, after which every master
exits.
"""
from __future__ import annotations

import asyncio
import logging
import time

from neozodb.master import checks, election, handlers, secondary
from neozodb.master.pack import Order, PackManager
from neozodb.master.transactions import TransactionError, TransactionManager
from neozodb.master.tweak import drop_changes
from neozodb.net.connection import Connection, ConnectionClosed, HandlerError, RemoteError
from neozodb.nodes import Node, NodeManager
from neozodb.protocol import (
    ZERO_TID,
    CellStates,
    ClusterStates,
    NodeStates,
    NodeTypes,
    Packets,
    make_nid,
    nid_str,
    p64,
    u64,
)
from neozodb.protocol.features import FEATURES
from neozodb.pt import PartitionTable

log = logging.getLogger("neozodb.master")


class StoppedOperation(Exception):
    """The partition table is no longer operational: back to recovery."""


class MasterApp:
    def __init__(self, name: str, bind: tuple[str, int], partitions: int = 100,
                 replicas: int = 0, autostart: int = 0, masters: list | None = None,
                 hold_timeout: float = 30.0, nid: int | None = None) -> None:
        self.name = name
        self.name_bytes = name.encode()
        self.bind = bind
        self.address: tuple[str, int] | None = None
        self.num_partitions = partitions
        self.num_replicas = replicas
        self.autostart = autostart
        # every master of the cluster, this one included; by default a
        # master is named after its place in the list (M1, M2...)
        self.masters: list[tuple[str, int]] = list(masters or ())
        if bind not in self.masters and bind[1]:
            self.masters.append(bind)
        index = self.masters.index(bind) + 1 if bind in self.masters else 1
        self.nid = nid if nid is not None else make_nid(NodeTypes.MASTER, index)
        # election (master/election.py): when this master started playing
        # primary, masters not heard from yet, whether it may still yield
        self.election_time = 0.0
        self.election_pending: set[tuple[str, int]] = set()
        self.electing = False
        self._yielded: asyncio.Future | None = None
        # as secondary: the primary followed and the connection to it
        self.primary_address: tuple[str, int] | None = None
        self.primary_conn: Connection | None = None
        # what a former secondary knew when it took over (take_over)
        self.inherited_pt: PartitionTable | None = None
        self.inherited_ids = (0, 0)
        self.nm = NodeManager()
        self.pt: PartitionTable | None = None
        self.tm = TransactionManager(partitions)
        self.cluster_state = ClusterStates.RECOVERING
        self.startup_allowed = False
        self.last_id_timestamp = 0.0
        self._temporary_nids: dict = {}  # node type -> last number given
        self._changed = asyncio.Event()  # wakes the phase waiting for a condition
        self._client_features: frozenset[bytes] | None = None  # last offered to clients
        self._stop_operation = asyncio.Event()
        self._exit = asyncio.Event()
        self.stopping = False
        self.ready_storages: set[int] = set()  # NotifyReady received
        self.delayed_begins: list = []
        self.recovery: dict[int, tuple] = {}  # nid -> AnswerRecovery args
        self._loading_pt: tuple | None = None  # (nid, ptid) asked for its table
        # replication: cells whose node asked for unfinished transactions
        # (only those may become UP_TO_DATE), and who waits for which ttid
        self.updatable: set[tuple[int, int]] = set()  # (nid, offset)
        self.finish_watchers: dict[int, set[int]] = {}  # ttid -> storage nids
        self.final_tid_waiters: dict[int, list] = {}  # ttid -> [(client conn, msg_id)]
        self.check_run = None  # the last `neoctl check` (master/checks.py)
        self.pm = PackManager()  # pack orders, completion, WaitForPack
        # storage label -> last import status it reported (neoctl print import)
        self.import_status: dict[str, dict] = {}
        # `neoctl truncate`: storages delete what was committed after this
        # tid; pending from the request (or, after a restart, from the
        # storages' reports) until verification applied it
        self.truncate_tid: int | None = None
        self._truncating: set[int] = set()  # storages asked to persist it
        self._startup_allowed_before_truncation = False
        # storages of the table absent from the verification that applied a
        # truncation (`neoctl start` without them): nid -> tid, told when
        # they come back
        self.missed_truncation: dict[int, int] = {}
        # clients identifying while the cluster is not RUNNING:
        # (conn, accept, refuse, timer), see hold_client
        self.held_clients: list[tuple] = []
        self.hold_timeout = hold_timeout
        self.server: asyncio.base_events.Server | None = None

    @property
    def label(self) -> str:
        return nid_str(self.nid)

    # -- helpers used by the handlers -------------------------------------------
    def id_timestamp(self) -> float:
        now = time.time()
        if now <= self.last_id_timestamp:
            now = self.last_id_timestamp + 1e-6
        self.last_id_timestamp = now
        return now

    def temporary_nid(self, node_type: NodeTypes) -> int:
        """A new NID for a client or admin, never one used before by this
        master: a recycled NID could be mistaken for its previous owner."""
        n = self._temporary_nids.get(node_type, 0)
        while True:
            n = n % 0xFFFFFF + 1
            nid = make_nid(node_type, n)
            if self.nm.get(nid) is None:
                self._temporary_nids[node_type] = n
                return nid

    def changed(self) -> None:
        self._changed.set()
        self.refresh_client_features()

    def client_features(self) -> frozenset[bytes]:
        """What clients may use: ``gc-pack`` only while every storage of
        the table announced it (protocol/features.py)."""
        if self.pt is not None:
            for nid in self.pt.nids():
                node = self.nm.get(nid)
                if node is None or b"gc-pack" not in node.features:
                    return FEATURES - {b"gc-pack"}
        return FEATURES

    def refresh_client_features(self) -> None:
        features = self.client_features()
        if features == self._client_features:
            return
        if self._client_features is not None:
            log.info("%s: clients may now use: %s", self.label,
                     ", ".join(sorted(f.decode() for f in features)))
        self._client_features = features
        for node in self.nm.of_type(NodeTypes.CLIENT):
            if node.connected and node.features:
                node.conn.peer_features = node.features & features
                node.conn.notify(Packets.NotifyFeatures, sorted(features))

    def self_node(self) -> Node:
        return Node(NodeTypes.MASTER, self.nid, self.address, NodeStates.RUNNING, None)

    @staticmethod
    def visible_to(recipient: Node, node: Node) -> bool:
        """Which node entries each node is told about."""
        t = node.type
        r = recipient.type
        if r is NodeTypes.CLIENT:
            return t in (NodeTypes.MASTER, NodeTypes.STORAGE)
        if r is NodeTypes.MASTER:  # what a secondary mirrors; NEO's: masters only
            return t is NodeTypes.MASTER or (
                t is NodeTypes.STORAGE and b"mirror" in recipient.conn.peer_features)
        return t is not NodeTypes.ADMIN or r is NodeTypes.ADMIN

    @staticmethod
    def follows_table(node: Node) -> bool:
        """Whether ``node`` is sent the partition table and its changes: not
        a NEO secondary master (protocol/features.py, ``mirror``)."""
        return node.type is not NodeTypes.MASTER or b"mirror" in node.conn.peer_features

    def send_node_list(self, node: Node) -> None:
        entries = [node.wire(), self.self_node().wire()]
        entries += [n.wire() for n in self.nm if n is not node and self.visible_to(node, n)]
        node.conn.notify(Packets.NotifyNodeInformation, time.time(), entries)

    def broadcast_nodes(self, changed: list[Node], exclude: Node | None = None) -> None:
        now = time.time()
        for peer in self.nm:
            if not peer.connected or peer is exclude:
                continue
            entries = [n.wire() for n in changed if self.visible_to(peer, n)]
            if entries:
                peer.conn.notify(Packets.NotifyNodeInformation, now, entries)

    def send_pt(self, node: Node) -> None:
        if self.pt is not None and self.pt.ptid is not None and self.follows_table(node):
            node.conn.notify(Packets.SendPartitionTable, self.pt.ptid, self.pt.num_replicas,
                             self._wire_rows())

    def _wire_rows(self) -> list:
        return [[(nid, CellStates(state)) for nid, state in row] for row in self.pt.rows()]

    def apply_pt_changes(self, changes: list, replicas: int | None = None) -> None:
        """Apply cell changes and/or a new number of replicas to the table,
        bumping its id, and broadcast them (NotifyPartitionChanges).  Nothing
        happens if neither changes."""
        pt = self.pt
        if replicas is None:
            replicas = pt.num_replicas
        if not changes and replicas == pt.num_replicas:
            return
        ptid = pt.ptid + 1
        pt.apply_changes(ptid, replicas, changes)
        # a changed cell needs a new AskUnfinishedTransactions before a
        # replication done report may make it UP_TO_DATE
        self.updatable.difference_update((nid, offset) for offset, nid, _ in changes)
        self.refresh_client_features()
        wire = [(offset, nid, CellStates(state)) for offset, nid, state in changes]
        for peer in self.nm:
            if peer.connected and (peer.type is not NodeTypes.STORAGE or peer.running) \
                    and self.follows_table(peer):
                peer.conn.notify(Packets.NotifyPartitionChanges, ptid, replicas, wire)

    def set_cluster_state(self, state: ClusterStates) -> None:
        if state is self.cluster_state:
            return
        log.info("%s: cluster state %s -> %s", self.label,
                 getattr(self.cluster_state, "name", None), state.name)
        self.cluster_state = state
        for peer in self.nm:
            if peer.connected:
                peer.conn.notify(Packets.NotifyClusterInformation, state)
        if state is ClusterStates.RUNNING or state is ClusterStates.STOPPING:
            self.release_clients()

    def hold_client(self, conn: Connection, accept, refuse) -> None:
        """Answer a client's identification once the cluster runs; refuse it
        with NOT_READY after ``hold_timeout`` seconds."""
        def expire():
            entry[3] = None
            if entry in self.held_clients:
                self.held_clients.remove(entry)
                if not conn.closed:
                    refuse("cluster is not running (waited %g s)" % self.hold_timeout)
                    conn.close("cluster not running", flush=True)
        timer = asyncio.get_running_loop().call_later(self.hold_timeout, expire)
        entry = [conn, accept, refuse, timer]
        self.held_clients.append(entry)
        log.info("%s: client at %s waits for the cluster to run", self.label, conn.peer)

    def release_clients(self) -> None:
        held, self.held_clients = self.held_clients, []
        for conn, accept, refuse, timer in held:
            if timer is not None:
                timer.cancel()
            if not conn.closed:
                try:
                    accept()
                except HandlerError as e:  # e.g. the cluster is stopping
                    refuse(str(e))
                    conn.close(str(e), flush=True)

    def set_node_state(self, node: Node, state: NodeStates) -> None:
        if node.state is not state:
            node.state = state
            self.broadcast_nodes([node])

    def running_storage_nids(self) -> set[int]:
        return {n.nid for n in self.nm.storages(NodeStates.RUNNING) if n.connected}

    # -- lifecycle --------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: Connection(self, handlers.IdentificationHandler(self)), *self.bind)
        sock = self.server.sockets[0]
        self.address = sock.getsockname()[:2]
        log.info("%s: listening on %s:%s, cluster %r", self.label, *self.address, self.name)

    async def run(self) -> None:
        await self.start()
        roles = asyncio.ensure_future(self._roles())
        await self._exit.wait()
        roles.cancel()
        self.server.close()
        for node in self.nm:
            if node.connected:
                node.conn.close("master exiting", flush=True)
        if self.primary_conn is not None:
            self.primary_conn.close("master exiting", flush=True)

    async def _roles(self) -> None:
        try:
            while not self.stopping:
                followed = await self._play_primary()
                if followed is None:
                    break
                await secondary.follow(self, *followed)
                if not self.stopping:
                    self.take_over()
        except Exception:
            log.exception("%s: fatal error", self.label)
            self._exit.set()

    async def _play_primary(self) -> tuple | None:
        """Run the cluster until it stops (None), or until the election
        makes this master yield: then (address, connection or None) of the
        primary to follow."""
        self.election_time = time.time()
        self.startup_allowed = False  # see _recovery_done: no split brain
        self._yielded = asyncio.get_running_loop().create_future()
        phases = asyncio.ensure_future(self._phases())
        try:
            await asyncio.wait([phases, self._yielded], return_when=asyncio.FIRST_COMPLETED)
        finally:
            phases.cancel()
        return self._yielded.result() if self._yielded.done() else None

    def yield_to(self, address: tuple[str, int], conn: Connection | None = None,
                 nid: int | None = None) -> None:
        """The election says the master at ``address`` is the primary
        (``conn``: our accepted identification, ``nid``: the id it gave us).
        Only while electing; later claims are closed and ignored."""
        if not self.electing or self._yielded is None or self._yielded.done():
            if conn is not None:
                conn.close("not electing any more")
            return
        log.info("%s: the primary master is at %s:%s", self.label, *address)
        self.electing = False
        self.primary_address = address
        self.primary_conn = conn
        if nid is not None:
            self.nid = nid
        # everything that identified with us as primary goes: storages and
        # clients reconnect, and are sent to the primary
        for node in self.nm:
            if node.connected and node.conn is not conn:
                node.conn.close("yielding to the primary at %s:%s" % address, flush=True)
        held, self.held_clients = self.held_clients, []
        for held_conn, _, _, timer in held:
            if timer is not None:
                timer.cancel()
            held_conn.close("yielding to the primary", flush=True)
        self.nm = NodeManager()
        self.pt = None
        self.recovery.clear()
        self.cluster_state = None
        self._yielded.set_result((address, conn))

    def take_over(self) -> None:
        """The secondary lost its primary: start playing primary from the
        mirrored state (nodes known but not connected, table, last IDs)."""
        self.nm.remove(self.nid)
        for node in self.nm:
            node.conn = None
            if node.type in (NodeTypes.STORAGE, NodeTypes.MASTER):
                node.state = NodeStates.DOWN
            else:
                self.nm.remove(node.nid)
        self.inherited_pt = self.pt
        self.inherited_ids = (self.tm.last_tid, self.tm.last_oid)
        self.cluster_state = None
        log.info("%s: taking over (table %s, last tid %#x, last oid %#x)", self.label,
                 self.pt.ptid if self.pt is not None else None, *self.inherited_ids)

    def redirect(self, conn: Connection, msg_id: int, primary: tuple[str, int] | None) -> None:
        """Answer an identification with NotPrimaryMaster, then close."""
        masters = list(self.masters)
        if primary is not None and primary not in masters:
            masters.append(primary)
        conn.answer(msg_id, Packets.NotPrimaryMaster,
                    None if primary is None else masters.index(primary),
                    [(host.encode(), port) for host, port in masters])
        conn.close("not the primary master", flush=True)

    async def _phases(self) -> None:
        try:
            while not self.stopping:
                await self.recover()
                try:
                    await self.verify()
                    await self.serve()
                except StoppedOperation as e:
                    log.warning("%s: operation stopped: %s", self.label, e)
                    self.stop_operation()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: fatal error", self.label)
            self._exit.set()

    async def _wait(self, condition) -> None:
        while not condition():
            self._changed.clear()
            await self._changed.wait()

    # -- recovery -------------------------------------------------------------------
    async def recover(self) -> None:
        self.set_cluster_state(ClusterStates.RECOVERING)
        self.electing = True
        electing = asyncio.ensure_future(election.run(self))
        self.pt, self.inherited_pt = self.inherited_pt, None
        self.recovery.clear()
        self.ready_storages.clear()
        self.updatable.clear()
        self.finish_watchers.clear()
        self.final_tid_waiters.clear()
        for node in self.nm.storages():
            if node.connected:
                self.set_node_state(node, NodeStates.PENDING)
                self.ask_recovery(node)
        try:
            await self._wait(self._recovery_done)
        finally:
            electing.cancel()
        self.electing = False
        selected = [n for n in self.nm.storages(NodeStates.PENDING) if n.connected]
        if self.pt is None:
            pt = PartitionTable(self.num_partitions, self.num_replicas)
            pt.make(sorted(n.nid for n in selected))
            self.pt = pt
            log.info("%s: created partition table over %s", self.label,
                     " ".join(n.label for n in selected))
        else:
            selected = [n for n in selected if n.nid in self.pt.nids()]
        for node in selected:
            self.set_node_state(node, NodeStates.RUNNING)
        # nodes of the table that are not here are known, but down
        for nid in self.pt.nids():
            if self.nm.get(nid) is None:
                self.nm.add(Node(NodeTypes.STORAGE, nid, state=NodeStates.DOWN))
        for nid in self.pt.nids() - self.running_storage_nids():
            changes = self.pt.outdate(nid)
            if changes:
                self.pt.apply_changes(self.pt.ptid + 1, self.pt.num_replicas, changes)

    def ask_recovery(self, node: Node) -> None:
        def answered(conn, result, error):
            if error is None:
                self.recovery[node.nid] = result
                self.changed()
        node.conn.ask(Packets.AskRecovery, callback=answered)

    def _recovery_done(self) -> bool:
        if self.election_pending:
            return False  # another master may still claim to be primary
        pending = [n for n in self.nm.storages(NodeStates.PENDING) if n.connected]
        if any(n.nid not in self.recovery for n in pending):
            return False
        best = max((r[0] for r in self.recovery.values() if r[0] is not None), default=None)
        if best is not None and (self.pt is None or self.pt.ptid < best):
            source = next(n for n in pending if self.recovery[n.nid][0] == best)
            self._load_pt(source, best)
            return False
        if self.pt is not None:  # from a storage, or inherited (take_over)
            here = {n.nid for n in pending}
            if self._truncation_pending(pending):
                return False
            readable = {nid for p in range(self.pt.num_partitions) for nid in self.pt.readable_nids(p)}
            if self.truncate_tid is not None:
                readable = self.pt.nids()  # a truncation waits for every node of the table
            if readable <= here:
                return True
            return self.startup_allowed and self.pt.operational(here)
        if not pending:
            return False
        if self.startup_allowed:
            return True
        return 0 < self.autostart <= len(pending)

    def _load_pt(self, node: Node, ptid: int) -> None:
        if self._loading_pt == (node.nid, ptid):
            return
        self._loading_pt = (node.nid, ptid)

        def answered(conn, result, error):
            self._loading_pt = None
            if error is None:
                got_ptid, replicas, rows = result
                pt = PartitionTable(len(rows), replicas)
                pt.load(got_ptid, replicas, rows)
                self.pt = pt
                self.num_partitions = len(rows)
                self.tm.num_partitions = len(rows)
                for nid in pt.nids():
                    if self.nm.get(nid) is None:
                        self.nm.add(Node(NodeTypes.STORAGE, nid, state=NodeStates.DOWN))
                for admin in self.nm.of_type(NodeTypes.ADMIN):
                    if admin.connected:
                        self.send_pt(admin)
            self.changed()
        node.conn.ask(Packets.AskPartitionTable, callback=answered)

    # -- verification -------------------------------------------------------------
    async def verify(self) -> None:
        self.set_cluster_state(ClusterStates.VERIFYING)
        storages = [n for n in self.nm.storages(NodeStates.RUNNING) if n.connected]
        for node in self.nm:
            if node.connected and node.type is not NodeTypes.CLIENT:
                self.send_pt(node)
        readable = {nid for p in range(self.pt.num_partitions) for nid in self.pt.readable_nids(p)}
        try:
            answers = await asyncio.gather(*(
                n.conn.ask(Packets.AskLockedTransactions) for n in storages if n.nid in readable))
            locked: dict[bytes, bytes | None] = {}
            for (txns,) in answers:
                for ttid, tid in txns.items():
                    if tid is not None or ttid not in locked:
                        locked[ttid] = tid if tid is not None else locked.get(ttid)
            for ttid, tid in locked.items():
                if tid is None:
                    # voted but no metadata holder says locked: maybe committed already
                    for node in storages:
                        if node.nid in self.pt.readable_nids(self.pt.partition(ttid)):
                            (final,) = await node.conn.ask(Packets.AskFinalTID, ttid)
                            if final is not None:
                                tid = final
                                break
                if tid is not None:
                    log.info("%s: validating transaction %s (tid %s)", self.label, ttid.hex(), tid.hex())
                    for node in storages:
                        node.conn.notify(Packets.ValidateTransaction, ttid, tid)
            ids = await asyncio.gather(*(n.conn.ask(Packets.AskLastIDs) for n in storages))
            # pack orders live in the storages' tables (after the truncation
            # AskLastIDs applied)
            packs = await asyncio.gather(*(self._pack_orders_of(n)
                                           for n in storages if n.nid in readable))
        except (ConnectionClosed, RemoteError) as e:
            raise StoppedOperation(f"storage lost during verification: {e}") from None
        # a former secondary also knows what its primary committed and gave
        last_tid = max((u64(t) for t, _, _ in ids if t is not None), default=0)
        last_oid = max((u64(o) for _, o, _ in ids if o is not None), default=0)
        if self.truncate_tid is not None:
            self.inherited_ids = (0, 0)  # what the old primary knew is cut off
        last_tid = max(last_tid, self.inherited_ids[0])
        last_oid = max(last_oid, self.inherited_ids[1])
        self.inherited_ids = (0, 0)
        self.tm.reset(last_tid, last_oid)
        self.pm.reset()
        for orders in packs:
            for entry in orders:
                order = Order.from_wire(entry)
                if order.approved is None:
                    order.approved = True  # we approve every order
                self.pm.learned(order)
        log.info("%s: verified: last tid %#x, last oid %#x, %d pack orders", self.label,
                 last_tid, last_oid, len(self.pm.orders))
        self._truncation_done(storages)

    async def _pack_orders_of(self, node: Node) -> list:
        """Every pack order in a storage's table (answers come in pages)."""
        orders: list = []
        min_tid = ZERO_TID
        while True:
            (page,) = await node.conn.ask(Packets.AskPackOrders, min_tid)
            if not page:
                return orders
            orders += page
            min_tid = p64(u64(page[-1][0]) + 1)

    # -- service ------------------------------------------------------------------
    async def serve(self) -> None:
        self._stop_operation.clear()
        self.set_cluster_state(ClusterStates.RUNNING)
        for node in self.nm.storages(NodeStates.RUNNING):
            if node.connected:
                self.start_storage(node)
        await self._stop_operation.wait()
        if not self.stopping:
            raise StoppedOperation("truncation requested" if self.truncate_tid is not None
                                   else "partition table not operational")

    def start_storage(self, node: Node) -> None:
        self.ready_storages.discard(node.nid)
        node.conn.notify(Packets.StartOperation, False)

    def storage_ready(self, node: Node) -> None:
        self.ready_storages.add(node.nid)
        self.replay_begins()

    def storages_starting(self) -> bool:
        return any(n.nid not in self.ready_storages
                   for n in self.nm.storages(NodeStates.RUNNING) if n.connected)

    def replay_begins(self) -> None:
        if self.storages_starting() or self.stopping:
            return
        begins, self.delayed_begins = self.delayed_begins, []
        for begin in begins:
            begin()

    def stop_operation(self) -> None:
        """Leave RUNNING: storages and clients stop; storages become PENDING."""
        for node in self.nm:
            if not node.connected:
                continue
            if node.type is NodeTypes.CLIENT:
                node.conn.notify(Packets.StopOperation)
                node.conn.close("operation stopped", flush=True)
            elif node.type is NodeTypes.STORAGE:
                node.conn.notify(Packets.StopOperation)
        self.delayed_begins.clear()

    def check_operational(self) -> None:
        if self.cluster_state is ClusterStates.RUNNING and not self.pt.operational(
                self.running_storage_nids()):
            self._stop_operation.set()

    # -- commits ----------------------------------------------------------------------
    def involved_storages(self, ttid: bytes, oids, deleted, checked) -> set[int]:
        pt = self.pt
        parts = {pt.partition(ttid)} | {pt.partition(oid) for oid in oids}
        parts.update(deleted)
        parts.update(checked)
        ready = self.ready_storages
        running = self.running_storage_nids()
        return {nid for p in parts for nid in pt.writable_nids(p) if nid in running and nid in ready}

    def finish(self, conn: Connection, msg_id: int, ttid: bytes, oids, deleted, checked,
               pack=None) -> None:
        if pack is not None:
            pack_tid = u64(pack[1])
            if not 0 < pack_tid <= self.tm.last_tid:
                raise TransactionError(
                    "cannot pack up to %#x: the last transaction is %#x" % (
                        pack_tid, self.tm.last_tid) if pack_tid else "cannot pack up to tid 0")
            importing = sorted(label for label, status in self.import_status.items()
                               if status.get("state") != "finished")
            if importing:
                raise TransactionError(
                    "cannot pack while an import is unfinished (%s: see neoctl print import)"
                    % " ".join(importing))
        involved = self.involved_storages(ttid, oids, deleted, checked)
        txn = self.tm.prepare(u64(ttid), time.time(), list(oids), involved)
        txn.finish_request = (conn, msg_id)
        if pack is not None:
            txn.pack = (pack[0], u64(pack[1]))
        for oid in oids:
            self.tm.saw_oid(u64(oid))
        tid = p64(txn.tid)

        def locked(sconn, result, error):
            if error is None:
                self.tm.locked(txn.ttid, sconn.nid)
                self.complete_commits()
            elif not isinstance(error, ConnectionClosed):
                # a storage that cannot lock is treated as lost
                sconn.close("lock of %s failed: %s" % (ttid.hex(), error))
            # a lost storage is dealt with by node_lost: whether the commit
            # can go on without it depends on the cells left

        for nid in involved:
            # every pack order is approved
            self.nm.get(nid).conn.ask(Packets.AskLockInformation, ttid, tid, txn.pack is not None,
                                      callback=locked)
        self.complete_commits()

    def complete_commits(self) -> None:
        for txn in self.tm.committable():
            ttid, tid = p64(txn.ttid), p64(txn.tid)
            conn, msg_id = txn.finish_request
            conn.answer(msg_id, Packets.AnswerTransactionFinished, ttid, tid)
            # other clients invalidate; secondaries mirror the last IDs
            for peer in self.nm:
                if peer.type is NodeTypes.CLIENT:
                    if not txn.oids or peer.conn is conn:
                        continue
                elif peer.type is not NodeTypes.MASTER:
                    continue
                if peer.connected and self.follows_table(peer):
                    peer.conn.notify(Packets.InvalidateObjects, tid, txn.oids)
            for nid in txn.involved:
                node = self.nm.get(nid)
                if node is not None and node.connected:
                    node.conn.notify(Packets.NotifyUnlockInformation, ttid)
            self.transaction_finished(txn.ttid, txn.tid)
            log.debug("%s: committed %s (ttid %s) by %s", self.label, tid.hex(), ttid.hex(),
                      nid_str(txn.client))
            if txn.pack is not None:
                self.pm.committed(txn.tid, *txn.pack)
                self.learn_pack(txn.tid, sorted(txn.involved))
        self.maybe_exit()

    # -- pack ---------------------------------------------------------------------------
    def learn_pack(self, tid: int, nids: list[int]) -> None:
        """The pack transaction ``tid`` committed: ask a storage holding its
        metadata what the order is (whether it is a GC pack is in the
        transaction's extension, which only they read), then tell every
        storage it is approved."""
        partition = self.pt.partition(p64(tid))
        cells = set(self.pt.writable_nids(partition))
        for nid in nids:
            node = self.nm.get(nid)
            if nid in cells and node is not None and node.connected:
                break
        else:
            order = self.pm.guess(tid)
            log.warning("%s: nobody to ask about pack order %#x: taken as %s", self.label, tid,
                        order)
            self.pack_signed(tid)
            return

        def answered(conn, result, error):
            if tid not in self.pm.learning:
                return  # a verification rebuilt the orders meanwhile
            if error is None:
                for entry in result[0]:
                    order = Order.from_wire(entry)
                    if order.tid == tid:
                        order.approved = True
                        self.pm.learned(order)
                        log.info("%s: pack order %#x up to %#x (%s)", self.label, tid,
                                 order.pack_tid, "GC of %d objects" % len(order.oids) if order.gc
                                 else "partial" if order.partial else "history")
                        self.pack_signed(tid)
                        return
            self.learn_pack(tid, [n for n in nids if n != nid])
        node.conn.ask(Packets.AskPackOrders, p64(tid), callback=answered)

    def pack_signed(self, tid: int) -> None:
        for node in self.nm.storages():
            if node.connected and node.state is NodeStates.RUNNING:
                node.conn.notify(Packets.NotifyPackSigned, [p64(tid)], [])
        self.check_pack_waiters()

    def pack_nids(self) -> set[int]:
        """Storages whose completion a pack waits for: running, in the table."""
        return self.running_storage_nids() & self.pt.nids() if self.pt is not None else set()

    def check_pack_waiters(self) -> None:
        for callback in self.pm.ready_waiters(self.pack_nids()):
            callback()

    # -- replication ----------------------------------------------------------------------
    def unfinished_transactions(self, node: Node, offsets) -> tuple[int, list[int]]:
        """A storage starts replicating ``offsets``: what is committed, and
        which transactions in progress it must wait for (they may not have
        written to its cells)."""
        ttids = list(self.tm.txns)
        for ttid in ttids:
            self.finish_watchers.setdefault(ttid, set()).add(node.nid)
        for offset in offsets:
            self.updatable.add((node.nid, offset))
        return self.tm.last_tid, ttids

    def transaction_finished(self, ttid: int, tid: int) -> None:
        for conn, msg_id in self.final_tid_waiters.pop(ttid, ()):
            conn.answer(msg_id, Packets.AnswerFinalTID, p64(tid))
        for nid in self.finish_watchers.pop(ttid, ()):
            node = self.nm.get(nid)
            if node is not None and node.connected:
                node.conn.notify(Packets.NotifyTransactionFinished, p64(ttid), p64(tid))

    def forget_replication(self, nid: int) -> None:
        self.updatable = {cell for cell in self.updatable if cell[0] != nid}
        for nids in self.finish_watchers.values():
            nids.discard(nid)

    def replication_done(self, node: Node, offset: int, tid: bytes) -> None:
        pt = self.pt
        state = dict(pt.cells(offset)).get(node.nid)
        if state != CellStates.OUT_OF_DATE.value or (node.nid, offset) not in self.updatable:
            log.warning("%s: ignoring replication done of partition %d from %s (cell %s)",
                        self.label, offset, node.label, state)
            return
        self.updatable.discard((node.nid, offset))
        changes = [(offset, node.nid, CellStates.UP_TO_DATE.value)]
        # replaced copies go once enough up-to-date ones exist
        cells = dict(pt.cells(offset))
        cells[node.nid] = CellStates.UP_TO_DATE.value
        feeding = sorted(nid for nid, s in cells.items() if s == CellStates.FEEDING.value)
        up = sum(1 for s in cells.values() if s == CellStates.UP_TO_DATE.value)
        if all(s in (CellStates.UP_TO_DATE.value, CellStates.FEEDING.value) for s in cells.values()):
            extra = len(feeding)
        else:
            extra = max(0, up + len(feeding) - (pt.num_replicas + 1))
        changes += [(offset, nid, CellStates.DISCARDED.value) for nid in feeding[:extra]]
        log.info("%s: partition %d up to date on %s at %s", self.label, offset, node.label,
                 tid.hex())
        self.apply_pt_changes(changes)

    # -- node loss ----------------------------------------------------------------------
    def node_lost(self, node: Node) -> None:
        if self.nm.get(node.nid) is not node:
            return  # dropped from the cluster: already forgotten
        if node.type is NodeTypes.STORAGE:
            self.ready_storages.discard(node.nid)
            if self.cluster_state is ClusterStates.RECOVERING or node.state is NodeStates.PENDING:
                self.recovery.pop(node.nid, None)
                if self.pt is not None and node.nid in self.pt.nids():
                    self.set_node_state(node, NodeStates.DOWN)
                else:
                    self.nm.remove(node.nid)
                    node.state = NodeStates.UNKNOWN
                    self.broadcast_nodes([node])
                self.changed()
                return
            self.set_node_state(node, NodeStates.DOWN)
            self.forget_replication(node.nid)
            checks.checker_lost(self, node.nid)
            self.pm.forget(node.nid)
            self.check_pack_waiters()  # a pack no longer waits for it
            if self.pt is not None:
                self.apply_pt_changes(self.pt.outdate(node.nid))
            self.check_operational()
            if not self._stop_operation.is_set():
                # every partition still has a readable copy on a running
                # storage, which locks or locked each transaction: they may
                # complete without the lost one.  Otherwise they must not be
                # reported committed: the cluster stops, and verification
                # decides after restart.
                self.tm.storage_lost(node.nid)
                self.complete_commits()
            self.replay_begins()
        elif node.type is NodeTypes.CLIENT:
            for txn in self.tm.client_lost(node.nid):
                log.info("%s: aborting %s of lost client %s", self.label, p64(txn.ttid).hex(), node.label)
                self.transaction_finished(txn.ttid, self.tm.last_tid)
            self.complete_commits()  # some may have waited behind an imposed TID
            self.nm.remove(node.nid)
            node.state = NodeStates.UNKNOWN
            self.broadcast_nodes([node])
        else:
            self.nm.remove(node.nid)
            if node.type is NodeTypes.MASTER:
                node.state = NodeStates.DOWN
                self.broadcast_nodes([node])
        self.changed()

    # -- administration -------------------------------------------------------------------
    def drop_storage(self, node: Node) -> None:
        """Remove a storage from the table and the cluster for good.  If it
        is connected, being told UNKNOWN makes it erase its database."""
        self.apply_pt_changes(drop_changes(self.pt, node.nid))
        self.ready_storages.discard(node.nid)
        self.forget_replication(node.nid)
        node.state = NodeStates.UNKNOWN
        self.broadcast_nodes([node])  # the node itself included
        self.nm.remove(node.nid)
        self.pm.forget(node.nid)
        self.check_pack_waiters()
        log.info("%s: %s dropped", self.label, node.label)
        self.check_operational()
        self.changed()

    def exit(self) -> None:
        """SIGTERM/SIGINT: on the primary, stop the cluster as `set cluster
        STOPPING` does; a secondary just exits."""
        if self.primary_address is not None:
            self.stopping = True
            self.exit_now()
        else:
            self.request_stop()

    def exit_now(self) -> None:
        self._exit.set()

    def request_stop(self) -> None:
        """STOPPING: no new transaction; exit once the pending ones are done."""
        if self.stopping:
            return
        self.stopping = True
        self.set_cluster_state(ClusterStates.STOPPING)
        self.maybe_exit()
        self.changed()

    def maybe_exit(self) -> None:
        if not self.stopping or self.tm.prepared_count() or self._exit.is_set():
            return
        # storages told they are DOWN exit by themselves, after unlocking
        down = [n for n in self.nm.storages() if n.connected]
        for node in down:
            node.state = NodeStates.DOWN
        self.broadcast_nodes(down)
        log.info("%s: cluster stopped", self.label)
        self._exit.set()

    # -- truncation -------------------------------------------------------------------------
    def truncate(self, tid: int) -> None:
        """`neoctl truncate`: leave RUNNING.  Recovery then waits for every
        storage of the table (or `neoctl start`) and makes each persist the
        truncation (Truncate); verification applies it (AskLastIDs)."""
        log.warning("%s: truncation after %#x requested: stopping operation", self.label, tid)
        self.truncate_tid = tid
        # only with every storage of the table, or `neoctl start` again
        self._startup_allowed_before_truncation = self.startup_allowed
        self.startup_allowed = False
        self._stop_operation.set()

    def _truncation_pending(self, pending: list[Node]) -> bool:
        """Recovery, table loaded: adopt the truncation that storages with
        readable cells report (decided by a previous master, or before we
        restarted), and make every present storage of the table persist it.
        True while some has not acknowledged it yet."""
        pt = self.pt
        if self.truncate_tid is None:
            readable = {nid for p in range(pt.num_partitions) for nid in pt.readable_nids(p)}
            reported = {u64(self.recovery[n.nid][2]) for n in pending
                        if n.nid in readable and self.recovery[n.nid][2] is not None}
            if reported:
                self.truncate_tid = min(reported)
                log.warning("%s: storages report a pending truncation after %#x", self.label,
                            self.truncate_tid)
        waiting = False
        nids = pt.nids()
        for node in pending:
            tids = [t for t in (self.truncate_tid, self.missed_truncation.get(node.nid))
                    if t is not None]
            if node.nid not in nids or not tids:
                continue
            target = min(tids)
            reported = self.recovery[node.nid][2]
            if reported is not None and u64(reported) <= target:
                # it truncates at least as much (a lower one it missed before)
                self.missed_truncation.pop(node.nid, None)
                continue
            waiting = True
            if node.nid not in self._truncating:
                self._push_truncation(node, target)
        return waiting

    def _push_truncation(self, node: Node, tid: int) -> None:
        self._truncating.add(node.nid)
        log.info("%s: telling %s to truncate after %#x", self.label, node.label, tid)

        def answered(conn, result, error):
            self._truncating.discard(node.nid)
            if error is None:
                log.info("%s: %s persisted the truncation after %#x", self.label, node.label, tid)
                if tid <= self.missed_truncation.get(node.nid, tid):
                    self.missed_truncation.pop(node.nid, None)
                report = self.recovery.get(node.nid)
                if report is not None:
                    self.recovery[node.nid] = (report[0], report[1], p64(tid))
            elif isinstance(error, RemoteError):
                conn.close("truncation refused: %s" % error)
            self.changed()
        node.conn.ask(Packets.Truncate, p64(tid), callback=answered)

    def push_missed_truncation(self, node: Node) -> None:
        """A storage that missed a truncation identifies while the cluster
        verifies or runs: it truncates before it starts operation (its
        cells are OUT_OF_DATE: replication brings what was committed since)."""
        tid = self.missed_truncation.get(node.nid)
        if tid is not None and node.nid not in self._truncating:
            self._push_truncation(node, tid)

    def _truncation_done(self, storages: list[Node]) -> None:
        """Verification asked every running storage its last ids: those
        truncated.  The others of the table will when they come back."""
        if self.truncate_tid is None:
            return
        tid, self.truncate_tid = self.truncate_tid, None
        self.startup_allowed = self.startup_allowed or self._startup_allowed_before_truncation
        self._startup_allowed_before_truncation = False
        log.warning("%s: database truncated after %#x", self.label, tid)
        done = {n.nid for n in storages}
        for nid in self.pt.nids() - done:
            self.missed_truncation[nid] = min(tid, self.missed_truncation.get(nid, tid))
            node = self.nm.get(nid)
            if node is not None and node.connected:
                # identified during verification: told before StartOperation
                self.push_missed_truncation(node)
