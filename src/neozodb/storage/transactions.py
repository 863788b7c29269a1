"""Object locks of a storage node: a pure state machine.

Every object being written by a transaction is write-locked by its TTID
until the transaction is unlocked (committed) or aborted, or until it is
locked: a store based on the revision being committed may then take it
(the next transaction of a pipelined copy, or of a client that got its
previous commit's answer before we got its unlock).  Between lock and
unlock, its objects are also read-locked: loads wait so that no client
sees the previous revision as current once the master has told it about
the commit.  A request that meets a lock is delayed by the caller and retried,
oldest transaction (smallest TTID) first.  To avoid deadlocks, an older
transaction that waits for a younger one that has not voted yet (or whose
vote may be undone: ``revocable``) asks the younger's client to release the
lock and take it again later (NEO's NotifyDeadlock / AskRelockObject).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

# how many aborted TTIDs are remembered, to refuse their late requests
ABORTED_MEMORY = 10000


@dataclass(eq=False)
class Transaction:
    ttid: bytes
    client: int | None
    conn: object = None  # the client connection that started it
    # oid -> (serial the client based its change on, data_id, data_serial)
    objects: dict = field(default_factory=dict)
    checked: dict = field(default_factory=dict)  # oid -> serial (readCurrent)
    lockless: set = field(default_factory=set)
    voted: bool = False
    # voted with an early lazy vote (feature early-lazy-vote): the client
    # may still wait for a lock on another storage, so its locks here may
    # be asked back, which undoes the vote (Writes.AskRelockObject)
    revocable: bool = False
    # oids whose last store or check is not settled: delayed (waiting for
    # a lock), answered with a conflict, or its lock given back (relock).
    # A vote is refused while it is not empty: it would commit without them.
    unsettled: set = field(default_factory=set)
    tid: bytes | None = None
    deadlock_notified: set = field(default_factory=set)
    # every oid whose write lock it took: released at the end even if a
    # failing request took it before recording the object
    held: set = field(default_factory=set)
    # oid -> storage.blobs.Upload: blob contents received for its objects
    uploads: dict = field(default_factory=dict)
    # a bulk copy (feature bulk-copy): the TTIDs (= TIDs, as ints) of its
    # transactions in order, and oid -> TID of its last revision there
    subs: list | None = None
    serials: dict | None = None

    @property
    def locked(self) -> bool:
        return self.tid is not None

    @property
    def low(self) -> bytes | None:
        """The smallest TID it commits, None before its lock: that of the
        first transaction of a bulk copy."""
        if self.tid is None or self.subs is None:
            return self.tid
        return self.subs[0].to_bytes(8, "big")

    def tids(self) -> list[int]:
        """The TIDs it commits (none before its lock)."""
        if self.tid is None:
            return []
        return [int.from_bytes(self.tid, "big")] if self.subs is None else self.subs


class LockManager:
    def __init__(self) -> None:
        self.txns: dict[bytes, Transaction] = {}
        self.write_locks: dict[bytes, bytes] = {}  # oid -> ttid
        self.read_locks: dict[bytes, bytes] = {}  # oid -> ttid (locked, not yet unlocked)
        # A store delayed behind a lock, or sent before the abort reached us,
        # must not resurrect an aborted transaction.
        self.aborted: OrderedDict[bytes, None] = OrderedDict()

    def get(self, ttid: bytes, client: int | None = None, conn: object = None) -> Transaction:
        txn = self.txns.get(ttid)
        if txn is None:
            txn = self.txns[ttid] = Transaction(ttid, client, conn)
        return txn

    def acquire(self, ttid: bytes, oid: bytes, past_locked: bool = False) -> bytes | None:
        """Take the write lock on oid for ttid; return the holder if taken.
        ``past_locked``: a holder that is locked (being committed, see
        ``current``) does not keep it."""
        holder = self.write_locks.get(oid)
        if holder is None or holder == ttid or (past_locked and self._locked(holder)):
            self.write_locks[oid] = ttid
            txn = self.txns.get(ttid)
            if txn is not None:
                # a new acquisition may need a new deadlock notice
                txn.deadlock_notified.discard(oid)
                txn.held.add(oid)
            return None
        return holder

    def _locked(self, ttid: bytes) -> bool:
        txn = self.txns.get(ttid)
        return txn is not None and txn.locked

    def deadlock_victim(self, ttid: bytes, oid: bytes, holder: bytes) -> Transaction | None:
        """The younger holder to ask for a relock, once per (holder, oid)."""
        other = self.txns.get(holder)
        if other is None or holder < ttid or (other.voted and not other.revocable) \
                or other.locked:
            return None
        if oid in other.deadlock_notified:
            return None
        other.deadlock_notified.add(oid)
        return other

    def acquire_all(self, ttid: bytes, oids) -> bytes | None:
        """Take the write locks of every one of ``oids`` for ``ttid`` (as
        ``acquire`` with ``past_locked``), or none: a holder that keeps
        one is returned, and nothing is taken."""
        write_locks = self.write_locks
        for oid in oids:
            holder = write_locks.get(oid)
            if holder is not None and holder != ttid and not self._locked(holder):
                return holder
        for oid in oids:
            self.acquire(ttid, oid, past_locked=True)
        return None

    def release(self, ttid: bytes, oid: bytes) -> None:
        if self.write_locks.get(oid) == ttid:
            # back to the transaction committing oid, if one is: it keeps it
            # until its unlock, as if nobody had taken it past its lock
            committing = self.read_locks.get(oid)
            if committing is None:
                del self.write_locks[oid]
            else:
                self.write_locks[oid] = committing

    def lock(self, ttid: bytes, tid: bytes) -> Transaction | None:
        txn = self.txns.get(ttid)
        if txn is not None:
            txn.tid = tid
            read_locks = self.read_locks
            for oid in txn.objects:
                # the read lock goes to the last revision being committed:
                # unlocked last (the master unlocks in TID order), and the
                # one a store must be based on (``current``)
                other = read_locks.get(oid)
                if other is None or self.txns[other].tid < tid:
                    read_locks[oid] = ttid
        return txn

    def current(self, oid: bytes) -> bytes | None:
        """The TID of the transaction that is committing oid (locked, not
        unlocked yet), None if none is: what a change of oid must be based
        on from now on.  Only a pipelined copy bases a store on a revision
        not committed yet (the master tells other clients of a commit once
        every storage locked it, and loads wait for the unlock); the master
        locks a copy's transaction only once the one before is locked
        everywhere, and forgets it if that one fails (ordered-copy), so
        nothing is committed on a revision that is not."""
        ttid = self.read_locks.get(oid)
        if ttid is None:
            return None
        txn = self.txns[ttid]
        return txn.tid if txn.serials is None else txn.serials[oid]

    def abort(self, ttid: bytes) -> Transaction | None:
        self.aborted[ttid] = None
        if len(self.aborted) > ABORTED_MEMORY:
            self.aborted.popitem(last=False)
        return self.finish(ttid)

    def finish(self, ttid: bytes) -> Transaction | None:
        """Unlock or abort: drop every lock the transaction holds."""
        txn = self.txns.pop(ttid, None)
        if txn is None:
            return None
        for oid in {*txn.objects, *txn.checked, *txn.held}:
            if self.read_locks.get(oid) == ttid:
                del self.read_locks[oid]
            self.release(ttid, oid)
        return txn

    def client_transactions(self, client: int) -> list[Transaction]:
        return [t for t in self.txns.values() if t.client == client]

    def connection_transactions(self, conn: object) -> list[Transaction]:
        # by connection, not NID: a NID may already belong to a new client
        return [t for t in self.txns.values() if t.conn is conn]
