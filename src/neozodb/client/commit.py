"""One transaction being committed by the client: pipelined stores to every
cell of each object's partition, conflict resolution at vote, then the vote
and finish round trips.  Answers to the stores arrive on the transaction's
own queue and are processed by the committing thread.  The vote and what
follows it: client/voting.py."""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from queue import SimpleQueue

from ZODB.POSException import ConflictError, ReadConflictError, StorageTransactionError, UndoError

from neozodb.client.begin import Begin
from neozodb.client.compat import has_features
from neozodb.client.voting import CHECK, RELOCK, STORE, VOTE, TwoPhase
from neozodb.net.endpoint import ConnectionClosed, RemoteError
from neozodb.net.waiting import wait_any
from neozodb.protocol import MAX_TID, ZERO_HASH, ZERO_TID, ErrorCodes, Packets, nid_str, p64, u64
from neozodb.protocol.blobs import add_tail
from neozodb.protocol.features import EARLY_LAZY_VOTE, EARLY_VOTE

log = logging.getLogger("neozodb.client")


class Commit(TwoPhase, Begin):
    def __init__(self, app, storage, txn, ttid: bytes | None,
                 compress: Callable[[bytes], tuple[int, bytes, bytes]]) -> None:
        self.app = app
        self.storage = storage  # the ZODB Storage: conflict resolution lives there
        self.txn = txn
        # None until the master's answer to a begin not waited for
        # (``begin_answer``) gives it
        self.ttid = ttid
        self.compress = compress  # deflate.record_compressor's
        self.queue: SimpleQueue = SimpleQueue()
        self.pending = 0  # answers still expected
        self.data: dict[bytes, tuple] = {}  # oid -> (data or None, serial, data_serial)
        self.cache_data: dict[bytes, bytes | None] = {}
        self.blobs: dict[bytes, tuple[bytes, int]] = {}  # oid -> blob (digest, size) stored
        self.uploads = None  # client.blobs.Uploads of its blobs' contents
        self.checked: dict[bytes, bytes] = {}
        self.involved: set[int] = set()
        self.conns: list = []  # connections of the involved storages
        self.conn_of: dict = {}  # nid -> its connection in self.conns
        # the storages every store and check went to, while all went to the
        # same ones (lazy-vote); None: none yet, or not the same
        self.uniform: list[int] | None = None
        self.mixed = False
        self.failed: set[int] = set()
        self.resolved: list[bytes] = []
        self.restored: set[bytes] = set()  # oids stored by restore(): never resolved
        self.blob_files: dict[bytes, str] = {}  # oid -> its blob's file (client/blobs.py)
        self.imposed = False  # begun with a TID of its own (restore, copy): ttid == tid
        # the master's answer to a begin not waited for: read when the TTID
        # is needed or at the vote.  Stores wait in ``deferred`` meanwhile,
        # their cells looked up only after the answer (``_send_store``).
        self.begin_answer: SimpleQueue | None = None
        # the begin not sent yet (feature begin-partition): it leaves at the
        # first store, for a TTID in that object's partition (_send_begin)
        self.begin_unsent = False
        self.deferred: list[tuple] = []
        # begun with a TTID the master reserved for us (feature
        # begin-ahead): the stores go at once
        self.reserved = False
        # while reserved: oid -> the last store sent, to send again if the
        # master refuses the TTID (Begin._begin_again); None: not possible
        self.sent: dict[bytes, tuple] | None = None
        self.conflict_error: Exception | None = None
        self.voted = False
        # every store answered, the vote under way: deadlock notices are
        # ignored from then on (NEO's storage would give the lock of a voted
        # transaction away on AskRelockObject, and both would wait)
        self.stored = False
        # early lazy votes under way (feature early-lazy-vote): a relock
        # undoes the vote of its storage, which is asked again
        self.revocable = False
        self.pack = None  # (oids or None, pack_tid): a pack order (client/pack.py)
        # the master that began the transaction: only it can finish it
        self.master = app.master

    # -- sending -------------------------------------------------------------------
    def _send(self, nid: int, packet, args, token, buffer: bool = False) -> None:
        conn = self.conn_of.get(nid)
        if conn is None:
            try:
                conn = self.app.storage_conn(nid, alive=True)
            except (ConnectionClosed, OSError) as e:
                log.warning("%s: %s unreachable during %s: %s", self.app.label, nid_str(nid),
                            self.ttid.hex(), e)
                self.failed.add(nid)
                return
            self.involve(nid, conn)
        elif conn.closed:
            # the storage dropped the transaction with the connection that
            # carried it (a storage that loses the master closes them all):
            # nothing more goes to it on a new one, as if it held the rest
            if nid not in self.failed:
                log.warning("%s: %s lost during %s", self.app.label, nid_str(nid),
                            self.ttid.hex())
                self.failed.add(nid)
            return
        self.pending += 1
        conn.ask(packet, *args, queue=self.queue, token=token, buffer=buffer)

    def involve(self, nid: int, conn) -> None:
        """A storage that gets something of the transaction (an abort goes
        to each)."""
        if nid not in self.involved:
            self.involved.add(nid)
            self.conns.append(conn)
            self.conn_of[nid] = conn

    def _flush(self) -> None:
        for conn in self.conns:
            conn.flush()

    def _cells(self, oid: bytes) -> list[int]:
        nids = self.app.writable_cells(oid)
        if not nids:
            raise ConflictError(f"no storage for {oid.hex()}", oid=oid)
        return nids

    def store(self, oid: bytes, serial: bytes | None, data: bytes | None,
              data_serial: bytes | None = None, raw: tuple | None = None,
              blob: tuple[bytes, int] | None = None) -> None:
        """``raw``: (compression, stored bytes, checksum) of data as a
        storage already has it (undo), sent as is.  ``blob``: (digest,
        size) of the blob content uploaded for oid (client/blobs.py)."""
        if serial is None:
            serial = ZERO_TID
        self.data[oid] = (data, serial, data_serial)
        self.cache_data[oid] = data
        if data is None:
            compression, stored, checksum = 0, b"", ZERO_HASH
        elif raw is not None:
            compression, stored, checksum = raw
        else:
            compression, stored, checksum = self.compress(data)
            if blob is not None:
                compression, stored = add_tail(compression, stored, *blob)
                checksum = hashlib.sha1(stored).digest()
                self.blobs[oid] = blob
        args = (oid, serial, compression, checksum, stored, data_serial)
        token = (STORE, oid, serial)
        if self.begin_unsent:
            self._send_begin(oid)
        if self.begin_answer is not None and not self.reserved:
            if not self.imposed and self.begin_answer.empty():
                # read it if it came (when no thread reads the master):
                # the stores of a big transaction then leave as they are
                # made, rather than all at the vote
                self.master.alive()
            if self.imposed or self.begin_answer.empty():
                # our TTID is not known yet; or, in a pipelined copy, our
                # TID is not accepted yet and the stores of the transactions
                # begun after us must not reach a storage first: they wait
                # for our vote
                self.deferred.append((args, token))
                return
            self._begun()
        self._send_store(args, token)

    def _send_store(self, args: tuple, token: tuple, buffer: bool = False) -> None:
        if self.sent is not None:
            self.sent[args[0]] = (args, token)
        nids = self.app.writable_cells(args[0])
        if not nids:
            raise ConflictError(f"no storage for {args[0].hex()}", oid=args[0])
        if nids is not self.uniform:
            self._sent_to(nids)
        args += (self.ttid,)
        # The first store leaves at once (its answer comes back while the
        # application goes on), unless the vote may follow it in the same
        # write (early vote: one write, one answer, instead of two); the
        # following ones are batched until vote.
        buffer = buffer or self.pending > 0 or self._alone_on(nids)
        conn_of = self.conn_of
        for nid in nids:
            conn = conn_of.get(nid)
            if buffer and conn is not None and not conn.closed:
                # the common case of _send, a call less per store
                self.pending += 1
                conn.ask_buffered(Packets.AskStoreObject, args, self.queue, token)
            else:
                self._send(nid, Packets.AskStoreObject, args, token, buffer=buffer)

    def _sent_to(self, nids: list[int]) -> None:
        if self.uniform is None and not self.mixed:
            self.uniform = nids
        elif nids != self.uniform:
            self.uniform, self.mixed = None, True

    def _alone_on(self, nids: list[int]) -> bool:
        """Whether the transaction so far, with a store to ``nids``, is on
        one storage that votes early, or on storages that all got all of
        it and vote early with a lazy vote: a cheap guess (``_early``
        decides)."""
        if self.involved - set(nids):
            return False
        storages = self.app._storages
        if len(nids) == 1:
            conn = storages.get(nids[0])
            return conn is not None and EARLY_VOTE in conn.peer_features
        if nids != self.uniform:
            return False
        for nid in nids:
            conn = storages.get(nid)
            if conn is None or EARLY_LAZY_VOTE not in conn.peer_features:
                return False
        return True

    def restore(self, oid: bytes, data: bytes | None, prev_txn: bytes | None,
                base: bytes, blob: tuple[bytes, int] | None = None) -> None:
        """Store a record copied from another database (restore): no
        conflict check.  The storages still compare the serial the store is
        based on with the object's last one, so ``base`` is a guess (the
        serial this client restored last for oid, ZERO_TID if none); if it
        is wrong, the storage answers the right one and the record is sent
        again based on it (``_conflict``), never merged.  ``prev_txn`` (the
        record's back-pointer) goes as data_serial: storages that have that
        revision share its data row; the data is sent anyway for those that
        do not (an OUT_OF_DATE replica) and for the cache."""
        self.restored.add(oid)
        if data is None:
            prev_txn = None
        elif prev_txn is not None and self._revision_gone(oid, prev_txn):
            # packed away on a NEO storage, which refuses a back-pointer to
            # it (ours take the data then): the data alone
            prev_txn = None
        self.store(oid, base, data, prev_txn, blob=blob)

    def _revision_gone(self, oid: bytes, serial: bytes) -> bool:
        """Whether a NEO storage among oid's cells lacks that revision
        (neozodb's are not asked: they take the data sent along)."""
        queue: SimpleQueue = SimpleQueue()
        asked = []
        for nid in self._cells(oid):
            try:
                conn = self.app.storage_conn(nid)
            except (ConnectionClosed, OSError):
                continue
            if has_features(conn):
                continue
            conn.ask(Packets.AskObject, oid, serial, None, queue=queue, token=None)
            asked.append(conn)
        gone = False
        for _ in asked:
            _, _, error, _ = wait_any(queue, asked)
            if isinstance(error, RemoteError) and error.code in (
                    ErrorCodes.OID_NOT_FOUND, ErrorCodes.OID_DOES_NOT_EXIST):
                gone = True
        return gone

    def check_current(self, oid: bytes, serial: bytes) -> None:
        if self.begin_unsent:
            self._send_begin(oid)
        self.known_ttid()
        self.checked[oid] = serial
        self._send_check(oid, serial)

    def _send_check(self, oid: bytes, serial: bytes) -> None:
        nids = self._cells(oid)
        self._sent_to(nids)
        for nid in nids:
            self._send(nid, Packets.AskCheckCurrentSerial, (self.ttid, oid, serial), (CHECK, oid, serial))

    def undo(self, undone_tid: bytes) -> list[bytes]:
        """Store, in this transaction, the undo of transaction undone_tid;
        return the oids it changes.

        The storages tell, per object (AskObjectUndoSerial, one request per
        partition, pipelined), which revision we see now (current_serial),
        which revision holds the data to go back to (undo_serial, None to
        delete the object: its creation is undone) and whether the undone
        revision is still the current state.  If so, the object gets a
        back-pointer to undo_serial (storages reuse that data, they do not
        copy it; the data also goes along, for replicas that miss that
        revision and for conflict resolution).  Otherwise the change is
        merged by conflict resolution (old: undone revision, committed: the
        current one, new: the data before the undone transaction), or
        UndoError is raised."""
        self.sent = None  # what the storages answered holds for this TTID only
        self.known_ttid()
        app = self.app
        pt = app.pt
        with app.lock:
            last_tid = app.last_tid
        app.unlocked.wait(last_tid)  # NEO storages: what we may undo is unlocked
        try:
            info = app.ask_storage(undone_tid, Packets.AskTransactionInformation, undone_tid)
        except RemoteError as e:
            if e.code is ErrorCodes.TID_NOT_FOUND:
                raise UndoError("Invalid undo transaction id") from None
            raise
        oids = info[5]
        if any(oid in self.data for oid in oids):
            # what we stored already must be there (not waiting for a
            # lock) when the storages compare it with the undone revision
            self._process(block=True)
        ltid = p64(u64(last_tid) + 1)
        by_partition: dict[int, list[bytes]] = {}
        for oid in oids:
            by_partition.setdefault(pt.partition(oid), []).append(oid)
        # Storages that failed us may have missed what we stored already
        answers = app.ask_many([(p, Packets.AskObjectUndoSerial, (self.ttid, ltid, undone_tid, o))
                                for p, o in by_partition.items()], exclude=self.failed)
        serials: dict[bytes, tuple] = {}
        for answer, error in answers:
            if error is not None:
                if isinstance(error, RemoteError) and error.code in (
                        ErrorCodes.UNDO_PACK_ERROR, ErrorCodes.OID_NOT_FOUND):
                    raise UndoError("non-undoable transaction") from None
                raise error
            serials.update(answer[0])
        # the data needed, loaded in one pipelined round
        wanted = set()
        for oid, (current, undo_serial, is_current) in serials.items():
            if undo_serial is not None:
                wanted.add((oid, undo_serial))
            if not is_current and current != self.ttid:
                wanted.add((oid, current))
        wanted = sorted(wanted)
        loaded = {}
        for key, (answer, error) in zip(wanted, app.ask_many(
                [(pt.partition(oid), Packets.AskObject, (oid, serial, None))
                 for oid, serial in wanted], check=app._object_data), strict=True):
            if error is not None:
                if isinstance(error, RemoteError) and error.code in (
                        ErrorCodes.OID_NOT_FOUND, ErrorCodes.OID_DOES_NOT_EXIST):
                    raise UndoError("non-undoable transaction", key[0]) from None
                raise error
            (_, _, _, compression, checksum, stored, _), data = answer
            loaded[key] = data, (compression, stored, checksum)
        for oid in oids:
            current, undo_serial, is_current = serials[oid]
            if current == self.ttid:  # we changed it already (another undo)
                current_data, base = self.data[oid][0], self.data[oid][1]
            else:
                current_data, base = loaded.get((oid, current), (None,))[0], current
            undo_data, raw = (None, None) if undo_serial is None else loaded[oid, undo_serial]
            if is_current:
                # as stored, so that a replica that copies it has the very
                # same record as those that share the existing data row
                self.store(oid, base, undo_data, undo_serial, raw)
                continue
            if undo_data is None or current_data is None:
                # deleting a changed object, or changing a deleted one
                raise UndoError("Some data were modified by a later transaction", oid)
            try:
                data = self.storage.tryToResolveConflict(oid, base, undone_tid, undo_data,
                                                         current_data)
            except ConflictError:
                raise UndoError("Some data were modified by a later transaction", oid) from None
            self.store(oid, base, data)
        return list(oids)

    def deadlock(self, conn, oid: bytes) -> None:
        """A storage asks us to release oid, stored or checked (reader
        thread): do it unless the vote began."""
        if not self.stored and (oid in self.data or oid in self.checked):
            self.queue.put(((RELOCK, oid, conn), None, None, conn))

    # -- answers -------------------------------------------------------------------
    def _process(self, block: bool) -> None:
        queue = self.queue
        while self.pending and (block or not queue.empty()):
            if queue.empty():
                self._flush()  # stores (e.g. of a conflict resolution) may wait in buffers
                token, result, error, conn = wait_any(queue, self.conns)
            else:
                # answers already read (a vote drains a thousand of them):
                # no reading turn to take
                token, result, error, conn = queue.get()
            kind = token[0]
            if kind == RELOCK and result is None and error is None and len(token) == 3:
                # a deadlock notice, not an answer: ask the storage to relock
                if self.stored:
                    continue  # queued before the vote began: too late
                oid = token[1]
                if self.revocable:
                    # an early lazy vote there is undone by the relock
                    self.revote.add(conn.nid)
                self.pending += 1
                self.app.relocks += 1
                conn.ask(Packets.AskRelockObject, self.ttid, oid, queue=self.queue,
                         token=(RELOCK, oid, conn, "answer"))
                continue
            self.pending -= 1
            if error is not None:
                if (kind == VOTE and token[1] and isinstance(error, RemoteError)
                        and error.code is ErrorCodes.NOT_READY):
                    self.revote.add(conn.nid)  # an early vote, too early
                    continue
                self._failure(conn, error)
                continue
            if kind == STORE:
                (conflict,) = result
                if conflict is not None and conflict != ZERO_TID:
                    self._conflict(token[1], token[2], conflict)
            elif kind == CHECK:
                (current,) = result
                if current is not None and current != ZERO_TID and self.conflict_error is None:
                    oid = token[1]
                    self.conflict_error = ReadConflictError(oid=oid, serials=(current, token[2]))
            elif kind == RELOCK:
                (answer,) = result
                if answer is not None:
                    serial, conflict, stored = answer
                    oid = token[1]
                    if oid in self.data:
                        self._conflict(oid, serial, conflict)
                    elif self.conflict_error is None:
                        # only checked (readCurrent): changed meanwhile
                        self.conflict_error = ReadConflictError(oid=oid, serials=(conflict, serial))
        if self.conflict_error is not None:
            raise self.conflict_error

    def _failure(self, conn, error: Exception) -> None:
        if isinstance(error, ConnectionClosed):
            self.failed.add(conn.nid)
            return
        if isinstance(error, RemoteError) and error.code is ErrorCodes.NON_READABLE_CELL:
            return
        raise StorageTransactionError(f"storage {conn.label} failed: {error}")

    def _conflict(self, oid: bytes, serial: bytes, conflict: bytes) -> None:
        self.sent = None  # resolved against what the storages had for this TTID
        if self.conflict_error is not None:
            return
        current = self.data.get(oid)
        if current is None or current[1] != serial:
            return  # already re-stored after a newer conflict
        data = current[0]
        if oid in self.restored:
            # restore: the source history is authoritative, the conflict
            # only tells the serial to base the store on (MAX_TID: the
            # storage never had the object)
            self.store(oid, ZERO_TID if conflict == MAX_TID else conflict, data, current[2],
                       blob=self.blobs.get(oid))
            return
        # the transaction it conflicts with may be locked on that storage
        # and not be complete yet: its revision is readable on every
        # replica once it is (app.catch_up)
        self.app.catch_up(conflict)
        try:
            if data is None:
                raise ConflictError(oid=oid, serials=(conflict, serial))
            new = self.storage.tryToResolveConflict(oid, conflict, serial, data)
        except ConflictError as e:
            self.conflict_error = e
            return
        log.debug("%s: resolved conflict on %s", self.app.label, oid.hex())
        if oid not in self.resolved:
            self.resolved.append(oid)
        self.store(oid, conflict, new)
