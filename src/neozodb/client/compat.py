"""What the client does differently when a node lacks neozodb's features
(``conn.peer_features`` empty: NEO's nodes, see protocol/features.py).

NEO's storages list, describe and undo a transaction (``AskTIDs``,
``AskTransactionInformation``, ``AskObjectUndoSerial``) only once the master
told them to unlock it, which it does *after* telling the committer (and
invalidating the others): right after a commit, a NEO storage may not know
the transaction yet.  neozodb's storages answer for locked transactions
too.  ``UnlockBarrier`` waits, before such reads, until the NEO storages
have unlocked everything the client may show.

NEO's storages keep pack transactions and packed transactions in the undo
log; neozodb's leave out the transactions that carry a pack order and those
before the last history pack.  ``UndoLogPacks`` does that in the client
when storages are NEO's.
"""
from __future__ import annotations

import logging
import threading
import time
from queue import Empty, SimpleQueue
from typing import TYPE_CHECKING

from ZODB.Connection import TransactionMetaData

from neozodb.net.endpoint import ConnectionClosed
from neozodb.net.waiting import wait_any
from neozodb.protocol import MAX_TID, ZERO_TID, Packets

if TYPE_CHECKING:
    from neozodb.client.app import ClientApp

log = logging.getLogger("neozodb.client")

#: The extension key of our pack transactions that holds the pack_tid of
#: their history pack (client/pack.py).
PACK_TID_KEY = "neozodb_pack_tid"
#: Description of every pack transaction (NEO's client writes it too), and
#: of the deletion transactions of a pack with GC on a NEO master.
PACK_DESCRIPTION = b"IStorage.pack"


def has_features(conn) -> bool:
    """Whether a connected node is neozodb's (it notified its features)."""
    return bool(conn.peer_features)


def neo_storages(app: ClientApp) -> bool:
    """Whether a running storage of the partition table is NEO's."""
    pt = app.pt
    for nid in app.running_storages():
        if not pt.partitions_of(nid):
            continue
        try:
            conn = app.storage_conn(nid)
        except (ConnectionClosed, OSError):
            continue
        if not has_features(conn):
            return True
    return False


class UnlockBarrier:
    """Per storage connection, the TID up to which it is known to have
    unlocked every transaction."""

    def __init__(self, app: ClientApp) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._settled: dict[int, tuple[object, bytes]] = {}  # nid -> (conn, tid)

    def wait(self, tid: bytes, timeout: float = 60.0) -> None:
        """Until every running NEO storage has unlocked every transaction
        up to ``tid``.  NEO delays ``AskTIDsFrom`` while a transaction up
        to its ``max_tid`` is locked on the node (any partition of the node
        will do), so one such request per node, pipelined, is the barrier.
        Costs nothing with neozodb's storages, nor when nothing was
        committed since the last barrier."""
        app = self.app
        if tid == ZERO_TID:
            return
        pt = app.pt
        queue: SimpleQueue = SimpleQueue()
        asked = []
        conns = []
        for nid in app.running_storages():
            with self._lock:
                conn, settled = self._settled.get(nid, (None, ZERO_TID))
            if conn is not None and not conn.closed and settled >= tid:
                continue
            partitions = pt.partitions_of(nid)
            if not partitions:
                continue
            try:
                conn = app.storage_conn(nid)
            except (ConnectionClosed, OSError):
                continue  # not readable then: reads go to other replicas
            if has_features(conn):
                with self._lock:
                    self._settled[nid] = conn, MAX_TID
                continue
            conn.ask(Packets.AskTIDsFrom, tid, tid, 1, partitions[0], queue=queue,
                     token=(nid, conn))
            asked.append(nid)
            conns.append(conn)
        deadline = time.monotonic() + timeout
        for _ in asked:
            try:
                (nid, conn), _, error, _ = wait_any(queue, conns,
                                                    max(0, deadline - time.monotonic()))
            except Empty:
                # a commit stuck between lock and unlock: read anyway
                log.warning("%s: storages still locking transactions up to %s after %s s",
                            app.label, tid.hex(), timeout)
                return
            if error is None:
                with self._lock:
                    if self._settled.get(nid, (None, ZERO_TID))[1] < tid:
                        self._settled[nid] = conn, tid

    def forget(self) -> None:
        """After a truncation, TIDs go back: settle again."""
        with self._lock:
            self._settled.clear()


class UndoLogPacks:
    """For one undo log walk, newest first: which transactions to leave
    out.  A pack transaction (described ``IStorage.pack``) is left out, and
    so is every transaction up to the ``pack_tid`` of a history pack, as
    FileStorage's undo log stops at its pack time.  The pack_tid is the
    one our client records in the pack transaction's extension
    (``PACK_TID_KEY``): a pack transaction is newer than its pack_tid, so
    the walk meets it before what it hides.  NEO's client records nothing:
    its packs hide only their own transaction."""

    def __init__(self) -> None:
        self.cut = ZERO_TID  # transactions up to it are hidden

    def hidden(self, tid: bytes, description: bytes, ext: bytes) -> bool:
        if description != PACK_DESCRIPTION:
            return tid <= self.cut
        pack_tid = _pack_tid(ext)
        if pack_tid is not None and pack_tid > self.cut:
            self.cut = pack_tid
        return True

    def past_cut(self, tid: bytes) -> bool:
        """Older transactions are all hidden: the walk may stop."""
        return tid <= self.cut


def _pack_tid(ext: bytes) -> bytes | None:
    if not ext:
        return None
    try:
        value = TransactionMetaData(extension=ext).extension.get(PACK_TID_KEY)
    except Exception:
        return None
    return value if isinstance(value, bytes) and len(value) == 8 else None
