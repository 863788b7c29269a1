"""A master: as primary, cluster state, node registry, partition table,
OID/TID allocation and two-phase commit coordination; as secondary, a
mirror of the primary's state (``master/secondary.py``).  The phases and
commits live in the mixins of ``MasterApp``: ``recovery.py``,
``truncation.py``, ``commits.py``.

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

from neozodb.master import checks, majority, secondary
from neozodb.master.commits import Commits
from neozodb.master.identification import IdentificationHandler, resolve_masters
from neozodb.master.pack import PackManager
from neozodb.master.recovery import Recovery, StoppedOperation
from neozodb.master.transactions import TransactionManager
from neozodb.master.truncation import Truncation
from neozodb.master.tweak import drop_changes
from neozodb.net.connection import Connection, HandlerError
from neozodb.net.listener import listen
from neozodb.nodes import Node, NodeManager
from neozodb.protocol import (
    CellStates,
    ClusterStates,
    NodeStates,
    NodeTypes,
    Packets,
    make_nid,
    nid_str,
    p64,
)
from neozodb.protocol.features import FEATURES
from neozodb.pt import PartitionTable

log = logging.getLogger("neozodb.master")


class MasterApp(Recovery, Truncation, Commits):
    """Recovery and verification (master/recovery.py), truncation
    (master/truncation.py) and commits (master/commits.py) are mixins."""
    tls = None  # net.tls.TLS, set by the command line before run()

    def __init__(self, name: str, bind: tuple[str, int], partitions: int = 100,
                 replicas: int = 0, autostart: int = 0, masters: list | None = None,
                 hold_timeout: float = 30.0, nid: int | None = None,
                 read_only: bool = False) -> None:
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
        # who may identify as a master (master/identification.py)
        self.allowed_masters: set[tuple[str, int]] = set(self.masters)
        # --read-only: every client's write is refused
        self.read_only = read_only
        index = self.masters.index(bind) + 1 if bind in self.masters else 1
        self.nid = nid if nid is not None else make_nid(NodeTypes.MASTER, index)
        # election (master/election.py): when this master started playing
        # primary, masters not heard from yet, whether it may still yield
        self.election_time = 0.0
        self.election_pending: set[tuple[str, int]] = set()
        self.electing = False
        self._yielded: asyncio.Future | None = None
        # monotonic time until which it neither leads nor follows (majority.py)
        self.quiet_until = 0.0
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
        self._stop_reason = ""
        self._exit = asyncio.Event()
        self.exit_status = 0
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
        node.notify_topology(Packets.NotifyNodeInformation, time.time(), entries)

    def broadcast_nodes(self, changed: list[Node], exclude: Node | None = None) -> None:
        now = time.time()
        for peer in self.nm:
            if not peer.connected or peer is exclude:
                continue
            entries = [n.wire() for n in changed if self.visible_to(peer, n)]
            if entries:
                peer.notify_topology(Packets.NotifyNodeInformation, now, entries)

    def send_pt(self, node: Node) -> None:
        if self.pt is not None and self.pt.ptid is not None and self.follows_table(node):
            node.notify_topology(Packets.SendPartitionTable, self.pt.ptid,
                                 self.pt.num_replicas, self._wire_rows())

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
                peer.notify_topology(Packets.NotifyPartitionChanges, ptid, replicas, wire)

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
        def gone(_):
            # a client that went away while held is forgotten at once: a
            # reconnecting client must not fill the list until the timeouts
            if entry in self.held_clients:
                self.held_clients.remove(entry)
                if entry[3] is not None:
                    entry[3].cancel()
        timer = asyncio.get_running_loop().call_later(self.hold_timeout, expire)
        entry = [conn, accept, refuse, timer]
        self.held_clients.append(entry)
        # hold_timeout replaces the connection's identification deadline
        conn.cancel_identify_deadline()
        conn.closed_future.add_done_callback(gone)
        log.info("%s: client at %s waits for the cluster to run", self.label, conn.peer)

    def drop_held_clients(self, reason: str) -> None:
        held, self.held_clients = self.held_clients, []
        for conn, _, _, timer in held:
            if timer is not None:
                timer.cancel()
            conn.close(reason, flush=True)

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
        # on every begin and finish: no sorted list of every node
        storage, running = NodeTypes.STORAGE, NodeStates.RUNNING
        return {n.nid for n in self.nm.by_nid.values()
                if n.type is storage and n.state is running and n.connected}

    # -- lifecycle --------------------------------------------------------------
    async def start(self) -> None:
        self.server = await listen(
            self, self.bind, lambda: Connection(self, IdentificationHandler(self)))
        sock = self.server.sockets[0]
        self.address = sock.getsockname()[:2]
        self.allowed_masters = await resolve_masters(self.masters)
        log.info("%s: listening on %s:%s, cluster %r", self.label, *self.address, self.name)

    async def run(self) -> int:
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
        return self.exit_status

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
            self.exit_status = 1
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
        if phases.done() and not phases.cancelled() and phases.exception() is not None:
            raise phases.exception()  # _roles stops the node, not a zombie
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
        self.drop_held_clients("yielding to the primary")
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
            self.exit_status = 1
            self._exit.set()

    async def _wait(self, condition) -> None:
        while not condition():
            self._changed.clear()
            await self._changed.wait()

    # -- service ------------------------------------------------------------------
    async def serve(self) -> None:
        if not majority.may_lead(self):  # stepped down during verification
            raise StoppedOperation("not in touch with a majority of the masters")
        self._stop_operation.clear()
        self.set_cluster_state(ClusterStates.RUNNING)
        for node in self.nm.storages(NodeStates.RUNNING):
            if node.connected:
                self.start_storage(node)
        await self._stop_operation.wait()
        if not self.stopping:
            raise StoppedOperation(self._stop_reason)

    def stop_serving(self, reason: str) -> None:
        self._stop_reason = reason
        self._stop_operation.set()

    def start_storage(self, node: Node) -> None:
        self.ready_storages.discard(node.nid)
        node.conn.notify(Packets.StartOperation, False)

    def storage_ready(self, node: Node) -> None:
        self.ready_storages.add(node.nid)
        self.replay_begins()

    def storages_starting(self) -> bool:
        return not self.ready_storages.issuperset(self.running_storage_nids())

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
            self.stop_serving("partition table not operational")

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
            self._forget_waiter(node.conn)
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
                if self.primary_address is None and not majority.has_majority(self):
                    majority.step_down(self)
        self.changed()

    def _forget_waiter(self, conn: Connection | None) -> None:
        """A client gone: its AskFinalTID waits go (they would keep its
        connection until the transaction ends; a client asking again and
        again would grow the lists)."""
        for ttid, waiters in list(self.final_tid_waiters.items()):
            kept = [w for w in waiters if w[0] is not conn and not w[0].closed]
            if len(kept) != len(waiters):
                if kept:
                    self.final_tid_waiters[ttid] = kept
                else:
                    del self.final_tid_waiters[ttid]

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
