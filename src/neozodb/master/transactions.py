"""The master's transaction manager: a pure state machine.

It allocates OIDs, TTIDs and TIDs and tracks two-phase commits: which
storages must lock a transaction, which did, and in which order transactions
complete.  Commits complete in TID order: a transaction is only reported
committed once every transaction with a smaller TID is.  Time comes in as
``now``; nothing here does I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from neozodb.tid import final_tid, format_tid_time, next_tid, tid_from_time

# An imposed TID (restore, copyTransactionsFrom) may be this many seconds
# ahead of the master's clock, no more: every later transaction gets a
# greater TID, so one far in the future would move the cluster's clock
# there for good.  Copies come from databases written in the past; an hour
# leaves room for clocks that disagree.
IMPOSED_AHEAD = 3600.0


class TransactionError(Exception):
    pass


@dataclass(eq=False)
class Txn:
    ttid: int
    client: int
    imposed: bool = False
    tid: int | None = None
    oids: list = field(default_factory=list)
    involved: set = field(default_factory=set)
    locked: set = field(default_factory=set)
    failed: set = field(default_factory=set)
    # the client's AskFinishTransaction, so the answer can go back later
    finish_request: Any = None
    finishing: bool = False
    # the pack order it carries: (oids or None, pack_tid as int)
    pack: Any = None
    # storages running when it began: only they can fail its vote
    ready: set = field(default_factory=set)
    # involved storages that refused to lock it (they do not hold it)
    refused: set = field(default_factory=set)
    # partition -> involved storages with a cell there: each partition
    # must be locked by one of them, or the transaction is lost
    cells: dict = field(default_factory=dict)
    # imposed TID, finish asked while an earlier imposed transaction of
    # its client is not locked everywhere yet: its locks wait (``deferred``)
    deferred: bool = False
    locked_callback: Any = None  # what takes each storage's answer to its lock
    # a bulk copy (feature bulk-copy): the TID of its first transaction
    # (its TTID and TID are those of the last), and at the finish the
    # (tid, oids) of each of its transactions, for the invalidations
    first: int | None = None
    subs: list | None = None
    # what an imposed TID had to be above before this one began
    floor_before: int = 0

    @property
    def prepared(self) -> bool:
        return self.finishing

    @property
    def fully_locked(self) -> bool:
        return self.finishing and self.involved <= self.locked | self.refused

    @property
    def lost(self) -> bool:
        """Some partition it wrote to was locked by none of its storages:
        they refused, or were lost before they locked it (the last of them
        may go between two checks that the cluster is operational), or there
        was none at the finish.  Never reported committed: nothing of that
        partition is durable anywhere."""
        return any(not nids & self.locked for nids in self.cells.values())


def _holds_back(txn: Txn) -> bool:
    """Whether the later imposed transactions of ``txn``'s client must not
    be locked yet: it is not locked by all its storages (or waits itself),
    or it is lost (it leaves the queue, and dooms them, only once it is at
    its head)."""
    return txn.deferred or not txn.fully_locked or txn.lost


class TransactionManager:
    def __init__(self, num_partitions: int) -> None:
        self.num_partitions = num_partitions
        self.last_tid = 0
        self.last_oid = 0
        self._last_allocated = 0  # greatest TTID or TID handed out
        # what an imposed TID must be above: the same, except after the
        # abort of the last imposed transaction begun (see abort)
        self._imposed_floor = 0
        self.txns: dict[int, Txn] = {}
        self._queue: list[Txn] = []  # prepared transactions, in TID order

    def reset(self, last_tid: int, last_oid: int) -> None:
        self.txns.clear()
        self._queue.clear()
        self.last_tid = last_tid
        self.last_oid = last_oid
        self._last_allocated = max(self._last_allocated, last_tid)
        self._imposed_floor = max(self._imposed_floor, last_tid)

    # -- allocation -------------------------------------------------------------
    def new_oids(self, count: int) -> list[int]:
        first = self.last_oid + 1
        self.last_oid += count
        return list(range(first, first + count))

    def saw_oid(self, oid: int) -> None:
        """A client stored an OID it did not get from us (imported data)."""
        if oid > self.last_oid:
            self.last_oid = oid

    def begin(self, client: int, now: float, tid: int | None = None,
              partition: int | None = None, first: int | None = None,
              reserved: int | None = None) -> Txn:
        """A new transaction of ``client``: ``tid`` imposed, or a TTID from
        the clock, in ``partition`` if given (feature begin-partition: the
        final TID keeps it, so the metadata goes with the first object).
        ``first``: a bulk copy of transactions from ``first`` to ``tid``
        (feature bulk-copy), all of which must come after what the
        cluster has.  ``reserved``: a TTID of a block ``reserve`` gave
        (the caller checked that)."""
        if tid is not None:
            # imposed TID (copyTransactionsFrom / restore): it must come
            # after everything already committed or being committed
            if tid > tid_from_time(now + IMPOSED_AHEAD):
                raise TransactionError(
                    "imposed TID %016x (%s) is more than %g s ahead of the clock" % (
                        tid, format_tid_time(tid), IMPOSED_AHEAD))
            lowest = tid if first is None else first
            if first is not None and not 0 < first <= tid:
                raise TransactionError("bulk copy from TID %016x to %016x: not in order" % (
                    first, tid))
            if lowest <= self._imposed_floor:
                raise TransactionError(
                    "imposed TID %016x (%s) is not greater than the last TID of the cluster,"
                    " committed or being committed: %016x (%s)" % (
                        lowest, format_tid_time(lowest), self._imposed_floor,
                        format_tid_time(self._imposed_floor)))
            ttid = tid
        elif reserved is not None:
            if reserved in self.txns:
                raise TransactionError("TTID %016x already in use" % reserved)
            ttid = reserved
        else:
            ttid = next_tid(now, self._last_allocated)
            if partition is not None:
                ttid += (partition - ttid) % self.num_partitions
        txn = self.txns[ttid] = Txn(ttid, client, imposed=tid is not None, first=first,
                                    floor_before=self._imposed_floor)
        self._last_allocated = max(self._last_allocated, ttid)
        self._imposed_floor = max(self._imposed_floor, ttid)
        if tid is not None:
            # its TID is known now: later commits must queue behind it
            txn.tid = tid
            self._queue.append(txn)
        return txn

    def reserve(self, now: float) -> int:
        """The first of a block of TTIDs, one in each partition, for a
        client's next begin (feature begin-ahead): nothing else gets any of
        them, whether the client uses one or not."""
        base = next_tid(now, self._last_allocated)
        self._last_allocated = self._imposed_floor = base + self.num_partitions - 1
        return base

    def prepare(self, ttid: int, now: float, oids: list, involved: set) -> Txn:
        try:
            txn = self.txns[ttid]
        except KeyError:
            raise TransactionError("unknown transaction %#x" % ttid) from None
        if txn.prepared:
            raise TransactionError("transaction %#x already finishing" % ttid)
        txn.finishing = True
        txn.oids = oids
        txn.involved = set(involved)
        if not txn.imposed:
            txn.tid = final_tid(now, self._last_allocated, ttid, self.num_partitions)
            self._last_allocated = self._imposed_floor = txn.tid
            self._queue.append(txn)
        return txn

    def locked(self, ttid: int, nid: int) -> None:
        txn = self.txns.get(ttid)
        if txn is not None and txn.prepared:
            txn.locked.add(nid)

    def refused(self, ttid: int, nid: int) -> None:
        txn = self.txns.get(ttid)
        if txn is not None and txn.prepared:
            txn.refused.add(nid)

    def committable(self) -> list[Txn]:
        """Pop the transactions at the head of the queue that are fully locked."""
        done = []
        queue = self._queue
        while queue and queue[0].fully_locked:
            txn = queue.pop(0)
            del self.txns[txn.ttid]
            if not txn.lost:
                self.last_tid = txn.tid  # type: ignore[assignment]
            done.append(txn)
        return done

    def must_defer(self, txn: Txn) -> bool:
        """Whether the locks of ``txn`` (prepared) must wait: an imposed
        transaction is locked only once every earlier imposed transaction
        of its client is locked by all its storages.  A pipelined copy asks
        to finish a transaction before the previous one's answer; were it
        locked first, a failure of the previous one would leave the
        destination without a transaction below its last one, for good."""
        if not txn.imposed:
            return False
        for other in self._queue:
            if other is txn:
                return False
            if other.client == txn.client and other.imposed and _holds_back(other):
                return True
        return False

    def undeferred(self) -> list[Txn]:
        """The deferred transactions whose locks may go now (in order)."""
        ready = []
        blocked: set[int] = set()
        for txn in self._queue:
            if not txn.imposed:
                continue
            if txn.deferred and txn.client not in blocked:
                txn.deferred = False
                ready.append(txn)
            if _holds_back(txn):
                blocked.add(txn.client)
        return ready

    def doomed(self, failed: Txn) -> list[Txn]:
        """The imposed transactions of ``failed``'s client after it (its
        imposed TID failed to commit): forgotten, none is committed.  A
        pipelined copy begins, votes and asks to finish them before it
        knows; were one committed, the copy would miss ``failed`` for good."""
        if not failed.imposed:
            return []
        doomed = [t for t in self.txns.values() if t.imposed and t.client == failed.client
                  and t.tid > failed.tid]  # type: ignore[operator]
        for txn in doomed:
            self._queue.remove(txn)
            del self.txns[txn.ttid]
        return doomed

    def abort(self, ttid: int) -> Txn | None:
        txn = self.txns.get(ttid)
        if txn is None:
            return None
        if txn.prepared:
            raise TransactionError("cannot abort transaction %#x: finish requested" % ttid)
        del self.txns[ttid]
        if txn.imposed:
            self._queue.remove(txn)
            if self._imposed_floor == ttid:
                # nothing handed out since: its TIDs may be imposed again,
                # as a copy does with the transactions of a bulk batch the
                # storages refused (client/copying.py).  TTIDs from the
                # clock stay above it (_last_allocated): storages remember
                # an aborted TTID, and would refuse a transaction given it.
                self._imposed_floor = txn.floor_before
        return txn

    def client_lost(self, client: int) -> list[Txn]:
        """Abort the client's transactions that it did not ask to finish."""
        lost = [t for t in self.txns.values() if t.client == client and not t.prepared]
        for txn in lost:
            self.abort(txn.ttid)
        return lost

    def storage_lost(self, nid: int) -> None:
        """A lost storage is no longer waited for; its cells get outdated."""
        for txn in self._queue:
            txn.involved.discard(nid)

    def has_pending(self) -> bool:
        return bool(self.txns)

    def prepared_count(self) -> int:
        return len(self._queue)


class Reservations:
    """The TTID blocks reserved for one client connection (feature
    begin-ahead), each with what the client had been sent about nodes and
    partitions when it was: a block is good only if nothing more was sent
    since (``Node.topology``).  A client holds one block per thread that
    commits: the oldest are forgotten beyond ``LIMIT``."""

    LIMIT = 16

    def __init__(self) -> None:
        self._blocks: dict[int, int] = {}  # first TTID -> topology at reservation

    def add(self, base: int, topology: int) -> None:
        blocks = self._blocks
        if len(blocks) >= self.LIMIT:
            del blocks[next(iter(blocks))]
        blocks[base] = topology

    def take(self, ttid: int, num_partitions: int, topology: int) -> bool:
        """Whether ``ttid`` is in a block reserved, still good; the block
        is used up either way."""
        for base, seen in self._blocks.items():
            if base <= ttid < base + num_partitions:
                del self._blocks[base]
                return seen == topology
        return False
