"""The writes of a storage's clients: stores, readCurrent checks, relocks,
votes and aborts (neo-architecture.md 6.2), a mixin of the client handler.

A transaction belongs to the client connection whose request registered
it here (its first store, check or vote): requests of another client about
it are protocol errors, its aborts are ignored.  Every value is checked
before a lock is taken, and every lock a transaction took is released when
it ends (storage/transactions.py), so a failing request leaves none behind.
With ``--read-only`` every write is refused.
"""
from __future__ import annotations

import hashlib
import logging

from neozodb.net.connection import HandlerError
from neozodb.protocol import (
    MAX_TID,
    ZERO_HASH,
    ZERO_TID,
    CellStates,
    ErrorCodes,
    Packets,
    ProtocolError,
    nid_str,
    p64,
    u64,
)
from neozodb.protocol.blobs import BLOB_FLAG
from neozodb.protocol.features import EARLY_LAZY_VOTE, LAZY_VOTE, SOLO_VOTE
from neozodb.protocol.values import MAX_ID, check_compression, check_id, check_ids
from neozodb.storage.blobs import drop_uploads
from neozodb.storage.pack import is_gc_extension
from neozodb.storage.undo import store_again_ok

log = logging.getLogger("neozodb.storage")


_UNKNOWN = object()
_UP_TO_DATE = CellStates.UP_TO_DATE.value
_PLAIN = (0, 1)  # compression ids of a record without a blob


def _well_formed(args: tuple) -> bool:
    """Whether an AskStoreObject's arguments may be looked at before the
    store checks them (a burst's prefetch)."""
    oid, _, compression, checksum, data = args[:5]
    return (oid.__class__ is bytes and len(oid) == 8 and u64(oid) <= MAX_ID
            and compression.__class__ is int
            and checksum.__class__ is bytes and len(checksum) == 20 and data.__class__ is bytes)


def _current_serial(app, oid: bytes) -> bytes:
    """The serial of oid a change must be based on: that of a transaction
    committing it (locked), else the last committed one; ZERO_TID if it
    never existed here."""
    n = u64(oid)
    last = app.serials.pop(n, _UNKNOWN) if app.serials else _UNKNOWN
    committing = app.locks.current(oid)
    if committing is not None:
        return committing
    if last is _UNKNOWN:
        last = app.backend.last_serial(n)
    return ZERO_TID if last is None else p64(last)


def _conflict_serial(current: bytes) -> bytes:
    # ZERO_TID in an answer means "accepted without lock": a client that
    # names a revision of an object we never had must get a conflict
    return MAX_TID if current == ZERO_TID else current


class Retry:
    """A delayed request, replayed through its connection."""

    __slots__ = ("handler", "conn", "msg_id", "packet", "args")

    def __init__(self, handler, conn, msg_id, packet, args) -> None:
        self.handler, self.conn, self.msg_id, self.packet, self.args = (
            handler, conn, msg_id, packet, args)

    def __call__(self) -> None:
        if not self.conn.closed:
            self.conn._request_received(self.msg_id, self.packet, self.args)

    def __repr__(self) -> str:
        return "<%s from %s oid %s>" % (self.packet.name, self.conn.label,
                                        self.args[0].hex() if self.args else "")


class Writes:
    """ClientHandler's writes (see the module docstring)."""

    def prefetch(self, conn, run) -> None:
        """A burst of stores arrived together (net/connection.py): look up
        the serials of their oids in one backend call (one round trip on a
        database server instead of one per store).  Each is used once, by
        its store's conflict check, within this burst's dispatch: no
        commit can happen in between (unlocks come from the master, in
        another callback), so none can be stale; what is left is forgotten
        after the burst (``prefetched``).

        On a backend with ``batched_data`` (PostgreSQL, MariaDB, SQLite
        without deduplication, from 8 stores on), the data rows of the burst's
        plain stores (not undos, deletions or blobs) are also taken in one
        call, once their checksums are verified; a store that ends up not
        keeping its row (a conflict, a lock wait) leaves it to be released
        after the burst."""
        app = self.app
        backend = app.backend
        stores = [args for _, _, args in run if _well_formed(args)]
        app.serials = backend.last_serials(sorted({u64(args[0]) for args in stores}))
        if not backend.batched_data or len(stores) < backend.batched_data_min:
            return
        items = [(checksum, compression, data, u64(oid))
                 for oid, _, compression, checksum, data, data_serial, _ in stores
                 if data_serial is None and data and compression in _PLAIN
                 and hashlib.sha1(data).digest() == checksum]
        prestored = app.prestored
        for item, data_id in zip(items, backend.store_data_many(items), strict=True):
            prestored.setdefault((item[3], item[0], item[1]), []).append(data_id)

    def prefetched(self) -> None:
        app = self.app
        app.serials = {}
        if app.prestored:
            unused = [data_id for ids in app.prestored.values() for data_id in ids]
            app.prestored = {}
            if unused:
                app.backend.release_data(unused, prune=True)

    def _writable(self, packet) -> None:
        if getattr(self.app, "read_only", False):
            raise HandlerError("%s refused: read-only storage" % packet.name,
                               ErrorCodes.READ_ONLY_ACCESS)

    def _own(self, conn, ttid: bytes, packet):
        """The transaction ``ttid``, which this client started here (its
        first request registered it): another client's is refused."""
        app = self.app
        txn = app.locks.txns.get(ttid)
        if txn is None:
            return app.locks.get(ttid, conn.nid, conn)
        if txn.conn is not conn and (txn.client is None or txn.client != conn.nid):
            log.warning("%s: %s from %s refused: transaction %s belongs to %s", app.label,
                        packet.name, conn.label, ttid.hex(), nid_str(txn.client))
            raise ProtocolError("transaction %s belongs to another client" % ttid.hex())
        return txn

    def AskStoreObject(self, conn, msg_id, oid, serial, compression, checksum, data, data_serial, ttid):
        app = self.app
        self._writable(Packets.AskStoreObject)
        # everything checked before any lock is taken (the decoder made
        # oid and serial 8 bytes, ttid 8 bytes or None): only the top bit
        # is looked at, check_id says what is wrong
        if ttid is None or (oid[0] | serial[0] | ttid[0]) & 0x80:
            check_id(oid, "oid")
            check_id(serial, "serial")
            check_id(ttid, "ttid")
        if data_serial is not None:
            check_id(data_serial, "data serial")
        blob = compression & BLOB_FLAG
        if not (checksum == ZERO_HASH and not data):
            check_compression(compression & ~BLOB_FLAG)
            if len(checksum) != 20 or hashlib.sha1(data).digest() != checksum:
                raise ProtocolError("wrong checksum for %s in %s" % (oid.hex(), ttid.hex()))
        if ttid in app.locks.aborted:
            conn.answer(msg_id, Packets.AnswerStoreObject, ZERO_TID)  # moot: the client aborts
            return
        txn = self._own(conn, ttid, Packets.AskStoreObject)
        if txn.voted:
            raise ProtocolError("store after vote in %s" % ttid.hex())
        if blob:
            self._blob_record(conn, txn, oid, compression, data)
        state = app.cell_state(app.pt.partition(oid))
        if state is None:
            conn.answer(msg_id, Packets.AnswerStoreObject, ZERO_TID)  # not ours: ignored
            return
        if state == CellStates.OUT_OF_DATE.value:
            # our copy is behind: keep the data without locking or checking,
            # the up-to-date replicas decide about conflicts
            self._keep(txn, oid, serial, compression, checksum, data, data_serial,
                       out_of_date=True)
            txn.lockless.add(oid)
            txn.unsettled.discard(oid)
            conn.answer(msg_id, Packets.AnswerStoreObject, ZERO_TID)
            return
        previous = txn.objects.get(oid)
        if previous is not None and oid not in txn.lockless \
                and app.locks.write_locks.get(oid) == ttid:
            # stored again by the same transaction (several undos of one
            # object, a store after an undo): it holds the lock since its
            # first store, nobody committed the object meanwhile
            if not store_again_ok(previous, serial):
                txn.unsettled.add(oid)
                conn.answer(msg_id, Packets.AnswerStoreObject, p64(previous[2]))
                return
        elif not self._lock_current(conn, msg_id, Packets.AskStoreObject, (
                oid, serial, compression, checksum, data, data_serial, ttid),
                ttid, oid, serial, txn.checked, data_serial):
            txn.unsettled.add(oid)
            return
        self._keep(txn, oid, serial, compression, checksum, data, data_serial)
        txn.unsettled.discard(oid)
        conn.answer(msg_id, Packets.AnswerStoreObject, None)

    def _lock_current(self, conn, msg_id, packet, args, ttid, oid, serial, held,
                      data_serial=None) -> bool:
        """Write-lock oid for ttid and check that ``serial`` is current.

        False when the request was delayed (lock taken: replayed later) or
        answered with the conflicting serial; the lock is then kept only if
        the transaction already held it for another reason (``held``)."""
        app = self.app
        holder = app.locks.acquire(ttid, oid, past_locked=True)
        if holder is None and data_serial is not None:
            # a back-pointer may name the revision being committed, whose
            # data the backend finds only once it is unlocked
            holder = app.locks.read_locks.get(oid)
            if holder is not None and oid not in held:
                app.locks.release(ttid, oid)
        if holder is not None:
            self._wait_lock(conn, ttid, oid, holder, msg_id, packet, args)
            return False
        current = _current_serial(app, oid)
        if current != serial:
            if oid not in held:
                app.locks.release(ttid, oid)
                app.replay()  # waiters for this lock may go on
            conn.answer(msg_id, packet.answer, _conflict_serial(current))
            return False
        return True

    def _keep(self, txn, oid, serial, compression, checksum, data, data_serial,
              out_of_date: bool = False):
        backend = self.app.backend
        no_data = checksum == ZERO_HASH and not data
        value_tid = None if data_serial is None else u64(data_serial)
        found = None if value_tid is None else backend.get_revision(u64(oid), tid=value_tid)
        if found is not None and (found[1] is not None or no_data):
            # an undo back to an older revision, or a restored back-pointer:
            # its data row is shared, not copied (the data the client may
            # have sent is for replicas that miss that revision, and for
            # conflict resolution).  The back-pointer is kept as given, even
            # if that revision is a back-pointer itself (a chain restored
            # from another storage): a replica that stores the data sent
            # records the very same value_tid.
            data_id = found[1]
            if data_id is not None:
                backend.hold_data(data_id)
        elif no_data:
            if value_tid is not None:
                log.warning("%s: undo of %s points to %s, which is not here: stored as a"
                            " deletion", self.app.label, oid.hex(), data_serial.hex())
            data_id = None  # deletion, or undone creation
        else:
            taken = self.app.prestored.get((u64(oid), checksum, compression))
            if taken:
                data_id = taken.pop()  # by this burst's prefetch, held for us
            else:
                data_id = backend.store_data(checksum, compression, data, u64(oid))
        if compression & BLOB_FLAG and not no_data:
            self._blob_attach(txn, oid, data_id, out_of_date)
        old = txn.objects.get(oid)
        txn.objects[oid] = (serial, data_id, value_tid)
        # released after the new hold: both may be the same row
        if old is not None and old[1] is not None:
            backend.release_data([old[1]], prune=True)

    def _notify_victim(self, ttid, oid, holder) -> None:
        """An older transaction waits for a younger one that has not voted:
        ask the younger's client to release the lock (deadlock avoidance)."""
        app = self.app
        victim = app.locks.deadlock_victim(ttid, oid, holder)
        if victim is not None:
            conn = victim.conn
            if conn is not None and not conn.closed:
                conn.notify(Packets.NotifyDeadlock, victim.ttid, oid)

    def _wait_lock(self, conn, ttid, oid, holder, msg_id, packet, args):
        app = self.app
        self._notify_victim(ttid, oid, holder)
        # replayed through the connection, so errors are answered as usual
        app.delay(ttid, Retry(self, conn, msg_id, packet, args))

    def AskCheckCurrentSerial(self, conn, msg_id, ttid, oid, serial):
        app = self.app
        self._writable(Packets.AskCheckCurrentSerial)
        check_id(ttid, "ttid")
        check_id(oid, "oid")
        check_id(serial, "serial")
        if ttid in app.locks.aborted:
            conn.answer(msg_id, Packets.AnswerCheckCurrentSerial, ZERO_TID)
            return
        txn = self._own(conn, ttid, Packets.AskCheckCurrentSerial)
        if app.cell_state(app.pt.partition(oid)) in (None, CellStates.OUT_OF_DATE.value):
            # not ours, or our copy is behind: up-to-date replicas decide
            conn.answer(msg_id, Packets.AnswerCheckCurrentSerial, ZERO_TID)
            return
        if not self._lock_current(conn, msg_id, Packets.AskCheckCurrentSerial,
                                  (ttid, oid, serial), ttid, oid, serial, txn.objects):
            txn.unsettled.add(oid)
            return
        if oid not in txn.objects:  # a store of it may still be unsettled
            txn.unsettled.discard(oid)
        txn.checked[oid] = serial
        conn.answer(msg_id, Packets.AnswerCheckCurrentSerial, None)

    def AskRelockObject(self, conn, msg_id, ttid, oid):
        """Give oid's lock (a store's or a readCurrent check's) to the older
        transaction waiting for it, then take it again: answered None if
        what the transaction stored or checked is still based on the
        current revision, else (serial, current, data stored or None)."""
        app = self.app
        txn = app.locks.txns.get(ttid)
        if txn is None or (txn.voted and not txn.revocable) or txn.locked \
                or (oid not in txn.objects and oid not in txn.checked):
            conn.answer(msg_id, Packets.AnswerRelockObject, None)
            return
        self._own(conn, ttid, Packets.AskRelockObject)
        if txn.voted:
            self._unvote(txn)
        app.locks.release(ttid, oid)
        txn.unsettled.add(oid)  # until relocked: no vote without its lock
        app.replay()  # let the older transaction take it

        def relock():
            if conn.closed or ttid not in app.locks.txns:
                return
            holder = app.locks.acquire(ttid, oid, past_locked=True)
            if holder is not None:
                # a younger transaction may have taken it meanwhile: it must
                # be asked to step back too, or both wait forever
                self._notify_victim(ttid, oid, holder)
                app.delay(ttid, relock)
                return
            stored_here = oid in txn.objects
            if stored_here:
                serial, data_id, data_serial = txn.objects[oid]
            else:
                serial, data_id = txn.checked[oid], None
            current = _current_serial(app, oid)
            if current == serial:
                txn.unsettled.discard(oid)
                conn.answer(msg_id, Packets.AnswerRelockObject, None)
                return
            # somebody committed meanwhile: give the client back its data to
            # resolve (a check: it failed)
            if stored_here:
                del txn.objects[oid]
            else:
                del txn.checked[oid]
            app.locks.release(ttid, oid)
            app.replay()
            stored = None
            if data_id is not None:
                checksum, compression, data = app.backend.load_data(data_id)
                app.backend.release_data([data_id], prune=True)
                stored = (compression, checksum, data)
            conn.answer(msg_id, Packets.AnswerRelockObject,
                        (serial, _conflict_serial(current), stored))

        app.delay(ttid, relock)
        app.replay()

    def _unvote(self, txn) -> None:
        """Undo an early lazy vote whose lock is asked back: its rows go,
        its data rows stay held for its objects, and it must vote again
        (stores may come first: a relock may end in a conflict)."""
        backend = self.app.backend
        for _, data_id, _ in txn.objects.values():
            if data_id is not None:
                backend.hold_data(data_id)
        backend.abort_transaction(u64(txn.ttid))
        self.app.pending_written()
        txn.voted = txn.revocable = False

    def _vote(self, txn, meta, pack=None, durable: bool = True) -> None:
        if txn.ttid in self.app.locks.aborted:
            raise HandlerError("transaction %s was aborted" % txn.ttid.hex(), ErrorCodes.DENIED)
        if txn.unsettled:
            # an early vote (feature early-vote: sent with the stores,
            # before their answers) that came too early, or a client voting
            # without the objects it did not get: nothing voted, the
            # client may settle them and vote again
            raise HandlerError("%d objects of %s not settled (%s...)" % (
                len(txn.unsettled), txn.ttid.hex(), min(txn.unsettled).hex()),
                ErrorCodes.NOT_READY)
        objects = [(u64(oid), data_id, data_serial)
                   for oid, (_, data_id, data_serial) in txn.objects.items()]
        backend = self.app.backend
        if txn.uploads:  # contents whose record was never stored
            drop_uploads(backend, txn)
        with backend.sync_later():
            backend.store_transaction(u64(txn.ttid), objects, meta, pack, durable)
        txn.voted = True
        txn.revocable = False

    def AskStoreTransaction(self, conn, msg_id, ttid, user, description, ext, oids, pack):
        self._store_transaction(conn, Packets.AskStoreTransaction, ttid, user, description,
                                ext, oids, pack)
        self.app.group_sync.answer_on(conn, msg_id, Packets.AnswerStoreTransaction)

    def AskSoloVote(self, conn, msg_id, ttid, user, description, ext, oids, pack):
        """The vote of a transaction the client sent to us alone (feature
        solo-vote): no other storage can lock it, so nothing of it has to
        be durable before our lock, whose sync covers this vote's writes.
        Unless our partition table shows another cell where it writes."""
        if SOLO_VOTE not in conn.peer_features:
            raise ProtocolError("unexpected AskSoloVote")
        pt, nid = self.app.pt, self.app.nid
        check_id(ttid, "ttid")
        check_ids(oids, "oid")
        solo = all(pt.sole(pt.partition(oid), nid) for oid in (ttid, *oids))
        self._unsynced_vote(conn, msg_id, Packets.AskSoloVote, Packets.AnswerSoloVote, solo,
                            ttid, user, description, ext, oids, pack)

    def AskLazyVote(self, conn, msg_id, ttid, user, description, ext, oids, pack):
        """The vote of a transaction the client sent whole to each of its
        storages (feature lazy-vote): whichever locks it first holds all of
        it, so this vote need not be durable before our own lock, if the
        master outdates a storage that lost it (its verification, same
        feature) and every cell where it writes is UP_TO_DATE (so that one
        that lost it is never the last readable copy)."""
        if LAZY_VOTE not in conn.peer_features:
            raise ProtocolError("unexpected AskLazyVote")
        app = self.app
        pt, nid, master = app.pt, app.nid, app.master_conn
        check_id(ttid, "ttid")
        check_ids(oids, "oid")
        lazy = (pack is None and master is not None and LAZY_VOTE in master.peer_features
                and all(pt.state_of(p, nid) == _UP_TO_DATE
                        and all(state == _UP_TO_DATE for _, state in pt.cells(p))
                        for p in {pt.partition(oid) for oid in (ttid, *oids)}))
        self._unsynced_vote(conn, msg_id, Packets.AskLazyVote, Packets.AnswerLazyVote, lazy,
                            ttid, user, description, ext, oids, pack)
        if EARLY_LAZY_VOTE in conn.peer_features:
            # maybe sent with the stores, while they wait for a lock on
            # another storage: a deadlock may still need our locks back
            app.locks.txns[ttid].revocable = True

    def _unsynced_vote(self, conn, msg_id, packet, answer, unsynced: bool, ttid, user,
                       description, ext, oids, pack) -> None:
        # unsynced: not even committed (the lock commits it with its own
        # rows, each page written once; a big one is written meanwhile)
        self._store_transaction(conn, packet, ttid, user, description, ext, oids, pack,
                                durable=not unsynced)
        if unsynced:
            self.app.pending_written(len(oids))
            conn.answer(msg_id, answer)
        else:
            self.app.group_sync.answer_on(conn, msg_id, answer)

    def _store_transaction(self, conn, packet, ttid, user, description, ext, oids, pack,
                           durable: bool = True):
        self._writable(packet)
        check_id(ttid, "ttid")
        check_ids(oids, "oid")
        if pack is not None:
            check_ids(pack[0] or (), "oid")
            check_id(pack[1], "pack TID")
        if ttid in self.app.locks.aborted:
            raise HandlerError("transaction %s was aborted" % ttid.hex(), ErrorCodes.DENIED)
        txn = self._own(conn, ttid, packet)
        request = None
        if pack is not None:
            pack_oids, pack_tid = pack
            # the GC mark is ours: without it, NEO's meaning (history of
            # the listed oids, or of all)
            gc = pack_oids is not None and is_gc_extension(ext)
            request = (pack_oids is not None and not gc,
                       None if pack_oids is None else [u64(o) for o in pack_oids],
                       u64(pack_tid), gc)
        self._vote(txn, ([u64(o) for o in oids], user, description, ext, False), request,
                   durable)

    def AskVoteTransaction(self, conn, msg_id, ttid):
        self._writable(Packets.AskVoteTransaction)
        check_id(ttid, "ttid")
        if ttid in self.app.locks.aborted:
            raise HandlerError("transaction %s was aborted" % ttid.hex(), ErrorCodes.DENIED)
        txn = self._own(conn, ttid, Packets.AskVoteTransaction)
        self._vote(txn, None)
        self.app.group_sync.answer_on(conn, msg_id, Packets.AnswerVoteTransaction)

    def AbortTransaction(self, conn, msg_id, ttid, nids):
        app = self.app
        txn = app.locks.txns.get(ttid)
        if txn is None:
            return  # nothing of it here (nor anything to mark: it is not this client's to say)
        try:
            self._own(conn, ttid, Packets.AbortTransaction)
        except ProtocolError:
            return  # a notification: the owner's transaction goes on
        app.abort(ttid)
