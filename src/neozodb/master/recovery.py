"""The primary's RECOVERING and VERIFYING phases: which partition table
and which storages the cluster starts from (``recover``: the table of
highest id among the storages present, or a new one, or the one a former
secondary inherited), then what was locked but not unlocked when the
previous primary stopped, the last IDs and the pack orders
(``verify``).  A mixin of ``MasterApp``, run in its event loop."""
from __future__ import annotations

import asyncio
import logging

from neozodb.master import election, majority, older_pt
from neozodb.master.pack import Order
from neozodb.net.connection import ConnectionClosed, RemoteError
from neozodb.nodes import Node
from neozodb.protocol import ZERO_TID, ClusterStates, NodeStates, NodeTypes, Packets, p64, u64
from neozodb.pt import PartitionTable

log = logging.getLogger("neozodb.master")


# A storage that does not answer AskRecovery or AskPartitionTable within
# this many seconds is disconnected: it must not hold recovery back.
RECOVERY_TIMEOUT = 10.0


class StoppedOperation(Exception):
    """The partition table is no longer operational: back to recovery."""


class Recovery:
    """Recovery and verification (see the module docstring)."""
    # (table id, storages present) while recovery waits with a table that is
    # not operational, and the timer of its log line (master/older_pt.py)
    _stuck: tuple | None = None

    async def recover(self) -> None:
        self.set_cluster_state(ClusterStates.RECOVERING)
        self.electing = True
        electing = asyncio.ensure_future(election.run(self))
        self.pt, self.inherited_pt = self.inherited_pt, None
        self._loading_pt = None  # an answer asked for by an earlier recovery is ignored
        self.recovery.clear()
        # storages whose table was refused (it does not hold them)
        self.pt_refused: set[int] = set()
        if self._stuck is not None:  # a log line of the previous recovery
            self._stuck[1].cancel()
            self._stuck = None
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
        timer = _answer_timer(self, node, Packets.AskRecovery)

        def answered(conn, result, error):
            timer.cancel()
            if error is None:
                if result[0] is not None and result[0] < 0:
                    conn.close("invalid partition table id %r" % result[0])
                    return
                self.recovery[node.nid] = result
                self.changed()
        node.conn.ask(Packets.AskRecovery, callback=answered)

    def _decides(self, nid: int) -> bool:
        """Whether a storage's table may become the cluster's: once a
        table is known, only its storages can bring a newer one; a storage
        whose table does not hold it never."""
        return nid not in self.pt_refused and (self.pt is None or nid in self.pt.nids())

    def _recovery_done(self) -> bool:
        if self.election_pending:
            return False  # another master may still claim to be primary
        if not majority.may_lead(self):
            return False  # too few masters in touch (master/majority.py)
        pending = [n for n in self.nm.storages(NodeStates.PENDING) if n.connected]
        if any(n.nid not in self.recovery and self._decides(n.nid) for n in pending):
            return False  # each is disconnected if it does not answer in time
        best = max((self.recovery[n.nid][0] for n in pending if n.nid in self.recovery
                    and self.recovery[n.nid][0] is not None and self._decides(n.nid)),
                   default=None)
        if best is not None and (self.pt is None or self.pt.ptid < best):
            source = next(n for n in pending if self._decides(n.nid)
                          and self.recovery.get(n.nid, (None,))[0] == best)
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
            older_pt.note_recovery(self, here)  # logs if it is stuck there
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
        timer = _answer_timer(self, node, Packets.AskPartitionTable)

        def answered(conn, result, error):
            timer.cancel()
            if self._loading_pt != (node.nid, ptid):
                # superseded: a storage with a newer table came meanwhile,
                # whose table is loaded (recovery may even be over).  Taken
                # late, this older one would give cells back to a storage
                # that lacks what was committed since
                log.info("%s: partition table %s of %s ignored: a newer one was asked for",
                         self.label, ptid, node.label)
                return
            self._loading_pt = None
            if error is None:
                got_ptid, replicas, rows = result
                why = _bad_table(node, ptid, got_ptid, replicas, rows)
                if why is not None:
                    log.warning("%s: partition table %s of %s refused: %s", self.label,
                                got_ptid, node.label, why)
                    self.pt_refused.add(node.nid)
                    self.changed()
                    return
                pt = PartitionTable(len(rows), replicas)
                pt.load(got_ptid, replicas, rows)
                self.pt = pt
                log.info("%s: partition table %d loaded from %s", self.label, got_ptid,
                         node.label)
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

    async def verify(self) -> None:
        self.set_cluster_state(ClusterStates.VERIFYING)
        storages = [n for n in self.nm.storages(NodeStates.RUNNING) if n.connected]
        for node in self.nm:
            if node.connected and node.type is not NodeTypes.CLIENT:
                self.send_pt(node)
        readable = {nid for p in range(self.pt.num_partitions) for nid in self.pt.readable_nids(p)}
        try:
            polled = [n for n in storages if n.nid in readable]
            answers = await asyncio.gather(*(
                n.conn.ask(Packets.AskLockedTransactions) for n in polled))
            locked: dict[bytes, bytes | None] = {}
            held: dict[bytes, set[int]] = {}  # ttid -> storages that voted or locked it
            for node, (txns,) in zip(polled, answers, strict=True):
                for ttid, tid in txns.items():
                    held.setdefault(ttid, set()).add(node.nid)
                    if tid is not None or ttid not in locked:
                        locked[ttid] = tid if tid is not None else locked.get(ttid)
            committing = []
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
                    committing.append((ttid, tid))
            # before validating: once validated, a storage that lost the
            # transaction no longer differs from one that never had it
            await self._outdate_lacking(storages, committing, held)
            for ttid, tid in committing:
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

    async def _outdate_lacking(self, storages: list[Node], committing: list[tuple[bytes, bytes]],
                               held: dict[bytes, set[int]]) -> None:
        """Storages with a readable cell where a transaction about to be
        validated keeps its metadata, and no trace of it (neither voted,
        locked nor committed), lost their vote of it: a vote not made
        durable (feature lazy-vote: the lock of another storage carries the
        transaction) and a power cut before their own lock was.  Each is
        outdated as a storage that was down when it was committed, and
        catches up by replication, except where it holds the last readable
        cell of a partition (``PartitionTable.outdate``), said in the log.
        The table change reaches every storage before the validation: a
        storage cannot make the validation durable and not the change."""
        lacking: dict[int, bytes] = {}  # nid -> a ttid it lacks
        for ttid, _ in committing:
            cells = self.pt.readable_nids(self.pt.partition(ttid))
            for node in storages:
                if node.nid not in cells or node.nid in lacking or node.nid in held.get(ttid, ()):
                    continue
                (final,) = await node.conn.ask(Packets.AskFinalTID, ttid)
                if final is None:
                    lacking[node.nid] = ttid
        for nid, ttid in sorted(lacking.items()):
            changes = self.pt.outdate(nid)
            label = self.nm.get(nid).label
            log.warning("%s: %s lacks transaction %s, locked elsewhere (it lost its vote):"
                        " its cells are outdated", self.label, label, ttid.hex())
            kept = sorted(p for p in range(self.pt.num_partitions)
                          if nid in self.pt.readable_nids(p) and all(c[0] != p for c in changes))
            if kept:
                log.error("%s: %s keeps the last readable cell of partitions %s, not outdated:"
                          " where transaction %s wrote there, that copy lacks it (neoctl check)",
                          self.label, label, " ".join(map(str, kept)), ttid.hex())
            self.apply_pt_changes(changes)

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


def _answer_timer(app, node: Node, packet) -> asyncio.TimerHandle:
    """Close ``node``'s connection unless the answer to ``packet`` comes
    within RECOVERY_TIMEOUT seconds (the callback cancels the timer)."""
    conn = node.conn

    def expired():
        log.warning("%s: no answer from %s (%s) to %s within %g s", app.label, node.label,
                    conn.peer, packet.name, RECOVERY_TIMEOUT)
        conn.close("no answer to %s within %g s" % (packet.name, RECOVERY_TIMEOUT))
    return asyncio.get_running_loop().call_later(RECOVERY_TIMEOUT, expired)


def _bad_table(node: Node, ptid: int, got_ptid: int, replicas: int, rows) -> str | None:
    """Why the table a storage answered cannot be the cluster's, if so."""
    if got_ptid != ptid:
        return "it announced table %s" % ptid
    if not rows or not 0 <= replicas < 256:
        return "empty table or invalid number of replicas"
    nids = set()
    for row in rows:
        for nid, _ in row:
            if not 0 < nid <= 0xFFFFFF:  # storage ids only
                return "invalid storage id %r" % nid
            nids.add(nid)
    if node.nid not in nids:
        return "it is not in that table"
    return None
