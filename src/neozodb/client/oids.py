"""The client's pool of new OIDs, asked of the master ahead of need.

ZODB takes a new OID for each new object as it commits it: a commit of a
thousand new objects used to wait for ten ``AskNewOIDs`` of 100, one
round trip each, in the middle of its stores.  The pool asks for the next
batch when half of the current one is used, without waiting for the
answer, which is read when the pool runs out (usually long after it came);
and a client that empties batches quickly (two refills within
``FAST`` seconds) gets bigger ones, doubling up to ``MOST``.  OIDs
given and never used are lost, as when a client exits: harmless, the
space has 2**63 of them.

The pool belongs to the master that gave it: a new primary may not know
those OIDs were given out, and could give them again.  A transaction that
began with the new master finds the pool stale; one that began with the
old one cannot finish.  Not thread-safe: the caller holds a lock.
"""
from __future__ import annotations

import time
from queue import Empty
from typing import Any, Callable

from neozodb.net.endpoint import ConnectionClosed
from neozodb.protocol import Packets

FIRST = 100  # NEO's client asks for 100 at a time, always
MOST = 1000
FAST = 1.0
TIMEOUT = 60.0


class OidPool:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._master: Any = None
        self._oids: list[bytes] = []  # reversed: the next one last
        self._next = None  # the queue of an AskNewOIDs under way
        self.batch = FIRST
        self._refilled: float | None = None
        self.requests = 0  # AskNewOIDs sent (for the tests and benchmarks)

    def take(self, current: Any, get_master: Callable[[], Any]) -> bytes:
        """A new OID; ``current`` is the client's master connection now,
        ``get_master()`` connects to one if there is none."""
        if self._master is not current:
            self._master, self._oids, self._next = None, [], None
            self.batch, self._refilled = FIRST, None
        if not self._oids:
            self._refill(get_master)
        oids = self._oids
        oid = oids.pop()
        if self._next is None and len(oids) < self.batch // 2:
            self.requests += 1
            self._next = self._master.ask(Packets.AskNewOIDs, self.batch)
        return oid

    def _refill(self, get_master: Callable[[], Any]) -> None:
        now = self._clock()
        if self._refilled is not None and now - self._refilled < FAST:
            self.batch = min(self.batch * 2, MOST)
        self._refilled = now
        queue, self._next = self._next, None
        oids = None
        if queue is not None:
            try:
                _, result, error, _ = self._master.wait(queue, TIMEOUT)
            except Empty:
                error = ConnectionClosed("no answer to AskNewOIDs")
            if error is None:
                (oids,) = result
        if not oids:
            # nothing asked ahead, or that request failed: ask and wait
            master = get_master()
            self.requests += 1
            (oids,) = master.call(Packets.AskNewOIDs, self.batch, timeout=TIMEOUT)
            self._master = master
        self._oids = list(reversed(oids))
