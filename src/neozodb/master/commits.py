"""The primary while RUNNING: two-phase commit (``finish``: the TID, the
storages' locks, the answer and invalidations), the pack orders that
commits carry, and the replication bookkeeping that commits feed
(which transactions a replicating storage waits for, when its cell may
become UP_TO_DATE).  A mixin of ``MasterApp``, run in its event loop."""
from __future__ import annotations

import asyncio
import logging
import time

from neozodb.master.pack import Order
from neozodb.master.transactions import TransactionError, Txn
from neozodb.net.connection import Connection, ConnectionClosed
from neozodb.nodes import Node
from neozodb.protocol import (
    CellStates,
    ErrorCodes,
    NodeStates,
    NodeTypes,
    Packets,
    ProtocolError,
    nid_str,
    p64,
    u64,
)

log = logging.getLogger("neozodb.master")

# seconds a transaction with an imposed TID may stay unfinished while other
# commits wait behind it (master/transactions.py IMPOSED_AHEAD for the TID)
IMPOSED_IDLE = 30.0


class Commits:
    """Commits, packs and replication bookkeeping (see the module docstring)."""

    def begin(self, conn: Connection, tid: int | None, partition: int | None = None,
              first: int | None = None, reserved: int | None = None) -> Txn:
        """A client's AskBeginTransaction (``tid``: imposed),
        AskBeginInPartition, AskBulkBegin (``first`` to ``tid``) or
        AskBeginAhead (``reserved``: the TTID)."""
        txn = self.tm.begin(conn.nid, time.time(), tid, partition, first, reserved)
        txn.ready = self.running_storage_nids()
        if txn.imposed:
            # it holds back every commit that gets a TID after it
            asyncio.get_running_loop().call_later(IMPOSED_IDLE, self._imposed_idle, txn)
        return txn

    def _imposed_idle(self, txn: Txn) -> None:
        """A transaction with an imposed TID that did not ask to finish
        within IMPOSED_IDLE seconds is aborted if commits wait behind it: a
        client must not hold the commit queue forever."""
        if self.tm.txns.get(txn.ttid) is not txn or txn.prepared:
            return
        if self.tm.prepared_count() <= 1:
            asyncio.get_running_loop().call_later(IMPOSED_IDLE, self._imposed_idle, txn)
            return
        log.warning("%s: aborting %s of %s: imposed TID idle for %g s while commits wait",
                    self.label, p64(txn.ttid).hex(), nid_str(txn.client), IMPOSED_IDLE)
        self.tm.abort(txn.ttid)
        self.abort_on_storages(txn.ttid, txn.ready)
        self.transaction_finished(txn.ttid, self.tm.last_tid)
        self.fail_later(txn)
        self.complete_commits()

    def abort_on_storages(self, ttid: int, nids) -> None:
        """Tell the connected storages among ``nids`` to drop ``ttid``."""
        for nid in nids:
            node = self.nm.get(nid)
            if node is not None and node.connected and node.type is NodeTypes.STORAGE:
                node.conn.notify(Packets.AbortTransaction, p64(ttid), [])

    def involved_cells(self, ttid: bytes, oids, deleted, checked) -> dict[int, set[int]]:
        """partition -> the storages that must lock the transaction there."""
        pt = self.pt
        np = pt.num_partitions
        from_bytes = int.from_bytes
        parts = {pt.partition(ttid)} | {from_bytes(oid, "big") % np for oid in oids}
        for offset in (*deleted, *checked):
            # from the client: an offset outside the table raised IndexError
            if not 0 <= offset < pt.num_partitions:
                raise ProtocolError("invalid partition %r" % offset)
        parts.update(deleted)
        parts.update(checked)
        ready = self.ready_storages
        running = self.running_storage_nids()
        return {p: {nid for nid in pt.writable_nids(p) if nid in running and nid in ready}
                for p in parts}

    def finish(self, conn: Connection, msg_id: int, ttid: bytes, oids, deleted, checked,
               pack=None, subs=None) -> None:
        """A client's AskFinishTransaction, or AskBulkFinish (``subs``: the
        (tid, oids) of each transaction of the batch, ``oids`` all of
        them, ``checked`` the partitions of their metadata)."""
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
        cells = self.involved_cells(ttid, oids, deleted, checked)
        involved = set().union(*cells.values())
        txn = self.tm.prepare(u64(ttid), time.time(), list(oids), involved)
        txn.cells = cells
        txn.subs = subs
        txn.finish_request = (conn, msg_id)
        if pack is not None:
            txn.pack = (pack[0], u64(pack[1]))
        if oids:
            self.tm.saw_oid(u64(max(oids)))  # 8-byte big-endian: the greatest number

        def locked(sconn, result, error):
            if error is None:
                self.tm.locked(txn.ttid, sconn.nid)
                self.complete_commits()
            elif not isinstance(error, ConnectionClosed):
                # it does not hold the transaction (aborted there): the
                # commit is complete only if other storages hold each part
                log.error("%s: %s refused to lock %s: %s", self.label, sconn.label,
                          ttid.hex(), error)
                self.tm.refused(txn.ttid, sconn.nid)
                self.complete_commits()
            # a lost storage is dealt with by node_lost: whether the commit
            # can go on without it depends on the cells left

        txn.locked_callback = locked
        if self.tm.must_defer(txn):
            txn.deferred = True
            log.debug("%s: locks of %s wait for an earlier transaction of %s", self.label,
                      ttid.hex(), nid_str(txn.client))
        else:
            self._ask_locks(txn)
        self.complete_commits()

    def _ask_locks(self, txn: Txn) -> None:
        ttid, tid = p64(txn.ttid), p64(txn.tid)
        for nid in txn.involved:
            # every pack order is approved
            self.nm.get(nid).conn.ask(Packets.AskLockInformation, ttid, tid, txn.pack is not None,
                                      callback=txn.locked_callback)

    def fail_later(self, failed: Txn) -> None:
        """An imposed transaction failed: the later ones of its client (a
        pipelined copy) are not committed either (TransactionManager.doomed)."""
        why = p64(failed.ttid).hex()
        for txn in self.tm.doomed(failed):
            ttid = p64(txn.ttid)
            log.error("%s: transaction %s of %s not committed: %s before it failed", self.label,
                      ttid.hex(), nid_str(txn.client), why)
            if txn.prepared:
                conn, msg_id = txn.finish_request
                conn.error(msg_id, ErrorCodes.INCOMPLETE_TRANSACTION,
                           "transaction %s not committed: %s before it failed" % (ttid.hex(), why))
            self.abort_on_storages(txn.ttid, txn.involved | txn.ready)
            self.transaction_finished(txn.ttid, self.tm.last_tid)

    def complete_commits(self) -> None:
        for txn in self.tm.committable():
            ttid, tid = p64(txn.ttid), p64(txn.tid)
            conn, msg_id = txn.finish_request
            if txn.lost:
                self._lost(txn)
                continue
            self._outdate_refusers(txn)
            if txn.subs is None:
                conn.answer(msg_id, Packets.AnswerTransactionFinished, ttid, tid)
                self._invalidate(conn, [(tid, txn.oids)])
            else:
                conn.answer(msg_id, Packets.AnswerBulkFinish, ttid, tid)
                self._invalidate(conn, txn.subs)
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
        for txn in self.tm.undeferred():
            self._ask_locks(txn)
        self.maybe_exit()

    def _invalidate(self, committer: Connection, commits: list) -> None:
        """Other clients invalidate what each of ``commits`` (tid, oids)
        changed, one commit at a time; secondaries mirror the last IDs.
        A client gets them with the next thing the master sends it, at most
        ``SOON`` later (``notify_soon``): each on its own would wake it, and
        a committing client reads the master's answers anyway."""
        for peer in self.nm:
            if peer.type is NodeTypes.CLIENT:
                if peer.conn is committer:
                    continue
            elif peer.type is not NodeTypes.MASTER:
                continue
            if peer.connected and self.follows_table(peer):
                conn = peer.conn
                notify = conn.notify_soon if peer.type is NodeTypes.CLIENT else conn.notify
                for tid, oids in commits:
                    if oids or peer.type is NodeTypes.MASTER:
                        notify(Packets.InvalidateObjects, tid, oids)

    def _outdate_refusers(self, txn: Txn) -> None:
        """Storages that refused to lock ``txn`` (never voted there) lack
        it: they are disconnected, so that their cells are replicated
        again when they come back.  Not one whose loss would leave a
        partition without a readable cell: a client that skips storages
        must not stop the cluster; such a copy stays as it is, and `neoctl
        check` reports the difference."""
        if not txn.refused:
            return
        gone: set[int] = set()
        running = self.running_storage_nids()
        for nid in sorted(txn.refused):
            node = self.nm.get(nid)
            if node is None or not node.connected:
                continue
            if self.pt.operational(running, exclude=gone | {nid}):
                gone.add(nid)
                node.conn.close("did not lock %s" % p64(txn.ttid).hex())
            else:
                log.error("%s: %s lacks %s (tid %s) of %s but holds the last readable copy of"
                          " a partition: kept; `neoctl check` reports the difference",
                          self.label, node.label, p64(txn.ttid).hex(), p64(txn.tid).hex(),
                          nid_str(txn.client))

    def _lost(self, txn: Txn) -> None:
        """No storage holds some part of ``txn`` any more: it is not
        reported committed, nobody is told to invalidate.  What other
        storages locked is unlocked (a lock is durable: verification would
        replay it anyway)."""
        ttid = p64(txn.ttid)
        conn, msg_id = txn.finish_request
        unlocked = sorted(p for p, nids in txn.cells.items() if not nids & txn.locked)
        log.error("%s: transaction %s of %s lost: no storage locked partition(s) %s (refused"
                  " by: %s; the others were lost first)", self.label, ttid.hex(),
                  nid_str(txn.client), " ".join(map(str, unlocked)),
                  " ".join(map(nid_str, sorted(txn.refused))) or "none")
        conn.error(msg_id, ErrorCodes.INCOMPLETE_TRANSACTION,
                   "transaction %s is not held by the storages any more" % ttid.hex())
        for nid in txn.locked:
            node = self.nm.get(nid)
            if node is not None and node.connected:
                node.conn.notify(Packets.NotifyUnlockInformation, ttid)
        # a client that lost its answer asks again: not committed
        for waiter, waiter_msg_id in self.final_tid_waiters.pop(txn.ttid, ()):
            waiter.answer(waiter_msg_id, Packets.AnswerFinalTID, None)
        self.transaction_finished(txn.ttid, self.tm.last_tid)
        self.fail_later(txn)

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
