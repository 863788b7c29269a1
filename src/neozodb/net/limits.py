"""The limits of a server node's connections (the ``Limits`` mixin of
``net.connection.Connection``): what an accepted, not yet identified peer
may send and for how long, how many connections an application accepts,
and how much output a peer that does not read may leave with us.

An accepted connection is anyone until its handler is replaced by the
application's identification code (``conn.handler = ...``; NEO's anonymous
neoctl counts once the admin serves its first request).  Outgoing
connections go to addresses we chose: they start identified.
docs/operations.md ("Limits and failures") gives the values.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import resource
import time
import weakref
from typing import Any

from neozodb.protocol.codec import MAX_MESSAGE_SIZE

log = logging.getLogger("neozodb.net")
_monotonic = time.monotonic


def _env_number(name: str, default: float) -> float:
    """A limit from the environment (tests and operators without a
    command-line option for it); a bad value keeps the default."""
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = float(text)
        if value >= 0 and math.isfinite(value):
            return value
    except ValueError:
        pass
    log.warning("ignoring %s=%r: expected a number >= 0", name, text)
    return default


def _default_max_accepted() -> int:
    # below the descriptor limit: past it, accept() fails and so would the
    # node's own files and outgoing connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1000
    return max(16, min(1000, soft - 100))


# Unread output (bytes) past which a peer is dropped: 4 of the largest
# messages, so that a slow but reading peer never reaches it.
OUTPUT_LIMIT = 4 * MAX_MESSAGE_SIZE
# Write buffer marks: past HIGH, reading from that peer pauses until LOW.
WRITE_HIGH = 256 << 10
WRITE_LOW = 64 << 10


# application -> its live accepted connections (counted in _admit)
_accepted: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_refusals = [0.0, 0]  # when the last refusal was logged, refusals since


def set_identify_timeout(seconds: float) -> None:
    """Seconds an accepted connection has to identify (0: no deadline)."""
    seconds = float(seconds)
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise ValueError(f"invalid identification timeout {seconds!r}")
    Limits.identify_timeout = seconds


def set_max_accepted(count: int) -> None:
    """Most connections an application accepts at a time (0: no cap)."""
    if count < 0:
        raise ValueError(f"invalid connection cap {count!r}")
    Limits.max_accepted = int(count)


class Limits:
    """Admission, identification deadline and output backpressure; the
    state they use is set up by Connection.__init__."""

    # An accepted connection closes if not identified within this many
    # seconds (0: never); see set_identify_timeout.
    identify_timeout = _env_number("NEOZODB_IDENTIFY_TIMEOUT", 20.0)
    # Accepted connections an application keeps at a time (0: no cap).
    max_accepted = int(_env_number("NEOZODB_MAX_CONNECTIONS", _default_max_accepted()))

    @property
    def handler(self) -> Any:
        return self._handler

    @handler.setter
    def handler(self, handler: Any) -> None:
        # Replacing the first handler is how the applications' identification
        # code accepts a peer: the first-message limit and deadline end.
        self._handler = handler
        if not self.identified:
            self.identified = True
            self.endpoint.identified()
            self.cancel_identify_deadline()

    def cancel_identify_deadline(self) -> None:
        """The application keeps an unidentified connection on purpose
        (e.g. a client held until the cluster runs, with its own timeout)."""
        if self._id_timer is not None:
            self._id_timer.cancel()
            self._id_timer = None

    def _identify_expired(self) -> None:
        self._id_timer = None
        if not self.closed and not self.identified:
            self._keepalive_expired(f"not identified after {self.identify_timeout:g} s")

    def _refuse(self, transport: asyncio.BaseTransport, count: int) -> None:
        """Over the cap: drop the connection, logging at most one line a
        second (a flood must not flood the log too)."""
        self.closed = True
        self._reading = False
        self.close_reason = "too many connections"
        self.closed_future.set_result(None)  # the application never saw it
        now = _monotonic()
        _refusals[1] += 1
        if now - _refusals[0] >= 1.0:
            log.warning("%s: refused connection from %s: %d connections already (cap %d)%s",
                        self.app.label, self.peer, count, self.max_accepted,
                        f"; {_refusals[1] - 1} more refused since the last report"
                        if _refusals[1] > 1 else "")
            _refusals[:] = [now, 0]
        transport.abort()

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            _accepted[self.app] -= 1

    def _admit(self, transport: asyncio.BaseTransport) -> bool:
        """connection_made: count an accepted connection (or refuse it over
        the cap) and start its identification deadline."""
        if not self.outgoing:
            count = _accepted.get(self.app, 0)
            if self.max_accepted and count >= self.max_accepted:
                self._refuse(transport, count)
                return False
            _accepted[self.app] = count + 1
            self._counted = True
            if self.identify_timeout > 0:
                self._id_timer = asyncio.get_event_loop().call_later(
                    self.identify_timeout, self._identify_expired)
        try:
            transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)  # type: ignore[attr-defined]
        except (AttributeError, NotImplementedError):
            pass
        return True

    def pause_writing(self) -> None:
        # The peer does not read what we send: stop reading its requests
        # (their answers would pile up here) until its backlog drains.
        transport = self.transport
        if transport is None or self.closed or self._paused or not self._reading:
            return
        self._paused = True
        self._reading = False
        try:
            transport.pause_reading()
        except RuntimeError:  # closing
            pass

    def resume_writing(self) -> None:
        if not self._paused:
            return
        self._paused = False
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._reading = True
        try:
            transport.resume_reading()
        except RuntimeError:
            pass
        # what was decoded but not processed when we paused, then what
        # arrived meanwhile
        backlog, self._backlog = self._backlog, []
        self.data_received(b"")
        for i, data in enumerate(backlog):
            if not self._reading:  # paused again (or closed)
                if self._paused:
                    self._backlog.extend(backlog[i:])
                break
            self.data_received(data)

    def _check_backlog(self) -> None:
        # while paused, what still leaves is notifications (and answers to
        # requests read before the pause): a peer that never reads must not
        # make them pile up without bound
        if not self.closed and self.transport.get_write_buffer_size() > OUTPUT_LIMIT:  # type: ignore[union-attr]
            self._keepalive_expired(f"peer does not read: over {OUTPUT_LIMIT >> 20} MiB unsent")
