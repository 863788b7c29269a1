"""Packing in the background: applying the approved pack orders to our cells.

The master tells us about orders (``NotifyPackSigned``) and gives their
details (``AskPackOrders``).  Each of our readable partitions applies every
order after the last one it applied (``done`` in its pack progress): all
pending orders in one pass over the partition's objects, in chunks of
about ``CHUNK_TIME`` seconds.  Each chunk deletes what the orders doom and records
where the pass is in the same database transaction, so a restart resumes
there.  Between chunks the event loop serves everything else (client
requests first: they are already queued when a chunk ends); while clients
or the master send requests, the packer also rests three times as long as
each chunk took, leaving them most of the CPU and the disk.
``--pack-rate`` caps how many objects per second are visited.

An OUT_OF_DATE cell is packed only once replication caught up (it would
otherwise bring back rows the source still has), and before it is reported
replicated: a cell becomes readable with the pending orders applied.  Our
completion (the last order applied on all our readable partitions) is
reported to the master (``NotifyPackCompleted``), which answers
``WaitForPack`` with it.
"""
from __future__ import annotations

import asyncio
import logging
import pickle
import time
from io import BytesIO
from typing import TYPE_CHECKING

from neozodb.net.connection import ConnectionClosed
from neozodb.protocol import CellStates, Packets, p64, u64
from neozodb.protocol.catalogue import split_oids
from neozodb.storage.background import run_steps

if TYPE_CHECKING:
    from neozodb.storage.app import StorageApp

log = logging.getLogger("neozodb.storage")

#: Object revisions visited per chunk (one database transaction): adapted
#: so that a chunk keeps the event loop about CHUNK_TIME seconds.
CHUNK = 200
CHUNK_MIN, CHUNK_MAX = 20, 10000
CHUNK_TIME = 0.003
#: While clients or the master send requests (and BUSY_TIME seconds after),
#: each chunk is followed by a rest of BUSY_REST times its duration.
BUSY_REST = 3
BUSY_TIME = 0.1
#: The extension key of a GC pack transaction (``neozodb.client``).
GC_MARK = "neozodb_gc"
#: AnswerPackOrders stops after the order that brings its oids over this
#: (messages stay far below msgpack's 64 MiB): askers ask again from the
#: order after the last one until an answer is empty.
PAGE_OIDS = 1000000


class _NoClasses(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError("not a plain extension")


def is_gc_extension(ext: bytes) -> bool:
    """Whether a transaction extension (ZODB's pickled dict) carries the GC
    mark.  Clients' pickles are not trusted: nothing but plain data is
    unpickled."""
    if not ext:
        return False
    try:
        value = _NoClasses(BytesIO(ext)).load()
    except Exception:
        return False
    return isinstance(value, dict) and value.get(GC_MARK) is True


class Order:
    __slots__ = ("tid", "approved", "partial", "oids", "pack_tid", "gc")

    def __init__(self, tid: int, approved, partial: bool, oids, pack_tid: int, gc: bool) -> None:
        self.tid, self.approved, self.partial = tid, approved, partial
        self.oids = None if oids is None else frozenset(oids)
        self.pack_tid, self.gc = pack_tid, gc

    @property
    def step(self) -> tuple:
        return (self.pack_tid, self.partial, self.oids, self.gc)


def wire_order(order) -> tuple:
    """A backend PackOrderRecord as in AnswerPackOrders / AddTransaction:
    a GC order is sent as not partial, with oids."""
    tid, approved, partial, oids, pack_tid, _ = order
    return (p64(tid), approved, partial, None if oids is None else [p64(o) for o in oids],
            p64(pack_tid))


def order_from_wire(tid: bytes, approved, partial: bool, oids, pack_tid: bytes) -> tuple:
    """The inverse of ``wire_order``: a PackOrderRecord."""
    return (u64(tid), approved, partial,
            None if oids is None else [u64(o) for o in split_oids(oids)],
            u64(pack_tid), not partial and oids is not None)


class Packer:
    def __init__(self, app: StorageApp, rate: int = 0) -> None:
        self.app = app
        self.rate = rate  # objects visited per second, 0 = no cap
        self.orders: dict[int, Order] = {}
        self.horizon = 0        # greatest order id the master told us about
        self.stale = True       # ask the master for orders
        self.reported: int | None = None
        self.chunk = CHUNK
        self._activity = 0
        self._busy_until = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        # statistics (logs, tests, benchmarks)
        self.visited = 0
        self.deleted = 0
        self.rested = 0.0
        self._window_start = 0.0
        self._window_count = 0

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        self.stale = True
        self.reported = None
        self._task = asyncio.ensure_future(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def poke(self) -> None:
        self._wake.set()

    def signed(self, approved: list[bytes], rejected: list[bytes]) -> None:
        self.stale = True
        self.poke()

    def cell_changed(self, partition: int, old: int | None, new: int) -> None:
        if new == CellStates.DISCARDED.value:
            self.app.backend.set_pack_progress(partition, None)
            self.app.pending_written()
        elif old is None:
            self.stale = True  # a new cell applies every order since the first
        self.poke()

    # -- state ----------------------------------------------------------------------------
    def own(self) -> list[int]:
        return self.app.assigned_partitions()

    def _done(self, partition: int) -> int:
        progress = self.app.backend.get_pack_progress(partition)
        return 0 if progress is None else progress[0]

    def pending(self, partition: int) -> list[int]:
        done = self._done(partition)
        return [t for t in sorted(self.orders) if t > done and self.orders[t].approved]

    def packable(self, partition: int) -> bool:
        app = self.app
        return app.readable(partition) or (
            app.cell_state(partition) == CellStates.OUT_OF_DATE.value
            and app.replicator.caught_up(partition))

    def completed(self) -> int:
        """The last order applied on all our readable partitions (as far as
        we know)."""
        value = None
        for partition in self.own():
            if not self.app.readable(partition):
                continue
            pending = self.pending(partition)
            here = pending[0] - 1 if pending else max(self._done(partition), self.horizon)
            value = here if value is None else min(value, here)
        return self.horizon if value is None else value

    def status(self) -> dict:
        return {p: self.app.backend.get_pack_progress(p) for p in self.own()}

    # -- the loop ---------------------------------------------------------------------------
    async def _run(self) -> None:
        await run_steps(self.app, "pack", self._wake, self._step)

    async def _step(self) -> bool:
        if self.stale:
            await self._refresh()
            # A caught-up replication waits for fresh orders before it
            # reports its cell (Replicator._maybe_done pokes us and returns):
            # without this it waited for a wake-up that only a pack of one
            # of our partitions gave, forever when there was none to do
            # (a storage that rejoined with little to fetch stayed
            # OUT_OF_DATE)
            self.app.replicator.poke()
        partition = self._next_partition()
        if partition is None:
            self._report()
            return False
        await self._pack(partition)
        self._report()
        return True

    async def _refresh(self) -> None:
        conn = self.app.master_conn
        if conn is None:
            raise ConnectionClosed("no master")
        self.stale = False
        own = self.own()
        start = min((self._done(p) for p in own), default=self.horizon) + 1
        ask = start
        while True:
            (orders,) = await conn.ask(Packets.AskPackOrders, p64(ask))
            if not orders:
                break
            for entry in orders:
                record = order_from_wire(*entry)
                self.orders[record[0]] = Order(*record)
                self.horizon = max(self.horizon, record[0])
            ask = u64(orders[-1][0]) + 1
        # orders every partition applied are not needed any more
        for tid in [t for t in self.orders if t < start]:
            del self.orders[tid]

    def _next_partition(self) -> int | None:
        app = self.app
        best = None
        for partition in self.own():
            if not self.pending(partition) or not self.packable(partition):
                continue
            progress = app.backend.get_pack_progress(partition)
            if progress is not None and progress[1] is not None:
                return partition  # a pass in progress goes first
            if best is None:
                best = partition
        return best

    async def _pack(self, partition: int) -> None:
        app = self.app
        backend = app.backend
        done, target, next_oid = backend.get_pack_progress(partition) or (0, None, 0)
        pending = self.pending(partition)
        if target is None or target < pending[0]:
            target, next_oid = pending[-1], 0
        steps = [self.orders[t].step for t in pending if t <= target]
        started, visited, deleted, rested = time.monotonic(), 0, 0, self.rested
        while True:
            progress = (done, target, next_oid)
            t0 = time.perf_counter()
            following, n, gone = backend.pack_partition(partition, steps, next_oid, self.chunk,
                                                        progress)
            elapsed = time.perf_counter() - t0
            if n:
                self.chunk = max(CHUNK_MIN, min(CHUNK_MAX, int(
                    self.chunk * CHUNK_TIME / max(elapsed, 1e-4))))
            app.pending_written()
            visited += n
            deleted += gone
            self.visited += n
            self.deleted += gone
            if following is None:
                backend.set_pack_progress(partition, (target, None, 0))
                log.log(logging.INFO if deleted else logging.DEBUG,
                        "%s: partition %d packed up to order %#x (%d orders, %d objects"
                        " visited, %d revisions deleted in %.3f s, %.3f s yielded to"
                        " requests)", app.label, partition, target, len(steps), visited,
                        deleted, time.monotonic() - started, self.rested - rested)
                if not app.readable(partition):
                    app.replicator.poke()  # it may report the cell replicated now
                await self._throttle(n, self._rest(elapsed))
                return
            next_oid = following
            await self._throttle(n, self._rest(elapsed))
            if not self.packable(partition):
                return  # resumed when it is again

    def _rest(self, elapsed: float) -> float:
        """How long to rest after a chunk that took ``elapsed`` seconds:
        clients and the master go first."""
        now = time.monotonic()
        if self.app.activity != self._activity:
            self._activity = self.app.activity
            self._busy_until = now + BUSY_TIME
        if now < self._busy_until:
            self.rested += BUSY_REST * elapsed
            return BUSY_REST * elapsed
        return 0.0

    async def _throttle(self, count: int, rest: float = 0) -> None:
        """Let the loop serve others between chunks (for at least ``rest``
        seconds), and cap the rate."""
        ahead = 0.0
        if self.rate:
            now = time.monotonic()
            if not self._window_start or now - self._window_start > 10:
                self._window_start, self._window_count = now, 0
            self._window_count += count
            ahead = self._window_count / self.rate - (now - self._window_start)
        await asyncio.sleep(max(ahead, rest, 0))  # rate cap and yielding, not synchronisation

    def _report(self) -> None:
        conn = self.app.master_conn
        if conn is None or conn.closed:
            return
        value = self.completed()
        if value != self.reported:
            self.reported = value
            conn.notify(Packets.NotifyPackCompleted, p64(value))
