"""The begin of a commit, not waited for: ``tpc_begin`` sends it (or,
with feature begin-partition, the first store does, for a TTID in that
object's partition) and the answer, the TTID, is read when the transaction
first needs it (docs/design.md, "Begin"); with feature begin-ahead, the
TTID is one the master reserved at the previous begin, and the answer is
read at the vote.  A mixin of ``Commit``
(client/commit.py), which owns the attributes used here."""
from __future__ import annotations

import logging
from collections import deque
from queue import SimpleQueue

from ZODB.POSException import ConflictError, StorageTransactionError

from neozodb.net.endpoint import RemoteError
from neozodb.protocol import ErrorCodes, Packets, p64, u64
from neozodb.protocol.features import BEGIN_AHEAD

log = logging.getLogger("neozodb.client")


class BeginRefused(Exception):
    """The master refused a TTID it reserved for us (feature begin-ahead)."""


class Reserved:
    """TTID blocks the master reserved for this client (feature
    begin-ahead), each valid only on the connection that got it, and
    only while the master has sent nothing about nodes or partitions
    since (the client forgets them all then: ``MasterHandler``).  One a
    thread that commits; the oldest are forgotten beyond ``LIMIT``, as the
    master does."""

    LIMIT = 16

    def __init__(self) -> None:
        self._blocks: deque[tuple[object, int]] = deque(maxlen=self.LIMIT)

    def add(self, conn, base: int) -> None:
        self._blocks.append((conn, base))

    def holds(self, conn) -> bool:
        return any(owner is conn for owner, _ in tuple(self._blocks))

    def take(self, conn) -> int | None:
        blocks = self._blocks
        while True:
            try:
                owner, base = blocks.pop()  # atomic: threads never share one
            except IndexError:
                return None
            if owner is conn:
                return base

    def clear(self) -> None:
        self._blocks.clear()


class Begin:
    def _send_begin(self, oid: bytes | None, reserved: bool = True) -> None:
        """Send the begin held back by ``tpc_begin``: for a TTID in oid's
        partition, so that the metadata goes where the object goes (one
        storage for a transaction whose objects are on one: a solo vote),
        or anywhere when the TTID is needed before any object.  With
        feature begin-ahead, a TTID of a block the master reserved for us
        is ours at once: the stores leave without waiting for the master's
        answer, read at the vote (docs/design.md, "Begin ahead")."""
        self.begin_unsent = False
        master = self.master
        # in a partition only where that puts the metadata on fewer
        # storages: elsewhere they spread over the partitions as the TTIDs
        # come (begin-partition's rule)
        partition = None if oid is None or not self.app.spread() else self.app.pt.partition(oid)
        if BEGIN_AHEAD not in master.peer_features:
            self.begin_answer = (master.ask(Packets.AskBeginTransaction, None) if partition is None
                                 else master.ask(Packets.AskBeginInPartition, partition))
            return
        app = self.app
        base = app.reserved.take(master) if reserved else None
        if base is not None:
            np = app.pt.num_partitions
            self.ttid = p64(base if partition is None else base + (partition - base) % np)
            self.reserved = True
            self.sent = {}
            app.transactions[self.ttid] = self

        def reserve(result, error):
            # in the thread reading the master, in order with its
            # notifications: a block is forgotten at the next one
            if error is None:
                app.reserved.add(master, u64(result[1]))
        # with a reserved TTID, it waits in the buffer until the vote
        # flushes it, after the storages' requests: the master then
        # answers while they work (it costs a send, 60-70 us here, the
        # master's wake-up included, that nothing waited for)
        self.begin_answer = master.ask(Packets.AskBeginAhead, partition, self.ttid, hook=reserve,
                                       buffer=self.reserved)

    def _answered(self) -> None:
        """Read the master's answer to a begin not waited for: the TTID
        (or, imposed, the TID accepted).  Everything the master sent before
        it (node and partition table changes) is read before it too."""
        if self.begin_unsent:
            # waited for at once: a reserved TTID would save nothing
            self._send_begin(None, reserved=False)
        queue, self.begin_answer = self.begin_answer, None
        if queue is None:
            return
        self.master.flush()
        _, result, error, _ = self.master.wait(queue)
        if isinstance(error, RemoteError):
            if self.reserved and error.code is ErrorCodes.NOT_READY:
                raise BeginRefused(error.message)
            if error.code is ErrorCodes.DENIED:
                raise StorageTransactionError(f"tpc_begin refused: {error.message}")
        if error is not None:
            raise StorageTransactionError(f"tpc_begin failed: {error}")
        if self.ttid is None:
            self.ttid = result[0]
            self.app.transactions[self.ttid] = self
        elif result[0] != self.ttid:
            raise StorageTransactionError(
                f"tpc_begin failed: the master began {result[0].hex()} for {self.ttid.hex()}")

    def _begin_again(self, why: str) -> None:
        """The master refused our reserved TTID: it sent us a change of
        the nodes or partitions while our begin was on its way, and our
        stores went by the tables from before.  What went with the TTID is
        dropped on the storages, and the transaction begins again, waited
        for, with the same stores and checks.  Not after a conflict, an
        undo or a blob upload (``sent`` None, ``uploads``): that raises
        ConflictError, which the application tries again."""
        refused, stores = self.ttid, self.sent
        for conn in self.conns:
            if not conn.closed:
                conn.notify(Packets.AbortTransaction, refused, [])
        app = self.app
        app.transactions.pop(refused, None)
        self.ttid = None  # tpc_abort has nothing more to drop
        if stores is None or self.uploads is not None:
            raise ConflictError(f"the cluster changed as {refused.hex()} began ({why}):"
                                " try again")
        log.info("%s: %s refused by the master (%s): begun again", app.label, refused.hex(),
                 why)
        app.begins_again += 1
        self.reserved = False
        self.sent = None
        self.queue = SimpleQueue()  # what is still to come for the refused one goes elsewhere
        self.pending = 0
        self.involved, self.conns, self.conn_of = set(), [], {}
        self.uniform, self.mixed, self.failed = None, False, set()
        self.revocable = False
        self._send_begin(next(iter(stores), None), reserved=False)
        self.deferred = list(stores.values())
        self._begun()
        for oid, serial in self.checked.items():
            self._send_check(oid, serial)

    def _begun(self) -> None:
        """The begin answered, and the stores deferred until then sent."""
        self._answered()
        deferred, self.deferred = self.deferred, []
        for args, token in deferred:
            self._send_store(args, token, buffer=True)

    def known_ttid(self) -> bytes:
        """The TTID, for a request that carries it, after the stores
        deferred until the begin's answer.  An imposed TID is known from
        the start, and a pipelined copy's stores wait for the vote
        (``store``); a reserved one too, and nothing waits."""
        if not (self.imposed or self.reserved):
            self._begun()
        return self.ttid
