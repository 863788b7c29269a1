"""Packet handlers of the primary master, one class per kind of peer."""
from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

from neozodb.master import administration, checks, majority, older_pt
from neozodb.master.base import BaseHandler
from neozodb.master.pack import PAGE_OIDS
from neozodb.master.transactions import Reservations, TransactionError, Txn
from neozodb.master.tweak import drop_check
from neozodb.net.connection import Denied, HandlerError
from neozodb.protocol import (
    MAX_TID,
    ZERO_TID,
    ClusterStates,
    ErrorCodes,
    NodeStates,
    NodeTypes,
    Packets,
    ProtocolError,
    nid_str,
    p64,
    u64,
)
from neozodb.protocol.features import BEGIN_AHEAD, BEGIN_PARTITION, BULK_COPY
from neozodb.protocol.values import check_id, check_ids

if TYPE_CHECKING:
    from neozodb.master.app import MasterApp

log = logging.getLogger("neozodb.master")


class SecondaryHandler(BaseHandler):
    def AskLastIDs(self, conn, msg_id):
        last_ids(self.app, conn, msg_id)


def last_ids(app: MasterApp, conn, msg_id) -> None:
    tm = app.tm
    # ZERO_TID before the first commit, as NEO's master (NEO's neoctl
    # cannot print None)
    conn.answer(msg_id, Packets.AnswerLastIDs, p64(tm.last_tid), p64(tm.last_oid), ZERO_TID)


class StorageHandler(BaseHandler):
    def NotifyReady(self, conn, msg_id):
        log.info("%s: %s ready", self.app.label, conn.label)
        self.app.storage_ready(conn.node)

    def AskFinalTID(self, conn, msg_id, ttid):
        conn.answer(msg_id, Packets.AnswerFinalTID, None)

    def AskLastTransaction(self, conn, msg_id):
        conn.answer(msg_id, Packets.AnswerLastTransaction, p64(self.app.tm.last_tid))

    def AskUnfinishedTransactions(self, conn, msg_id, offsets):
        app = self.app
        for offset in offsets:
            if not 0 <= offset < app.pt.num_partitions:
                raise ProtocolError("invalid partition %r" % offset)
        last_tid, ttids = app.unfinished_transactions(conn.node, offsets)
        conn.answer(msg_id, Packets.AnswerUnfinishedTransactions, p64(last_tid),
                    [p64(t) for t in ttids])

    def NotifyReplicationDone(self, conn, msg_id, offset, tid):
        if not 0 <= offset < self.app.pt.num_partitions:
            raise ProtocolError("invalid partition %r" % offset)
        self.app.replication_done(conn.node, offset, tid)

    def NotifyMonitorInformation(self, conn, msg_id, info):
        """A storage importing a ZODB reports its progress (JSON), kept for
        ``neoctl print import`` (the status of ``CheckReplicas``); a
        checking storage what it could not compare (master/checks.py)."""
        text = info.get(b"import")
        if isinstance(text, bytes):
            try:
                self.app.import_status[conn.node.label] = json.loads(text)
            except ValueError:
                raise ProtocolError("invalid import status") from None
        text = info.get(b"check")
        if isinstance(text, bytes):
            try:
                checks.check_note(self.app, conn.node, json.loads(text))
            except (ValueError, TypeError, KeyError):
                raise ProtocolError("invalid check note") from None

    def NotifyPartitionCorrupted(self, conn, msg_id, partition, nids):
        if not 0 <= partition < self.app.pt.num_partitions:
            raise ProtocolError("invalid partition %r" % partition)
        checks.partition_checked(self.app, conn.node, partition, nids)

    def AskPackOrders(self, conn, msg_id, min_tid):
        answer_pack_orders(self.app, conn, msg_id, min_tid)

    def NotifyPackCompleted(self, conn, msg_id, tid):
        app = self.app
        app.pm.report(conn.nid, u64(tid))
        app.check_pack_waiters()


#: Acknowledgements in NEO's words: NEO's neoctl prints them.
CLUSTER_STATE_CHANGED = "Cluster state changed"


def answer_pack_orders(app: MasterApp, conn, msg_id, min_tid) -> None:
    orders = app.pm.known(u64(min_tid), max_oids=PAGE_OIDS)
    conn.answer(msg_id, Packets.AnswerPackOrders, [o.wire() for o in orders])


class ClientHandler(BaseHandler):
    def __init__(self, app: MasterApp, read_only: bool = False) -> None:
        super().__init__(app)
        # identified with extra {b"read_only": True}: no writes (the
        # connection stays open for reads and invalidations)
        self.read_only = read_only
        self.reserved = Reservations()  # TTID blocks (feature begin-ahead)

    def _check_writable(self, packet) -> None:
        if self.read_only or self.app.read_only:
            raise HandlerError("%s refused: read-only %s" % (
                packet.name, "client" if self.read_only else "cluster"),
                ErrorCodes.READ_ONLY_ACCESS)

    def _own(self, conn, ttid: bytes, packet) -> Txn | None:
        """The transaction ``ttid`` if this client began it; None if it is
        unknown.  Another client's transaction is not its business: refused
        with a logged reason."""
        app = self.app
        txn = app.tm.txns.get(u64(ttid))
        if txn is not None and txn.client != conn.nid:
            log.warning("%s: %s from %s refused: transaction %s belongs to %s", app.label,
                        packet.name, conn.label, ttid.hex(), nid_str(txn.client))
            raise Denied("transaction %s is not yours" % ttid.hex())
        return txn

    def AskBeginTransaction(self, conn, msg_id, tid):
        self._check_writable(Packets.AskBeginTransaction)
        imposed = None if tid is None else check_id(tid, "imposed TID")
        self._begin(conn, msg_id, Packets.AnswerBeginTransaction, imposed, None)

    def AskBeginInPartition(self, conn, msg_id, partition):
        if BEGIN_PARTITION not in conn.peer_features:
            raise ProtocolError("unexpected AskBeginInPartition")
        self._check_writable(Packets.AskBeginInPartition)
        if not 0 <= partition < self.app.tm.num_partitions:
            raise ProtocolError("invalid partition %r" % partition)
        self._begin(conn, msg_id, Packets.AnswerBeginInPartition, None, partition)

    def AskBeginAhead(self, conn, msg_id, partition, ttid):
        """A begin (feature begin-ahead): with a TTID of a block reserved
        for this connection, which the client already stores with; or
        without (``ttid`` None), for a new TTID in ``partition`` if given.
        Either way the answer reserves the next block."""
        if BEGIN_AHEAD not in conn.peer_features:
            raise ProtocolError("unexpected AskBeginAhead")
        self._check_writable(Packets.AskBeginAhead)
        app = self.app
        if partition is not None and not 0 <= partition < app.tm.num_partitions:
            raise ProtocolError("invalid partition %r" % partition)
        if ttid is None:
            self._begin(conn, msg_id, Packets.AnswerBeginAhead, None, partition)
            return
        ttid = check_id(ttid, "TTID")
        node = app.nm.get(conn.nid)
        topology = None if node is None else node.topology
        # Its stores went where the client's tables said when it sent
        # them.  The master must see the same tables now: nothing about
        # nodes or partitions sent to this client since the block was
        # reserved, no storage starting.  Else the client starts again.
        why = None
        if not self.reserved.take(ttid, app.tm.num_partitions, topology):
            why = "the cluster changed since the TTID was reserved"
        elif app.storages_starting() or app.stopping:
            why = "storages starting or the cluster stopping"
        else:
            try:
                txn = app.begin(conn, None, reserved=ttid)
            except TransactionError as e:
                why = str(e)
        if why is not None:
            log.info("%s: begin of %s refused to %s: %s", app.label, p64(ttid).hex(),
                     conn.label, why)
            conn.error(msg_id, ErrorCodes.NOT_READY, why)
            return
        self._answer_begin(conn, msg_id, Packets.AnswerBeginAhead, txn)

    def _answer_begin(self, conn, msg_id, answer, txn: Txn) -> None:
        if answer is Packets.AnswerBeginAhead:
            app = self.app
            base = app.tm.reserve(time.time())
            node = app.nm.get(conn.nid)
            if node is not None:
                self.reserved.add(base, node.topology)
            conn.answer(msg_id, answer, p64(txn.ttid), p64(base))
        else:
            conn.answer(msg_id, answer, p64(txn.ttid))

    def AskBulkBegin(self, conn, msg_id, first, last):
        """The begin of a bulk copy of the transactions from ``first`` to
        ``last`` (feature bulk-copy): its TTID is ``last``."""
        if BULK_COPY not in conn.peer_features:
            raise ProtocolError("unexpected AskBulkBegin")
        self._check_writable(Packets.AskBulkBegin)
        self._begin(conn, msg_id, Packets.AnswerBulkBegin, check_id(last, "last TID"), None,
                    check_id(first, "first TID"))

    def _begin(self, conn, msg_id, answer, imposed: int | None, partition: int | None,
               first: int | None = None) -> None:
        app = self.app

        def begin():
            if conn.closed:
                return
            try:
                txn = app.begin(conn, imposed, partition, first)
            except TransactionError as e:
                log.warning("%s: begin refused to %s: %s", app.label, conn.label, e)
                conn.error(msg_id, ErrorCodes.DENIED, str(e))
                return
            self._answer_begin(conn, msg_id, answer, txn)

        if app.storages_starting() or app.stopping:
            app.delayed_begins.append(begin)
        else:
            begin()

    def AskNewOIDs(self, conn, msg_id, count):
        self._check_writable(Packets.AskNewOIDs)
        if not 0 < count <= 10000:
            raise ProtocolError("bad OID count %d" % count)
        conn.answer(msg_id, Packets.AnswerNewOIDs, [p64(o) for o in self.app.tm.new_oids(count)])

    def AskFinishTransaction(self, conn, msg_id, ttid, oids, deleted, checked, pack):
        self._check_writable(Packets.AskFinishTransaction)
        check_ids(oids, "oid")
        num_partitions = self.app.pt.num_partitions
        for partition in (*deleted, *checked):
            if not 0 <= partition < num_partitions:
                raise ProtocolError("invalid partition %r" % partition)
        if pack is not None:
            check_ids(pack[0] or (), "oid")
            check_id(pack[1], "pack TID")
        self._own(conn, ttid, Packets.AskFinishTransaction)
        try:
            self.app.finish(conn, msg_id, ttid, oids, deleted, checked, pack)
        except TransactionError as e:
            raise Denied(str(e)) from None

    def AskBulkFinish(self, conn, msg_id, ttid, subs):
        """The finish of a bulk copy: ``subs`` are the (tid, oids) of each
        of its transactions, from its first TID to its last (the TTID)."""
        if BULK_COPY not in conn.peer_features:
            raise ProtocolError("unexpected AskBulkFinish")
        self._check_writable(Packets.AskBulkFinish)
        txn = self._own(conn, ttid, Packets.AskBulkFinish)
        if txn is None or txn.first is None:
            raise Denied("no bulk copy %s" % ttid.hex())
        tids = [check_id(tid, "TID") for tid, _ in subs]
        if not tids or tids[0] != txn.first or tids[-1] != txn.ttid or any(
                a >= b for a, b in zip(tids, tids[1:], strict=False)):
            raise ProtocolError("bulk copy %s: its transactions are not those begun" % ttid.hex())
        oids: dict[bytes, None] = {}
        for _, sub_oids in subs:
            check_ids(sub_oids, "oid")
            oids.update(dict.fromkeys(sub_oids))
        pt = self.app.pt
        partitions = sorted({pt.partition(tid) for tid, _ in subs})
        try:
            self.app.finish(conn, msg_id, ttid, list(oids), [], partitions, None,
                            [(tid, list(sub_oids)) for tid, sub_oids in subs])
        except TransactionError as e:
            raise Denied(str(e)) from None

    def AskPackOrders(self, conn, msg_id, min_tid):
        answer_pack_orders(self.app, conn, msg_id, min_tid)

    def WaitForPack(self, conn, msg_id, tid):
        """Answered once every running storage of the table applied the
        pack order ``tid`` (at once if there is no such order)."""
        app = self.app

        def done():
            conn.answer(msg_id, Packets.WaitedForPack)
        tid = u64(tid)
        if app.pm.done(tid, app.pack_nids()):
            done()
        else:
            app.pm.wait(tid, done)

    def AbortTransaction(self, conn, msg_id, ttid, nids):
        app = self.app
        try:
            self._own(conn, ttid, Packets.AbortTransaction)
        except Denied:
            return  # a notification: nothing to answer, the owner's commit goes on
        try:
            txn = app.tm.abort(u64(ttid))
        except TransactionError as e:
            # finish already requested: the commit goes on, the abort is moot
            log.warning("%s: abort from %s ignored: %s", app.label, conn.label, e)
            return
        if txn is not None:
            app.transaction_finished(txn.ttid, app.tm.last_tid)
            app.abort_on_storages(txn.ttid, set(nids) & txn.ready)  # it could write to those
            if txn.imposed:
                app.fail_later(txn)
                app.complete_commits()  # commits queued behind it may go on

    def FailedVote(self, conn, msg_id, ttid, nids):
        self._check_writable(Packets.FailedVote)  # it would drop storages
        app = self.app
        txn = self._own(conn, ttid, Packets.FailedVote)
        if txn is None or txn.prepared:
            raise Denied("no transaction %s to vote for" % ttid.hex())
        failed = set(nids) & txn.ready
        strangers = set(nids) - failed
        if strangers:
            # not ready when the transaction began (one that came back
            # since, in the client's table before its stores): not ours to
            # drop.  If it is ready at the finish, it refuses to lock what
            # it never got, and Commits._outdate_refusers deals with it.
            log.info("%s: FailedVote from %s for %s: %s ignored (not ready at its begin)",
                     app.label, conn.label, ttid.hex(), " ".join(map(nid_str, sorted(strangers))))
        if app.pt.operational(app.running_storage_nids(), exclude=failed):
            for nid in sorted(failed):
                node = app.nm.get(nid)
                if node is not None and node.connected:
                    node.conn.close("failed vote of %s" % ttid.hex())
            conn.ack(msg_id)
        else:
            conn.error(msg_id, ErrorCodes.INCOMPLETE_TRANSACTION,
                       "cluster would not be operational without the failed storages")

    def AskLastTransaction(self, conn, msg_id):
        conn.answer(msg_id, Packets.AnswerLastTransaction, p64(self.app.tm.last_tid))

    def AskFinalTID(self, conn, msg_id, ttid):
        """A client lost its answer to AskFinishTransaction: None if the
        transaction is not committed, its TID once it is, MAX_TID if we do
        not know it (finished earlier, or before we started): the storages
        know."""
        app = self.app
        txn = app.tm.txns.get(u64(ttid))
        if txn is None:
            conn.answer(msg_id, Packets.AnswerFinalTID, MAX_TID)
        elif not txn.prepared:
            conn.answer(msg_id, Packets.AnswerFinalTID, None)
        else:
            app.final_tid_waiters.setdefault(txn.ttid, []).append((conn, msg_id))


class AdminHandler(BaseHandler):
    def AskPackOrders(self, conn, msg_id, min_tid):
        """`neoctl print pack`: the pack orders and which storages applied
        them, which NEO's answer cannot tell: acknowledged with the status
        as JSON (as `print check` does) for an admin that expects it."""
        app = self.app
        if checks.STATUS_JSON not in conn.peer_features:
            answer_pack_orders(app, conn, msg_id, min_tid)
            return
        status = app.pm.status(lambda nid: app.nm.get(nid).label if app.nm.get(nid) else str(nid))
        status["orders"] = [o for o in status["orders"] if o["tid"] >= u64(min_tid)]
        status["waited_for"] = sorted(n.label for n in map(app.nm.get, app.pack_nids()) if n)
        conn.ack(msg_id, json.dumps(status))

    def AskClusterState(self, conn, msg_id):
        conn.answer(msg_id, Packets.AnswerClusterState, self.app.cluster_state)

    def AskLastIDs(self, conn, msg_id):
        last_ids(self.app, conn, msg_id)

    def AskLastTransaction(self, conn, msg_id):
        conn.answer(msg_id, Packets.AnswerLastTransaction, p64(self.app.tm.last_tid))

    def AskRecovery(self, conn, msg_id):
        app = self.app
        pt = app.pt
        truncate_tid = None if app.truncate_tid is None else p64(app.truncate_tid)
        conn.answer(msg_id, Packets.AnswerRecovery, pt.ptid if pt is not None else None, None,
                    truncate_tid)

    def Truncate(self, conn, msg_id, tid):
        """`neoctl truncate TID`: acknowledged, then the cluster stops
        operation and goes through recovery and verification again, where
        every storage deletes what was committed after ``tid``."""
        app = self.app
        if app.cluster_state is not ClusterStates.RUNNING or app.stopping:
            raise Denied("cluster is %s, not RUNNING" % app.cluster_state.name)
        tid = u64(tid)
        if not tid:
            raise Denied("cannot truncate at tid 0x0: that would delete every transaction")
        if tid >= app.tm.last_tid:
            raise Denied("truncating after the last transaction does nothing")
        conn.ack(msg_id)
        app.truncate(tid)

    def SetClusterState(self, conn, msg_id, state):
        app = self.app
        if state is ClusterStates.STOPPING:
            conn.ack(msg_id, CLUSTER_STATE_CHANGED)
            app.request_stop()
        elif state is ClusterStates.VERIFYING:
            if app.cluster_state is not ClusterStates.RECOVERING:
                raise Denied("cluster is %s, not RECOVERING" % app.cluster_state.name)
            app.startup_allowed = True
            conn.ack(msg_id, CLUSTER_STATE_CHANGED)
            app.changed()
        else:
            raise Denied("cannot set cluster state to %s from %s" % (
                state.name, app.cluster_state.name))

    def AddPendingNodes(self, conn, msg_id, nids):
        app = self.app
        if app.cluster_state is not ClusterStates.RUNNING:
            raise Denied("cluster is %s, not RUNNING" % app.cluster_state.name)
        pending = [n for n in app.nm.storages(NodeStates.PENDING) if n.connected]
        if nids:
            by_nid = {n.nid: n for n in pending}
            for nid in nids:
                node = app.nm.get(nid)
                if node is None:
                    raise Denied("unknown node")
                if nid not in by_nid and len(nids) == 1:
                    raise Denied("%s is not pending" % node.label)
            # NEO's `neoctl add all` lists every storage: the others are left
            pending = [by_nid[nid] for nid in nids if nid in by_nid]
        for node in pending:
            app.set_node_state(node, NodeStates.RUNNING)
            app.send_pt(node)
            app.start_storage(node)
        # NEO's words, which NEO's neoctl prints as they are
        conn.ack(msg_id, "Nodes added: %s" % ", ".join(n.label for n in pending) if pending
                 else "No node added")

    def SetNodeState(self, conn, msg_id, nid, state):
        """`neoctl kill` (DOWN) of a storage or secondary master, and
        `neoctl drop` (UNKNOWN) of a storage."""
        app = self.app
        node = app.nm.get(nid)
        if nid == app.nid:
            raise Denied("%s is the primary master: stop the cluster with"
                         " `set cluster STOPPING`" % app.label)
        if node is None:
            raise Denied("unknown node")
        if node.type is NodeTypes.MASTER and state is NodeStates.DOWN and node.connected:
            needed = majority.majority(len(app.masters))
            if majority.in_touch(app) - 1 < needed:
                raise Denied("the primary would be left with fewer than %d of the %d masters"
                             " (a majority): it would stop serving" % (needed, len(app.masters)))
            conn.ack(msg_id, "state changed")
            app.set_node_state(node, NodeStates.DOWN)  # told DOWN, a secondary exits
            return
        if node.type is not NodeTypes.STORAGE:
            raise Denied("only storage nodes and secondary masters can be killed,"
                         " only storage nodes dropped")
        if app.cluster_state is not ClusterStates.RUNNING:
            raise Denied("cluster is %s, not RUNNING" % app.cluster_state.name)
        running = app.running_storage_nids()
        if state is NodeStates.DOWN:
            if nid not in running:
                raise Denied("%s is not running" % node.label)
            if nid in app.pt.nids() and not app.pt.operational(running - {nid}):
                raise Denied("%s holds the only readable copy of some partitions" % node.label)
            conn.ack(msg_id, "state changed")
            # told DOWN, it exits; its cells are outdated when it is gone
            app.set_node_state(node, NodeStates.DOWN)
        elif state is NodeStates.UNKNOWN:
            why = drop_check(app.pt, nid, running)
            if why is not None:
                raise Denied(why.replace("storage %d" % nid, node.label))
            conn.ack(msg_id, "node permanently removed")
            app.drop_storage(node)
        else:
            raise Denied("cannot set a node %s" % state.name)

    def TweakPartitionTable(self, conn, msg_id, dry_run, nids):
        """`neoctl tweak [-n] [NID...]`: answers the resulting table."""
        changed, rows = administration.tweak_partition_table(self.app, dry_run, nids)
        conn.answer(msg_id, Packets.AnswerTweakPartitionTable, changed, rows)

    def SetNumReplicas(self, conn, msg_id, num_replicas):
        """`neoctl set replicas N` (cells move at the next tweak)."""
        administration.set_num_replicas(self.app, num_replicas)
        conn.ack(msg_id)

    def FlushLog(self, conn, msg_id):
        super().FlushLog(conn, msg_id)
        for node in self.app.nm:  # as NEO's master: every node but the asker
            if node.conn is not None and node.conn is not conn and not node.conn.closed:
                node.conn.notify(Packets.FlushLog)

    def Repair(self, conn, msg_id, nids, dry_run):
        """`neoctl prune_orphan`: the storages delete data no revision uses."""
        app = self.app
        nodes = []
        for nid in nids:
            node = app.nm.get(nid)
            if node is None or node.type is not NodeTypes.STORAGE or not node.connected:
                raise Denied("invalid storage node %s" % nid_str(nid))
            nodes.append(node)
        for node in nodes:
            node.conn.notify(Packets.NotifyRepair, dry_run)
        conn.ack(msg_id)

    def AskOlderPartitionTables(self, conn, msg_id):
        """`neoctl print pt_history` (master/older_pt.py)."""
        older_pt.ask_older_tables(self.app, conn, msg_id)

    def RecoverPartitionTable(self, conn, msg_id, ptid):
        """`neoctl recover_pt PTID` (master/older_pt.py)."""
        older_pt.recover_pt(self.app, conn, msg_id, ptid)

    def CheckReplicas(self, conn, msg_id, partitions, min_tid, max_tid):
        """`neoctl check`: starts a check (acknowledged at once); with no
        partition, only the status of the last one (master/checks.py)."""
        checks.check_replicas(self.app, conn, msg_id, partitions, min_tid, max_tid)
