"""``neoctl truncate``: the primary leaves RUNNING; recovery waits for
every storage of the table (or ``neoctl start``) and makes each persist
the truncation (``Truncate``); verification applies it (``AskLastIDs``);
storages that were absent are told when they come back.  A mixin of
``MasterApp``, run in its event loop."""
from __future__ import annotations

import logging

from neozodb.net.connection import RemoteError
from neozodb.nodes import Node
from neozodb.protocol import Packets, p64, u64

log = logging.getLogger("neozodb.master")


class Truncation:
    """Truncation (see the module docstring)."""

    def truncate(self, tid: int) -> None:
        """`neoctl truncate`: leave RUNNING.  Recovery then waits for every
        storage of the table (or `neoctl start`) and makes each persist the
        truncation (Truncate); verification applies it (AskLastIDs)."""
        log.warning("%s: truncation after %#x requested: stopping operation", self.label, tid)
        self.truncate_tid = tid
        # only with every storage of the table, or `neoctl start` again
        self._startup_allowed_before_truncation = self.startup_allowed
        self.startup_allowed = False
        self.stop_serving("truncation requested")

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
