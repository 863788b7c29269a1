"""Group commit: answers that may leave only once the disk has what they
acknowledge.

A vote (AskStoreTransaction, AskVoteTransaction) and a lock
(AskLockInformation) are durable points: their answer says "this is on
disk".  Their handlers commit inside ``backend.sync_later()`` and hand the
answer to ``GroupSync.answer``.  At the end of the loop iteration, after
every request read in that iteration was handled, one ``backend.sync()``
makes all of them durable and the answers go out, so N clients committing
at once share one fdatasync instead of queueing behind N.  A backend that
cannot defer its syncs (``defers_sync`` false) is durable at each commit:
answers then go at once.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger("neozodb.storage")


class GroupSync:
    def __init__(self, backend, label: Callable[[], str],
                 failed: Callable[[BaseException], None]) -> None:
        self.backend = backend
        self.label = label
        self.failed = failed  # the sync failed: the node must stop
        self.waiting: list[tuple[Callable, tuple]] = []
        self.held: set = set()  # connections whose output waits for the sync
        self.scheduled = False
        self.syncs = 0     # syncs made, and durable points they covered (logged)
        self.covered = 0

    def answer_on(self, conn, msg_id: int, packet, *args) -> None:
        """``conn.answer(msg_id, packet, *args)`` once durable; until then
        conn's other output waits too, so that it all leaves in one write
        (the answer to the stores sent with a vote, and the vote's)."""
        if not self.waiting and not self.backend.unsynced:
            conn.answer(msg_id, packet, *args)
            return
        if conn not in self.held:
            self.held.add(conn)
            conn.hold()
        self.answer(conn.answer, msg_id, packet, *args)

    def answer(self, send: Callable, *args) -> None:
        """Call ``send(*args)`` once what was committed so far is durable
        (at once if nothing waits for the disk: answers that only read, such
        as AskFinalTID, must not tell of a lock before it is durable)."""
        if not self.waiting and not self.backend.unsynced:
            send(*args)  # nothing committed waits for the disk
            return
        self.waiting.append((send, args))
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        batch, self.waiting = self.waiting, []
        held, self.held = self.held, set()
        if not batch:
            return
        try:
            self.backend.sync()
        except Exception as e:
            # what the answers would acknowledge may not be on disk: none
            # of them goes out
            log.error("%s: cannot sync the database (%s: %s): %d durable points not"
                      " acknowledged", self.label(), type(e).__name__, e, len(batch))
            self.failed(e)
            return
        self.syncs += 1
        self.covered += len(batch)
        for send, args in batch:
            send(*args)
        for conn in held:
            conn.release()
