"""Catching up OUT_OF_DATE cells from readable replicas.

Two partitions at a time (``PARALLEL``), each from a random running
storage with a readable cell: transactions first, then object revisions,
in chunks.  The records
a source streams are kept in memory (``_Chunk``) until its answer ends the
chunk; then the next chunk is asked for *before* this one is written, so
that the source reads chunk n+1 while we write chunk n.  A chunk's rows are
written at once, with the resume point, in one database transaction, so an
interrupted replication starts again where it stopped, and a node that was
down only fetches what it missed.  That transaction is made durable at the
end of the partition (before the master is told), and otherwise within a
second (``pending_written``) or by any earlier durable write: a crash loses
chunks and their resume points together, never a point without its rows.

The target: the master's last committed tid when we asked it
(``AskUnfinishedTransactions``); transactions unfinished at that moment may
not have written to us, so we also wait for them (``NotifyTransactionFinished``,
or ``AbortTransaction`` from the master) and replicate up to their tids.
Transactions begun later write to our OUT_OF_DATE cell directly (lockless).
When the cell has everything, and no lockless write of ours is still
pending in it, the master is told (``NotifyReplicationDone``) and makes the
cell UP_TO_DATE.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING

from neozodb.net.connection import ConnectionClosed
from neozodb.net.tasks import watch
from neozodb.protocol import CellStates, NodeStates, Packets, nid_str, p64, u64
from neozodb.storage.background import TRANSIENT, run_steps
from neozodb.storage.blobs import BadContent, replicate_blobs

if TYPE_CHECKING:
    from neozodb.storage.app import StorageApp

log = logging.getLogger("neozodb.storage")

#: Transactions or object revisions per chunk.
CHUNK = 1000
#: Bytes of object data kept in memory for a chunk before they are written
#: (a NEO source does not bound a chunk in bytes).
BUFFER_BYTES = 8 << 20
#: Partitions replicated at once: while one waits for its source, or for
#: the durable write that ends it, another one's chunks are read and
#: written (bench/README.md, "Replication").  The writes still go one after
#: the other, on the event loop.
PARALLEL = 2
#: Rows deleted per step when dropping a discarded partition.
DROP_CHUNK = 1000
_OUT_OF_DATE = CellStates.OUT_OF_DATE.value
_UP_TO_DATE = CellStates.UP_TO_DATE.value


def _consume(future: asyncio.Future) -> None:
    """Retrieve the outcome of a future nobody awaits (no "never retrieved"
    warning)."""
    if not future.cancelled():
        future.exception()


class NoSource(Exception):
    pass


class BadSource(Exception):
    """A source answered something inconsistent (a position that does not
    advance, rows to delete we did not list): the replication with it is
    abandoned, its connection closed, and tried again later (perhaps from
    another replica).  Transient: never a reason to stop the node, which
    would restart into the same answer."""


class _Chunk:
    """What a source streamed so far for one fetch of ``partition``."""

    __slots__ = ("partition", "transactions", "orders", "objects", "size", "received",
                 "messages")

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.transactions: list = []
        self.orders: list = []  # pack orders that came with the transactions
        self.objects: list = []
        self.size = 0
        # object revisions and messages received for this fetch (the log
        # line of the partition: several partitions are replicated at once)
        self.received = 0
        self.messages = 0


class Replicator:
    def __init__(self, app: StorageApp, rate: int = 0) -> None:
        self.app = app
        self.rate = rate  # bytes of object data per second, 0 = unlimited
        self.targets: dict[int, int] = {}        # partition -> tid to reach
        self.unfinished: dict[int, set[bytes]] = {}  # partition -> ttids to wait for
        self.notified: dict[int, int] = {}       # partition -> tid told to the master
        self.to_drop: set[int] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._workers: set[asyncio.Task] = set()  # _step's, one per partition at a time
        self._chunks: dict[asyncio.Future, _Chunk] = {}  # fetch in progress -> its records
        self._window_start = 0.0
        self._window_bytes = 0

    # -- lifecycle -------------------------------------------------------------------
    def note_resume_points(self) -> None:
        """Note where each OUT_OF_DATE cell without a resume point is
        complete: from its last committed tid on, it misses what was
        committed while we were away.  Done before anything newer lands in
        it: lockless writes once operational, and, already during
        verification, the transactions the master validates here (they are
        written into every cell they touch; one newer than commits we missed
        must not hide them from replication)."""
        backend = self.app.backend
        for partition in self.own(_OUT_OF_DATE):
            if backend.get_replication(partition) is None:
                last = backend.last_tid_of(partition)
                first = 0 if last is None else last + 1
                backend.set_replication(partition, (first, first, 0))

    def start(self) -> None:
        """Operation starts: resume points of the OUT_OF_DATE cells, and
        the data of partitions we no longer have to delete."""
        app = self.app
        backend = app.backend
        self.note_resume_points()
        # data of partitions we lost while we were away (FEEDING cells of a
        # down node are discarded, and we were not there to be told)
        ours = set(app.pt.partitions_of(app.nid)) if app.pt is not None else set()
        for partition in range(backend.get_num_partitions() or 0):
            if partition not in ours and backend.last_tid_of(partition) is not None:
                self.to_drop.add(partition)
        self._task = watch(app, asyncio.ensure_future(self._run()), "replication",
                           lambda: app.exit(1))

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        # at once, as the task's own awaits would be: a worker whose answer
        # came would otherwise go on, past the state cleared below, until
        # the task's cancellation reaches it through its TaskGroup
        for worker in list(self._workers):
            worker.cancel()
        self.targets.clear()
        self.unfinished.clear()
        self.notified.clear()

    def own(self, state: int) -> list[int]:
        app = self.app
        if app.pt is None or app.nid is None:
            return []
        return [p for p in app.pt.partitions_of(app.nid) if app.cell_state(p) == state]

    def poke(self) -> None:
        self._wake.set()

    def locks_released(self) -> None:
        """Transactions ended: a cell being replicated may be waiting for
        them (``_maybe_done``).  Without one, waking the loop would only
        scan the table at every commit."""
        if self.targets:
            self._wake.set()

    # -- events ------------------------------------------------------------------------
    def cell_changed(self, partition: int, old: int | None, new: int) -> None:
        """Our cell of ``partition`` went from ``old`` (None: no cell) to ``new``."""
        backend = self.app.backend
        if new == _OUT_OF_DATE and old != _OUT_OF_DATE:
            self.to_drop.discard(partition)
            if old == CellStates.CORRUPTED.value:
                # rows present on both sides are not compared by replication:
                # a corrupted copy is rebuilt from nothing.  Synchronous, so
                # that no write of the new OUT_OF_DATE cell can be deleted.
                log.warning("%s: erasing corrupted partition %d", self.app.label, partition)
                while backend.drop_partition(partition, DROP_CHUNK):
                    pass
                backend.set_replication(partition, (0, 0, 0))
            elif old is None or backend.get_replication(partition) is None:
                # a new cell (maybe over leftovers of a discarded one, which
                # the chunk comparison deletes) or a corrupted one: from scratch
                backend.set_replication(partition, (0, 0, 0))
        elif new == _UP_TO_DATE and old == _OUT_OF_DATE:
            backend.set_replication(partition, None)
            self.app.lock_lockless(partition)
        elif new == CellStates.DISCARDED.value:
            backend.set_replication(partition, None)
            self.to_drop.add(partition)
        if new != _OUT_OF_DATE:
            self.targets.pop(partition, None)
            self.unfinished.pop(partition, None)
            self.notified.pop(partition, None)
        self.poke()

    def transaction_finished(self, ttid: bytes, tid: bytes | None) -> None:
        """The master says ``ttid`` is over: committed as ``tid``
        (``NotifyTransactionFinished``), or aborted (None: ``AbortTransaction``,
        which is all NEO's master sends about an aborted transaction that a
        replication waits for; it wrote nothing, the target stays)."""
        tid_int = None if tid is None else u64(tid)
        for partition, ttids in self.unfinished.items():
            if ttid in ttids:
                ttids.discard(ttid)
                if tid_int is not None:
                    self.targets[partition] = max(self.targets[partition], tid_int)
        self.poke()

    def transaction_received(self, fetch: object, partition: int, record: tuple,
                             order: tuple | None) -> None:
        """A transaction streamed for ``fetch`` (a pending request's token)."""
        chunk = self._chunks.get(fetch)
        if chunk is None:
            return  # a fetch we gave up: dropped, as NEO's replicator does
        chunk.transactions.append(record)
        if order is not None:
            chunk.orders.append(order)

    def object_received(self, fetch: object, partition: int, record: tuple) -> None:
        """An object revision streamed for ``fetch``."""
        chunk = self._chunks.get(fetch)
        if chunk is None:
            return
        size = len(record[4])
        chunk.received += 1
        chunk.messages += 1
        self._window_bytes += size
        if partition != chunk.partition:
            # not what was asked; written anyway, as it always was
            self.app.backend.add_objects(partition, [record])
            return
        chunk.objects.append(record)
        chunk.size += size
        if chunk.size >= BUFFER_BYTES:
            self._write(chunk)

    def batch_received(self, fetch: object, partition: int, records: list[tuple]) -> None:
        """Object revisions streamed for ``fetch``, all of ``partition``
        (``AddObjects``)."""
        chunk = self._chunks.get(fetch)
        if chunk is None:
            return
        size = sum(len(record[4]) for record in records)
        chunk.received += len(records)
        chunk.messages += 1
        self._window_bytes += size
        if partition != chunk.partition:
            self.app.backend.add_objects(partition, records)
            return
        chunk.objects += records
        chunk.size += size
        if chunk.size >= BUFFER_BYTES:
            self._write(chunk)

    def _write(self, chunk: _Chunk) -> None:
        """Write what a chunk holds so far (not durable by itself)."""
        backend = self.app.backend
        if chunk.transactions:
            backend.add_transactions(chunk.transactions)
            for order in chunk.orders:
                backend.add_pack_order(order)
        if chunk.objects:
            backend.add_objects(chunk.partition, chunk.objects)
        chunk.transactions, chunk.orders, chunk.objects, chunk.size = [], [], [], 0

    def _ask(self, conn, partition: int, packet, *args) -> tuple[asyncio.Future, _Chunk]:
        future = conn.ask(packet, partition, CHUNK, *args)
        chunk = self._chunks[future] = _Chunk(partition)
        return future, chunk

    async def _answer(self, future: asyncio.Future) -> tuple:
        try:
            return await future
        except BaseException:
            self._chunks.pop(future, None)
            raise

    def _abandon(self, future: asyncio.Future | None) -> None:
        """Forget a fetch we will not await: what it streams is dropped."""
        if future is not None and self._chunks.pop(future, None) is not None:
            future.add_done_callback(_consume)

    def _save(self, chunk: _Chunk, partition: int, point: tuple[int, int, int],
              done: bool) -> None:
        """Write a chunk and the resume point after it in one database
        transaction: durable when the partition is done, otherwise it
        becomes durable with the next durable write, within a second."""
        self._write(chunk)
        self.app.backend.set_replication(partition, point, durable=done)
        if not done:
            self.app.pending_written()

    # -- the loop -----------------------------------------------------------------------
    async def _run(self) -> None:
        await run_steps(self.app, "replication", self._wake, self._step,
                        TRANSIENT + (NoSource, BadSource))

    async def _step(self) -> bool:
        app = self.app
        if self.to_drop:
            await self._drop_some()
            return True
        todo = [p for p in self.own(_OUT_OF_DATE) if p not in self.notified]
        new = [p for p in todo if p not in self.targets]
        if new:
            await self._ask_unfinished(new)
        ready = [p for p in todo if p in self.targets]
        if not ready:
            return False
        # the partitions furthest behind first (popped from the end)
        ready.sort(key=lambda p: (app.backend.get_replication(p) or (0,))[0])
        ready.reverse()
        progressed = False

        async def replicate_some() -> None:
            nonlocal progressed
            while ready:
                partition = ready.pop()
                if partition not in self.targets or app.cell_state(partition) != _OUT_OF_DATE:
                    continue
                if await self._replicate(partition):
                    progressed = True
                self._maybe_done(partition)
        workers = self._workers
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(PARALLEL, len(ready))):
                    worker = group.create_task(replicate_some())
                    workers.add(worker)
                    worker.add_done_callback(workers.discard)
        except BaseExceptionGroup as e:
            # the others were cancelled: retried as one failure
            raise e.exceptions[0] from None
        return progressed

    async def _ask_unfinished(self, partitions: list[int]) -> None:
        conn = self.app.master_conn
        if conn is None:
            raise ConnectionClosed("no master")
        done = asyncio.get_running_loop().create_future()
        done.add_done_callback(_consume)  # we may be cancelled meanwhile

        def answered(conn, result, error) -> None:
            # Run as the answer is dispatched, before what the master sent
            # after it: a NotifyTransactionFinished read in the same chunk
            # must find the transactions it ends.  Set when this coroutine
            # resumed (a future's answer), they were set after it, and the
            # replication waited for a transaction already finished: the
            # cell stayed OUT_OF_DATE for good.
            if error is not None:
                if not done.done():
                    done.set_exception(error)
                return
            last_tid, ttids = result
            for partition in partitions:
                self.targets[partition] = u64(last_tid)
                self.unfinished[partition] = set(ttids)
            log.debug("%s: replicating partitions %s up to %s, waiting for %d transactions %s",
                      self.app.label, partitions, last_tid.hex(), len(ttids),
                      " ".join(t.hex() for t in ttids))
            if not done.done():
                done.set_result(None)
        conn.ask(Packets.AskUnfinishedTransactions, partitions, callback=answered)
        await done

    def _source(self, partition: int) -> int:
        app = self.app
        candidates = []
        for nid in app.pt.readable_nids(partition):
            node = app.nm.get(nid)
            if nid != app.nid and node is not None and node.state is NodeStates.RUNNING \
                    and node.address is not None:
                candidates.append(nid)
        if not candidates:
            raise NoSource("no readable replica of partition %d is running" % partition)
        return random.choice(candidates)

    async def _replicate(self, partition: int) -> bool:
        """Fetch what is missing of ``partition`` up to its target; True if
        something was to be fetched."""
        app = self.app
        backend = app.backend
        target = self.targets[partition]
        next_tid, obj_tid, obj_oid = backend.get_replication(partition) or (0, 0, 0)
        if next_tid > target and obj_tid > target and not (
                backend.blobs and backend.blobs_lacking(partition, (target + 1, 0), None)):
            return False
        nid = self._source(partition)
        conn = await app.peer_connection(nid)
        try:
            return await self._fetch(partition, nid, conn, target, next_tid, obj_tid, obj_oid)
        except BadSource as e:
            conn.close("bad replication answer: %s" % e)
            raise BadSource("partition %d from %s: %s" % (partition, nid_str(nid), e)) from None

    async def _fetch(self, partition: int, nid: int, conn, target: int, next_tid: int,
                     obj_tid: int, obj_oid: int) -> bool:
        app = self.app
        backend = app.backend
        started = time.monotonic()
        objects = messages = 0
        high = p64(target)
        first = True
        while next_tid <= target:
            mine = [p64(t) for t in backend.fetch_tids(partition, CHUNK, next_tid, target)]
            future, chunk = self._ask(conn, partition, Packets.AskFetchTransactions,
                                      p64(next_tid), high, mine, first)
            following, delete, completed = await self._answer(future)
            del self._chunks[future]
            self._check_cell(partition)
            if first and completed is not None and 0 < obj_tid <= u64(completed):
                # The source applied a pack order made after our resume
                # point, which we missed: the deletion records it packed
                # away will never reach us, and the objects they deleted
                # would live on here.  Every object of the partition is
                # compared instead (the source lists what to delete).
                log.info("%s: partition %d: %s packed up to order %s, after our resume point"
                         " %s: comparing every object", app.label, partition, nid_str(nid),
                         completed.hex(), p64(obj_tid).hex())
                obj_tid, obj_oid = 0, 0
            first = False
            if not set(delete) <= set(mine):
                raise BadSource("deletion of transactions we did not list")
            if following is not None and u64(following) <= next_tid:
                raise BadSource("transaction position does not advance")
            backend.delete_transactions(partition, [u64(t) for t in delete])
            next_tid = target + 1 if following is None else u64(following)
            self._save(chunk, partition, (next_tid, obj_tid, obj_oid), obj_tid > target)
        asked = None
        try:
            while obj_tid <= target:
                start = (obj_tid, obj_oid)
                if asked is None:
                    asked = self._ask_objects(conn, partition, obj_tid, high, obj_oid)
                future, chunk, mine = asked
                asked = None
                following, following_oid, delete = await self._answer(future)
                del self._chunks[future]
                objects += chunk.received
                messages += chunk.messages
                self._check_cell(partition)
                if any(not set(oids) <= set(mine.get(t, ())) for t, oids in delete.items()):
                    raise BadSource("deletion of objects we did not list")
                if following is not None and (following_oid is None or (
                        u64(following), u64(following_oid)) <= (obj_tid, obj_oid)):
                    raise BadSource("object position does not advance")
                if following is None:
                    obj_tid, obj_oid = target + 1, 0
                else:
                    obj_tid, obj_oid = u64(following), u64(following_oid)
                    # the source reads the next chunk while we write this one
                    # (the ranges do not overlap)
                    asked = self._ask_objects(conn, partition, obj_tid, high, obj_oid)
                backend.delete_objects(partition, [(u64(t), u64(o)) for t, oids in delete.items()
                                                   for o in oids])
                await self._contents(conn, partition, start, (obj_tid, obj_oid), chunk)
                self._save(chunk, partition, (next_tid, obj_tid, obj_oid), obj_tid > target)
                await self._throttle()
        finally:
            if asked is not None:
                self._abandon(asked[0])
        # after the target: rows lockless writes stored without their content
        await self._contents(conn, partition, (target + 1, 0), None)
        log.info("%s: partition %d replicated from %s up to %s (%d objects in %.3f s,"
                 " %d messages)", app.label, partition, nid_str(nid), high.hex(),
                 objects, time.monotonic() - started, messages)
        return True

    async def _contents(self, conn, partition: int, first: tuple[int, int],
                        last: tuple[int, int] | None, chunk: _Chunk | None = None) -> None:
        """Fetch the blob contents that rows of ``partition`` from ``first``
        to ``last`` lack (storage/blobs.py), once ``chunk``'s rows are
        written, before the resume point passes them."""
        if not self.app.backend.blobs:
            return
        if chunk is not None:
            self._write(chunk)
        try:
            await replicate_blobs(self.app, conn, partition, first, last)
        except BadContent as e:
            raise BadSource(str(e)) from None

    def _ask_objects(self, conn, partition: int, obj_tid: int, high: bytes, obj_oid: int
                     ) -> tuple[asyncio.Future, _Chunk, dict[bytes, list[bytes]]]:
        mine: dict[bytes, list[bytes]] = {}
        for tid, oid in self.app.backend.fetch_object_keys(partition, CHUNK, obj_tid,
                                                           u64(high), obj_oid):
            mine.setdefault(p64(tid), []).append(p64(oid))
        future, chunk = self._ask(conn, partition, Packets.AskFetchObjects, p64(obj_tid), high,
                                  p64(obj_oid), mine)
        return future, chunk, mine

    def _check_cell(self, partition: int) -> None:
        if self.app.cell_state(partition) != _OUT_OF_DATE:
            raise NoSource("partition %d is no longer OUT_OF_DATE here" % partition)

    def caught_up(self, partition: int) -> bool:
        """Everything committed up to the target is here: replication will
        not write below it any more (pack may apply to the cell)."""
        if partition not in self.targets or self.unfinished.get(partition):
            return False
        point = self.app.backend.get_replication(partition)
        target = self.targets[partition]
        return point is not None and point[0] > target and point[1] > target

    def _maybe_done(self, partition: int) -> None:
        app = self.app
        if not self.caught_up(partition):
            return
        target = self.targets[partition]
        if app.lockless_pending(partition):
            return  # poked again when they finish
        if app.packer.stale or app.packer.pending(partition):
            app.packer.poke()  # a cell becomes readable packed; poked again then
            return
        conn = app.master_conn
        if conn is None:
            return
        self.notified[partition] = target
        conn.notify(Packets.NotifyReplicationDone, partition, p64(target))
        log.info("%s: partition %d is up to date at %s", app.label, partition, p64(target).hex())

    async def _throttle(self) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        if not self._window_start or now - self._window_start > 10:
            self._window_start, self._window_bytes = now, 0
            return
        ahead = self._window_bytes / self.rate - (now - self._window_start)
        if ahead > 0:
            await asyncio.sleep(ahead)  # rate cap, not synchronisation

    async def _drop_some(self) -> None:
        app = self.app
        partition = min(self.to_drop)
        if app.cell_state(partition) is not None:
            self.to_drop.discard(partition)  # ours again
            return
        if not app.backend.drop_partition(partition, DROP_CHUNK):
            self.to_drop.discard(partition)
            log.info("%s: data of discarded partition %d deleted", app.label, partition)
        app.pending_written()
        await asyncio.sleep(0)  # let client requests in between chunks
