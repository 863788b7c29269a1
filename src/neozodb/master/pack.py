"""The master's view of pack orders: a pure state machine.

A pack order is attached to a committed transaction (its TID is the
order's id).  The master approves every order (NEO's "autosign"), learns
its details from a storage holding the transaction's metadata (only they
know whether it is a GC pack: the mark is in the transaction's extension),
tells every storage (``NotifyPackSigned``), which then ask for the details
(``AskPackOrders``), pack in the background and report how far they are
(``NotifyPackCompleted``: every order up to that id is applied on all their
partitions).  ``WaitForPack`` waits until every running storage of the
partition table reports the order done.

After a restart the orders are rebuilt from the storages' pack tables
(verification) and the storages report their completion again.

On the wire (``AnswerPackOrders``, ``AddTransaction``) an order is
``(id, approved, partial, oids, pack_tid)``; a GC order is the one
combination NEO never sends: not partial, with oids (the unreachable ones).
"""
from __future__ import annotations

from dataclasses import dataclass

from neozodb.protocol import p64, u64
from neozodb.protocol.catalogue import split_oids

#: Our AnswerPackOrders stop after the order that brings their oids over
#: this (far below msgpack's 64 MiB); askers ask again from the next order
#: until an answer is empty (storages do the same, storage/pack.py).
PAGE_OIDS = 1000000


@dataclass
class Order:
    tid: int
    pack_tid: int
    approved: bool | None
    partial: bool
    oids: list[bytes] | None
    gc: bool

    def wire(self) -> tuple:
        return (p64(self.tid), self.approved, self.partial, self.oids, p64(self.pack_tid))

    @classmethod
    def from_wire(cls, entry) -> Order:
        tid, approved, partial, oids, pack_tid = entry
        return cls(u64(tid), u64(pack_tid), approved, partial,
                   None if oids is None else split_oids(oids), not partial and oids is not None)


class PackManager:
    def __init__(self) -> None:
        self.orders: dict[int, Order] = {}
        # committed, details being asked to a storage: tid -> (oids, pack_tid)
        # as the client gave them in AskFinishTransaction
        self.learning: dict[int, tuple] = {}
        self.completed: dict[int, int] = {}   # storage nid -> last completed id
        self.waiters: list[tuple[int, object]] = []  # (tid, callback)

    def reset(self) -> None:
        """A new verification: the storages tell again."""
        self.orders.clear()
        self.learning.clear()
        self.completed.clear()
        self.waiters.clear()

    # -- orders ----------------------------------------------------------------
    def committed(self, tid: int, oids, pack_tid: int) -> None:
        self.learning[tid] = (oids, pack_tid)

    def learned(self, order: Order) -> None:
        self.learning.pop(order.tid, None)
        old = self.orders.get(order.tid)
        if old is not None and old.approved and order.approved is None:
            order.approved = True
        self.orders[order.tid] = order

    def guess(self, tid: int) -> Order | None:
        """No storage could tell the details of a committed order: take the
        client's (a GC order is then taken for a partial one: nothing is
        collected, history of the listed oids is packed)."""
        info = self.learning.pop(tid, None)
        if info is None:
            return None
        oids, pack_tid = info
        order = Order(tid, pack_tid, True, oids is not None, oids, False)
        self.orders[tid] = order
        return order

    def known(self, min_tid: int = 0, max_oids: int | None = None) -> list[Order]:
        """Orders from ``min_tid``, ascending, stopping before the first one
        whose details are still being learned: a storage told about a later
        order would report an earlier one done.  With ``max_oids``, stops
        after the order that brings their oids over it (see PAGE_OIDS)."""
        limit = min(self.learning, default=None)
        orders, count = [], 0
        for t in sorted(self.orders):
            if t < min_tid:
                continue
            if limit is not None and t >= limit:
                break
            orders.append(self.orders[t])
            count += len(self.orders[t].oids or ())
            if max_oids is not None and count > max_oids:
                break
        return orders

    # -- completion ----------------------------------------------------------------
    def report(self, nid: int, tid: int) -> None:
        self.completed[nid] = tid

    def forget(self, nid: int) -> None:
        self.completed.pop(nid, None)

    def done(self, tid: int, nids) -> bool:
        """Order ``tid`` applied by every storage of ``nids``."""
        if tid not in self.orders and tid not in self.learning:
            return True  # unknown (or rejected): nothing to wait for
        return all(self.completed.get(nid, 0) >= tid for nid in nids)

    def wait(self, tid: int, callback) -> None:
        self.waiters.append((tid, callback))

    def ready_waiters(self, nids) -> list:
        """Callbacks of the waits that are over (removed)."""
        ready, waiting = [], []
        for tid, callback in self.waiters:
            (ready if self.done(tid, nids) else waiting).append((tid, callback))
        self.waiters = waiting
        return [callback for _, callback in ready]

    def status(self, label) -> dict:
        """``neoctl print pack`` (JSON-able); ``label(nid)`` names storages."""
        orders = []
        for tid in sorted(set(self.orders) | set(self.learning)):
            order = self.orders.get(tid)
            entry: dict = {"tid": tid, "known": order is not None}
            if order is not None:
                entry.update(pack_tid=order.pack_tid, approved=order.approved,
                             partial=order.partial, gc=order.gc,
                             oids=None if order.oids is None else len(order.oids))
            else:
                entry["pack_tid"] = self.learning[tid][1]
            entry["completed"] = sorted(label(n) for n, t in self.completed.items() if t >= tid)
            orders.append(entry)
        return {"orders": orders,
                "storages": {label(n): t for n, t in sorted(self.completed.items())}}
