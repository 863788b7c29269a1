"""The admin node: neoctl's endpoint.

It keeps a passive copy of the node list, partition table and cluster state
(learned from the primary master), answers neoctl's questions about them
itself, and forwards the commands that change the cluster to the master.
One asyncio loop.
"""
from __future__ import annotations

import asyncio
import logging

from neozodb.net.bootstrap import FollowsPrimary, follow_master
from neozodb.net.connection import (
    Connection,
    Handler,
    HandlerError,
    RemoteError,
)
from neozodb.net.listener import listen
from neozodb.net.tasks import watch
from neozodb.nodes import NodeManager
from neozodb.protocol import (
    CellStates,
    ClusterStates,
    ErrorCodes,
    NodeStates,
    NodeTypes,
    Packets,
    nid_str,
    u64,
)
from neozodb.protocol.features import ANNOUNCEMENT, OLDER_PT, greet
from neozodb.pt import PartitionTable
from neozodb.tid import neo_tid_time

log = logging.getLogger("neozodb.admin")

# requests neoctl sends that only the master can answer; the answers are
# passed on as they come (a neozodb master's JSON status included)
FORWARDED = ("AddPendingNodes", "SetClusterState", "AskLastIDs", "AskLastTransaction",
             "AskRecovery", "SetNodeState", "SetNumReplicas", "TweakPartitionTable",
             "CheckReplicas", "Truncate", "Repair", "AskOlderPartitionTables",
             "RecoverPartitionTable")
#: What ``print pack`` asks and only a neozodb master answers (NEO's drops
#: an admin that sends it).
STATUS_JSON = b"status-json"


class MasterHandler(FollowsPrimary, Handler):
    def __init__(self, app: AdminApp) -> None:
        self.app = app

    def NotifyNodeInformation(self, conn, msg_id, timestamp, entries):
        self.app.nm.update(entries)

    def NotifyClusterInformation(self, conn, msg_id, state):
        self.app.cluster_state = state

    def SendPartitionTable(self, conn, msg_id, ptid, replicas, rows):
        pt = PartitionTable(len(rows), replicas)
        pt.load(ptid, replicas, rows)
        self.app.pt = pt

    def NotifyPartitionChanges(self, conn, msg_id, ptid, replicas, changes):
        self.app.pt.apply_changes(ptid, replicas, changes)

    def Ping(self, conn, msg_id):
        conn.answer(msg_id, Packets.Pong)


def _forward(name: str):
    packet = getattr(Packets, name)

    def forward(self, conn, msg_id, *args):
        master = self.app.master_conn
        if master is None or master.closed:
            raise HandlerError("not connected to a primary master", ErrorCodes.NOT_READY)
        why = unforwardable(packet, master.peer_features)
        if why:
            raise HandlerError(why)

        def answered(_, result, error):
            if error is None:
                if packet.acked:
                    conn.ack(msg_id, result[0])
                else:
                    conn.answer(msg_id, packet.answer, *result)
            elif isinstance(error, RemoteError):
                conn.error(msg_id, error.code, error.message)
            else:
                conn.error(msg_id, ErrorCodes.NOT_READY, "master lost: %s" % error)

        master.ask(packet, *args, callback=answered)
    forward.__name__ = name
    return forward


class CtlHandler(Handler):
    """Requests from neoctl (after identification)."""

    def __init__(self, app: AdminApp) -> None:
        self.app = app

    for _name in (*FORWARDED, "AskPackOrders"):
        locals()[_name] = _forward(_name)
    del _name

    def FlushLog(self, conn, msg_id):
        super().FlushLog(conn, msg_id)
        master = self.app.master_conn
        if master is not None and not master.closed:
            master.notify(Packets.FlushLog)  # the master passes it on to every node

    def AskMonitorInformation(self, conn, msg_id):
        """``print summary``: NEO's health summary of the cluster (this
        admin monitors no backup cluster)."""
        app = self.app
        master = app.master_conn
        if master is None or master.closed:
            conn.answer(msg_id, Packets.AnswerMonitorInformation, [], [None], NOT_CONNECTED.encode())
            return
        if app.cluster_state is not ClusterStates.RUNNING:
            warning, problem, body = monitor_summary(app.cluster_state, app.pt, app.nm, None)
            conn.answer(msg_id, Packets.AnswerMonitorInformation, warning, problem, body)
            return

        def answered(_, result, error):
            ltid = result[0] if error is None else None
            summary = monitor_summary(app.cluster_state, app.pt, app.nm, ltid)
            if not conn.closed:
                conn.answer(msg_id, Packets.AnswerMonitorInformation, *summary)
        master.ask(Packets.AskLastTransaction, callback=answered)

    def AskClusterState(self, conn, msg_id):
        conn.answer(msg_id, Packets.AnswerClusterState, self.app.cluster_state)

    def AskPrimary(self, conn, msg_id):
        master = self.app.master_conn
        if master is None or master.closed:
            raise HandlerError("not connected to a primary master", ErrorCodes.NOT_READY)
        conn.answer(msg_id, Packets.AnswerPrimary, master.nid)

    def AskNodeList(self, conn, msg_id, node_type):
        nodes = [n.wire() for n in sorted(self.app.nm, key=lambda n: n.nid)
                 if node_type is None or n.type is node_type]
        conn.answer(msg_id, Packets.AnswerNodeList, nodes)

    def AskPartitionList(self, conn, msg_id, min_offset, max_offset, nid):
        master = self.app.master_conn
        if master is None or master.closed:
            raise HandlerError("not connected to a primary master", ErrorCodes.NOT_READY)
        pt = self.app.pt
        if pt is None:
            raise HandlerError("no partition table yet", ErrorCodes.NOT_READY)
        # min_offset included, max_offset excluded, max_offset 0 = to the end
        # (as in NEO); a range outside the table is an error, not clamped.
        end = max_offset or pt.num_partitions
        if not 0 <= min_offset < end <= pt.num_partitions:
            raise HandlerError("invalid partition range MIN=%d MAX=%d: the table has %d partitions"
                               % (min_offset, max_offset, pt.num_partitions))
        max_offset = end
        # every cell, whatever ``nid``: NEO's admin ignores it and NEO's
        # neoctl prints what it gets (ours filters by itself)
        rows = []
        for offset in range(min_offset, max_offset):
            rows.append([(n, CellStates(s)) for n, s in pt.cells(offset)])
        conn.answer(msg_id, Packets.AnswerPartitionList, pt.ptid, pt.num_replicas, rows)

    def Ping(self, conn, msg_id):
        conn.answer(msg_id, Packets.Pong)


NOT_CONNECTED = "Not connected to a primary master."


def unforwardable(packet, master_features) -> str | None:
    """Why a request from neoctl must not go to a master with these
    features (NEO's drops an admin that sends what it does not expect)."""
    if packet is Packets.AskPackOrders and STATUS_JSON not in master_features:
        return "the master does not report pack status (NEO's master)"
    if packet in (Packets.AskOlderPartitionTables, Packets.RecoverPartitionTable) \
            and OLDER_PT not in master_features:
        return "the master keeps no partition table history (NEO's master)"
    return None


def monitor_summary(state, pt, nm, ltid: bytes | None) -> tuple[list, list, bytes]:
    """NEO's ``AnswerMonitorInformation``: the clusters with a warning, with
    a problem (None: this one), and ``"RUNNING; UP_TO_DATE=24; DOWN=1;
    ltid=0123456789abcdef (2026-11-27 20:59:44.954196)"``."""
    counts: dict[int, int] = {}
    down = set()
    if pt is not None:
        for offset in range(pt.num_partitions):
            for nid, cell_state in pt.cells(offset):
                node = nm.get(nid)
                if node is None or node.state is not NodeStates.RUNNING:
                    down.add(nid)
                counts[cell_state] = counts.get(cell_state, 0) + 1
    name = state.name if state is not None else "None"
    body = "%s; %s" % (name, ", ".join("%s=%s" % (CellStates(c).name, n)
                                       for c, n in sorted(counts.items()))) if counts else name
    if down:
        body += "; DOWN=%d" % len(down)
    if state is ClusterStates.RUNNING and ltid is not None:
        body += "; ltid=%s (%s)" % (ltid.hex(), neo_tid_time(u64(ltid)))
    warning: list = []
    problem: list = []
    if down or state is not ClusterStates.RUNNING:
        problem.append(None)
    elif list(counts) != [CellStates.UP_TO_DATE.value]:
        warning.append(None)
    return warning, problem, body.encode()


class IdentificationHandler(Handler):
    """The first message of a neoctl connection: an identification with
    the cluster name, or, from NEO's neoctl which never identifies, any
    request, served over TLS (the certificate signed by the cluster's CA
    is the authentication) or if the operator allowed anonymous control
    (``--allow-anonymous-ctl``)."""

    def __init__(self, app: AdminApp) -> None:
        self.app = app

    def dispatch(self, conn, msg_id, packet, args) -> None:
        app = self.app
        anonymous_ok = app.allow_anonymous_ctl or app.tls is not None
        if packet is Packets.RequestIdentification or not anonymous_ok:
            if packet is not Packets.RequestIdentification:
                log.warning("%s: refused a request from %s that did not identify (%s);"
                            " start the admin with --allow-anonymous-ctl, or use TLS, to serve"
                            " NEO's neoctl", app.label, conn.peer, packet.name)
                raise HandlerError("identify first (RequestIdentification with the cluster"
                                   " name): this admin does not serve anonymous neoctl",
                                   ErrorCodes.PROTOCOL_ERROR)
            return super().dispatch(conn, msg_id, packet, args)
        conn.handler = CtlHandler(self.app)
        conn.handler.dispatch(conn, msg_id, packet, args)

    def RequestIdentification(self, conn, msg_id, node_type, nid, address, name, id_timestamp, extra):
        app = self.app
        if name != app.name_bytes:
            log.warning("%s: refused neoctl from %s: wrong cluster name %r",
                        app.label, conn.peer, name)
            raise HandlerError("wrong cluster name", ErrorCodes.PROTOCOL_ERROR)
        if node_type is not NodeTypes.ADMIN:
            raise HandlerError("only neoctl connects to an admin node", ErrorCodes.PROTOCOL_ERROR)
        conn.handler = CtlHandler(app)
        greet(conn, extra)
        conn.answer(msg_id, Packets.AcceptIdentification, NodeTypes.ADMIN, app.nid, None)


class AdminApp:
    tls = None  # net.tls.TLS, set by the command line before run()

    def __init__(self, name: str, masters: list[tuple[str, int]],
                 bind: tuple[str, int] = ("127.0.0.1", 9999),
                 allow_anonymous_ctl: bool = False) -> None:
        self.name = name
        self.allow_anonymous_ctl = allow_anonymous_ctl
        self.name_bytes = name.encode()
        self.masters = masters
        self.bind = bind
        self.nid: int | None = None
        self.nm = NodeManager()
        self.pt: PartitionTable | None = None
        self.cluster_state = None
        self.master_conn: Connection | None = None
        self._exit = asyncio.Event()
        self.exit_status = 0

    @property
    def label(self) -> str:
        return nid_str(self.nid) if self.nid is not None else "A?"

    async def run(self) -> int:
        self.server = await listen(
            self, self.bind, lambda: Connection(self, IdentificationHandler(self)))
        self.address = self.server.sockets[0].getsockname()[:2]
        log.info("%s: listening on %s:%s", self.label, *self.address)
        cycle = watch(self, asyncio.ensure_future(self._master_cycle()), "master cycle",
                      self._failed)
        await self._exit.wait()
        cycle.cancel()
        self.server.close()
        return self.exit_status

    def _failed(self) -> None:
        self.exit_status = 1
        self._exit.set()

    def exit(self) -> None:
        self._exit.set()

    async def _master_cycle(self) -> None:
        await follow_master(self, self.masters, lambda: MasterHandler(self),
                            self._identify, self._master_lost)

    async def _identify(self, conn) -> None:
        addr = (self.address[0].encode(), self.address[1])
        node_type, master_nid, nid = await conn.ask(
            Packets.RequestIdentification, NodeTypes.ADMIN, self.nid, addr,
            self.name_bytes, None, ANNOUNCEMENT)
        conn.nid = master_nid
        self.nid = nid
        self.master_conn = conn
        log.info("%s: connected to master %s", self.label, nid_str(master_nid))
        # NEO's master tells the cluster state only when it changes; the
        # answer comes in stream order with those notifications, so it is
        # taken in a callback, in that order.  Not after an await: the
        # coroutine resumes once the rest of the chunk was handled, and a
        # NotifyClusterInformation(RUNNING) right behind an answer of
        # VERIFYING was overwritten by it (an admin stuck at VERIFYING).
        answered = asyncio.get_running_loop().create_future()

        def state(conn, result, error) -> None:
            if error is None:
                (self.cluster_state,) = result
            if not answered.done():
                answered.set_result(error)
        conn.ask(Packets.AskClusterState, callback=state)
        error = await answered
        if error is not None:
            # the master may have sent its table meanwhile: forgotten with
            # this connection, or it would be served after it (the next
            # connection may never come)
            self._forget_master()
            raise error

    def _master_lost(self) -> None:
        log.warning("%s: lost the master", self.label)
        self._forget_master()

    def _forget_master(self) -> None:
        # Forget everything learned from it: answering from a stale copy
        # would show a cluster that may have changed meanwhile (print pt
        # then answers NOT_READY until the next master sends its table;
        # print cluster answers None).
        self.master_conn = None
        self.nm = NodeManager()
        self.pt = None
        self.cluster_state = None
