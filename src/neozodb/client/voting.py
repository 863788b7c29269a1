"""The two-phase commit of a ``Commit`` (a mixin): the vote (early,
solo, lazy, or after every store was answered), the finish through the
master, the abort; and what the bulk copy shares with it (``final_tid``,
``metadata``)."""
from __future__ import annotations

import logging
from queue import SimpleQueue

from ZODB.POSException import StorageTransactionError

from neozodb.client.begin import BeginRefused
from neozodb.net.endpoint import ConnectionClosed, RemoteError
from neozodb.protocol import MAX_TID, Packets
from neozodb.protocol.features import EARLY_LAZY_VOTE, EARLY_VOTE, LAZY_VOTE, SOLO_VOTE

log = logging.getLogger("neozodb.client")

# what a Commit's queue carries answers of (the first item of their token)
STORE, CHECK, RELOCK, VOTE = "store", "check", "relock", "vote"

# transactions that vote late after an early vote on several storages had to
# be voted again (a store waited for a lock, or gave it back): under
# contention most would be, each costing a vote more
EARLY_LAZY_BACKOFF = 16


def final_tid(app, ttid: bytes) -> bytes | None:
    """The TID transaction ``ttid`` got, or None if it was not committed:
    asked to the (new) master, which answers at once if it knows, when
    done if it is still committing, or MAX_TID: "ask the storages" (a
    master that restarted knows nothing, but its verification settled
    every transaction on the storages before clients were accepted)."""
    while True:
        master = app.get_master()  # reconnects; waits for the cluster to run
        try:
            (tid,) = master.call(Packets.AskFinalTID, ttid, timeout=app.connect_timeout)
        except ConnectionClosed:
            if app.closed:
                raise
            continue
        if tid != MAX_TID:
            return tid
        (tid,) = app.ask_storage(ttid, Packets.AskFinalTID, ttid)
        return tid


def metadata(txn) -> tuple[bytes, bytes, bytes]:
    """(user, description, extension) of a ZODB transaction, as bytes."""
    ext = txn.extension_bytes if hasattr(txn, "extension_bytes") else b""
    # ZODB's own tests set text attributes directly on the metadata
    user, description = (v.encode("utf-8") if isinstance(v, str) else v
                         for v in (txn.user, txn.description))
    return user, description, ext


class TwoPhase:
    """Vote, finish and abort of ``Commit`` (client/commit.py)."""

    def vote(self) -> list[bytes]:
        try:
            return self._vote()
        except BeginRefused as e:
            self._begin_again(str(e))
            return self._vote()

    def _vote(self) -> list[bytes]:
        # a reserved TTID: the master's answer is read once the vote is
        # sent, and the two come back meanwhile
        if not self.reserved:
            self._begun()
        if self.uploads is not None:
            self.uploads.settle()
        app = self.app
        meta_nids = app.writable_cells(self.ttid)
        meta = (self.ttid, *metadata(self.txn), list(self.data), self.pack)
        again = None  # storages to vote (again) once every store is settled: None, all
        if self._early(meta_nids):
            # sent with the stores still buffered; a storage that did not
            # settle them all refuses (NOT_READY) and is asked again below.
            # On the stores' connection itself: if it closed, a new one
            # would carry the vote to a storage that dropped the stores.
            # Alone on that storage, the vote need not be durable before
            # the lock (feature solo-vote, protocol/features.py); on
            # several, each gets a lazy vote, which a deadlock may undo
            # (feature early-lazy-vote): see _process.
            self.revote: set[int] = set()
            if len(meta_nids) == 1:
                conn = self.conns[0]
                packet = (Packets.AskSoloVote if SOLO_VOTE in conn.peer_features
                          else Packets.AskStoreTransaction)
                conns = [conn]
            else:
                self.revocable = True
                packet = Packets.AskLazyVote
                conns = [self.conn_of[nid] for nid in meta_nids]
            for conn in conns:
                self.pending += 1
                conn.ask(packet, *meta, queue=self.queue, token=(VOTE, True))
            self._answered()
            self._process(block=True)
            self.revocable = False
            again = self.revote
            app.early_votes[bool(again)] += 1
            if again and len(meta_nids) > 1:
                app.early_lazy_skip = EARLY_LAZY_BACKOFF
        if self.begin_answer is not None:
            # a reserved TTID's begin: the stores leave first, and the
            # master answers while the storages work
            self._flush()
            self._answered()
        self._process(block=True)
        self.stored = True
        if again is None or again:
            self._send_votes(meta_nids, meta, again)
            self._process(block=True)
        if self.failed:
            failed = sorted(self.failed)
            try:
                app.get_master().call(Packets.FailedVote, self.ttid, failed, timeout=60)
            except RemoteError as e:
                raise StorageTransactionError(f"commit failed: {e.message}") from None
        self._check_master()
        self.voted = True
        return self.resolved

    def _early(self, meta_nids: list[int]) -> bool:
        """Whether the vote may leave with the stores: the whole transaction
        (objects and metadata) is on one storage, which has the feature,
        did not fail, and whose cells written are not OUT_OF_DATE (a
        conflict there would need a store after its vote); or it went
        whole to several, which may take a lazy vote (``_lazy``) and give
        it back (feature early-lazy-vote).

        A transaction voted on one storage while its store waits for a lock
        on another must be able to give its locks back on the first: an
        older transaction waiting there would wait forever.  A solo vote is
        never asked to (it waits for nothing else), a vote of another
        storage without early-lazy-vote would keep them."""
        if self.failed or self.conflict_error is not None:
            return False
        if len(meta_nids) > 1:
            if not self._lazy(meta_nids) or any(
                    EARLY_LAZY_VOTE not in self.conn_of[nid].peer_features for nid in meta_nids):
                return False
            app = self.app
            if app.early_lazy_skip:
                # the last one was refused: contention, where an early vote
                # costs a vote more (and relocks undo it) for nothing
                app.early_lazy_skip -= 1
                return False
        else:
            if len(self.conns) != 1:
                return False
            conn = self.conns[0]
            if meta_nids != [conn.nid] or EARLY_VOTE not in conn.peer_features:
                return False
        pt = self.app.pt
        partitions = {pt.partition(oid) for oid in self.data}
        partitions.add(pt.partition(self.ttid))
        return all(pt.readable_nids(p) == pt.writable_nids(p) for p in partitions)

    def _send_votes(self, meta_nids: list[int], meta: tuple, only: set[int] | None) -> None:
        # a storage that already failed us is not asked again: it is
        # reported with FailedVote
        token = (VOTE, False)
        packet = Packets.AskLazyVote if self._lazy(meta_nids) else Packets.AskStoreTransaction
        for nid in meta_nids:
            if nid not in self.failed and (only is None or nid in only):
                self._send(nid, packet, meta, token)
        for nid in self.involved - set(meta_nids) - self.failed:
            if only is None or nid in only:
                self._send(nid, Packets.AskVoteTransaction, (self.ttid,), token)

    def _lazy(self, meta_nids: list[int]) -> bool:
        """Whether the vote may go as AskLazyVote (feature lazy-vote): every
        store and check went to the storages that get the metadata, several,
        none failed, no pack order.  Whichever of them locks the transaction
        then holds all of it: each may answer before its vote is durable."""
        return (len(meta_nids) > 1 and not self.failed and self.pack is None
                and self.uniform == meta_nids and self.involved == set(meta_nids)
                and all(LAZY_VOTE in self.conn_of[nid].peer_features for nid in meta_nids))

    def _check_master(self) -> None:
        master = self.master
        if master is None or master.closed or master is not self.app.master:
            raise StorageTransactionError(
                "master lost during the commit: the transaction was not committed")

    def finish(self, callback) -> bytes:
        return self.finished(self.send_finish(callback), callback)

    def send_finish(self, callback) -> SimpleQueue:
        """The finish request, sent: ``finished`` waits for its answer (in
        between, a pipelined copy votes its next transaction)."""
        app = self.app
        pt = app.pt
        oids = list(self.data)
        checked = sorted({pt.partition(oid) for oid in self.checked})

        def committed(result, error):
            if error is None:
                app.committed(result[1], self.cache_data, callback)

        # the master died after our vote: nothing was committed, and a new
        # master does not know the transaction
        self._check_master()
        master = self.master
        return master.ask(Packets.AskFinishTransaction, self.ttid, oids, [], checked, self.pack,
                          hook=committed)

    def finished(self, queue: SimpleQueue, callback) -> bytes:
        """The TID the finish sent on ``queue`` got, once the master
        answered; StorageTransactionError if it was not committed."""
        app = self.app
        _, result, error, _ = self.master.wait(queue)
        if isinstance(error, ConnectionClosed):
            # the master went away with our request: it may have committed
            # it or not; find out rather than guess (never both raise and
            # commit)
            tid = self._final_tid()
            if tid is None:
                raise StorageTransactionError(
                    f"tpc_finish failed: master lost ({error}) and the transaction"
                    " was not committed")
            log.warning("%s: master lost during tpc_finish, but %s committed as %s",
                        app.label, self.ttid.hex(), tid.hex())
            app.committed(tid, self.cache_data, callback)
            return tid
        if error is not None:
            raise StorageTransactionError(f"tpc_finish failed: {error}")
        return result[1]

    def _final_tid(self) -> bytes | None:
        return final_tid(self.app, self.ttid)

    def abort(self) -> None:
        app = self.app
        if self.begin_unsent:
            return  # nothing began
        if self.begin_answer is not None:
            try:
                self._answered()
            except (StorageTransactionError, BeginRefused):
                if not self.reserved:
                    return  # no transaction began: nothing to drop
                # the stores that went with the TTID refused are dropped
        if self.ttid is None:
            return  # the begin failed, reported already
        for nid in self.involved:
            conn = app._storages.get(nid)
            if conn is not None and not conn.closed:
                conn.notify(Packets.AbortTransaction, self.ttid, [])
        master = app.master
        if master is not None and not master.closed:
            master.notify(Packets.AbortTransaction, self.ttid, sorted(self.involved))
