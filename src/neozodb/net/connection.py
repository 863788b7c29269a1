"""asyncio connections of the server nodes (master, storage, admin).

A ``Connection`` is an ``asyncio.Protocol``: bytes in, decoded messages
dispatched to its current ``Handler``; answers resolve the future (or call
the callback) given when the request was sent.  No Task is created per
message.

Closing (neo-architecture.md 3.1):

- ``close(reason)``: abort now, unsent output is lost.
- ``close(reason, flush=True)``: the graceful close.  Queued output is sent,
  then our sending side is shut (EOF) and what the peer still sends is read
  until it closes (at most ``linger`` seconds): answers and notifications
  are processed, requests are dropped unless the catalogue marks them not
  ``ignorable`` (their answers cannot be sent any more).
- Malformed or unexpected input, and a handler refusing with ``NotReady``
  or ``PROTOCOL_ERROR``: the Error answer is sent, nothing more is read,
  queued output is flushed, then the connection closes.

Keep-alive: TCP says nothing when the peer's process hangs (SIGSTOP, a
stuck machine whose kernel still acknowledges).  A connection that has
received nothing for half of ``keepalive`` seconds sends ``Ping``; if it
then receives nothing at all (any data counts, not only the ``Pong``) for
the other half, it closes like any lost connection: pending requests fail
with ``ConnectionClosed``, the handler's ``connection_lost`` runs.  The
default is process-wide (``set_keepalive``, the nodes' ``--keepalive``).

Limits (net/limits.py, docs/operations.md "Limits and failures"): an accepted connection is anyone
until its handler is replaced by the application's identification code
(``conn.handler = ...``; NEO's anonymous neoctl counts once the admin
serves it).  Until then it may send ``FIRST_BYTES_LIMIT`` bytes in all and
must identify within ``identify_timeout`` seconds; an application accepts
at most ``max_accepted`` connections at a time.  Output to a peer that
does not read is bounded: past the transport's high-water mark we stop
reading from that peer (its requests wait in its kernel buffers) until its
answers drain, and a peer whose unread output exceeds ``OUTPUT_LIMIT``
(notifications keep coming even when we stop reading) is dropped.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from neozodb.net.endpoint import ConnectionClosed, Endpoint, RemoteError, tune_socket
from neozodb.net.handler import Delay, Denied, Handler, HandlerError, NotReady
from neozodb.net.limits import Limits, set_identify_timeout, set_max_accepted
from neozodb.net.output import Output
from neozodb.net.threaded import DEFAULT_KEEPALIVE
from neozodb.protocol import HANDSHAKE, ErrorCodes, Packets, ProtocolError, nid_str
from neozodb.protocol.codec import FIRST_BYTES_LIMIT
from neozodb.protocol.features import NO_FEATURES

log = logging.getLogger("neozodb.net")

_HANDSHAKE_LEN = len(HANDSHAKE)
_PING = Packets.Ping
_monotonic = time.monotonic

# Keep-alive of the connections created from now on (seconds; 0: none).
_keepalive = DEFAULT_KEEPALIVE


def set_keepalive(seconds: float) -> None:
    """Set the keep-alive of the connections created from now on: a
    connection silent for ``seconds / 2`` pings its peer, and one silent
    for ``seconds`` is closed.  0 disables it."""
    global _keepalive
    seconds = float(seconds)
    if not (seconds >= 0 and math.isfinite(seconds)):
        raise ValueError(f"invalid keep-alive {seconds!r}: expected seconds >= 0")
    _keepalive = seconds


def get_keepalive() -> float:
    return _keepalive


def _ignore_answer(conn: Any, result: Any, error: Any) -> None:
    """Callback of keep-alive Pings: receiving anything was the point."""


class Connection(Output, Limits, asyncio.Protocol):
    # Longest wait for the peer to close after a graceful close, and for
    # output to drain after any flushing close, before aborting.
    linger = 10.0
    def __init__(self, app: Any, handler: Handler, outgoing: bool = False,
                 keepalive: float | None = None) -> None:
        self.app = app
        self._handler = handler
        self.outgoing = outgoing
        # We chose to connect to an outgoing connection's peer: it is
        # trusted as much as the address it came from.
        self.identified = outgoing
        self.endpoint = Endpoint(None if outgoing else FIRST_BYTES_LIMIT)
        self._counted = False  # in _accepted[app]
        self._id_timer: asyncio.TimerHandle | None = None
        # Reading paused because the peer does not read (pause_writing):
        # _reading is False meanwhile, which stops data_received's loop
        # between two messages at no cost; the rest stays in the decoder
        # (and _backlog) until resume_writing.
        self._paused = False
        self._backlog: list[bytes] = []
        self._out_size = 0  # bytes in _out
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.nid: int | None = None
        self.node: Any = None  # the node registry entry once identified
        # extensions both ends have (protocol/features.py); none with NEO
        self.peer_features: frozenset[bytes] = NO_FEATURES
        # True as soon as a close is requested (by us or the peer): nothing
        # more is sent.  Received data may still be processed, see close().
        self.closed = False
        self.close_reason = ""
        # resolved when the connection is gone for the application (pending
        # requests failed, handler.connection_lost() called)
        self.closed_future: asyncio.Future = asyncio.get_event_loop().create_future()
        self._reading = True  # received data is processed
        self._head = b""      # first bytes received: did the handshake pass?
        self._timer: asyncio.TimerHandle | None = None
        # While a chunk of received data is processed, output to this peer is
        # held and leaves in one transport.write (one syscall): e.g. the
        # answers to a burst of pipelined stores.
        self._out: list[bytes] = []
        self._corked = False
        self._held = False  # hold(): output kept past the chunk, until release()
        self._soon: list[bytes] | None = None  # notify_soon(), not sent yet
        self._soon_timer: asyncio.TimerHandle | None = None
        # Keep-alive (see the module docstring): one timer, re-armed from the
        # _last_received stamp, which is all that receiving data costs.
        self.keepalive = _keepalive if keepalive is None else keepalive
        self._last_received = 0.0
        self._ping_sent = 0.0  # when the Ping waiting for a sign of life left
        self.went_silent = False  # closed by the keep-alive (last_received says since when)
        self._ka_timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<{self.label}>"

    @property
    def label(self) -> str:
        return nid_str(self.nid) if self.nid is not None else self.peer

    @property
    def last_received(self) -> float:
        """When something was last received (time.monotonic())."""
        return self._last_received

    def _who(self) -> str:
        """The peer, for the close log line: its id and its address."""
        return self.peer if self.nid is None else f"{nid_str(self.nid)} ({self.peer})"

    # -- asyncio.Protocol ---------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = "%s:%s" % peer[:2]
        if not self._admit(transport):
            return
        tune_socket(transport.get_extra_info("socket"))
        transport.write(self.endpoint.handshake())  # type: ignore[union-attr]
        if self.keepalive > 0 and not self.closed:
            self._last_received = _monotonic()
            self._ka_timer = asyncio.get_event_loop().call_later(
                self.keepalive / 2, self._keepalive_check)

    def data_received(self, data: bytes) -> None:
        if not self._reading:
            if self._paused and data:  # in flight when we paused: kept in order
                self._backlog.append(data)
            return
        self._last_received = _monotonic()
        if len(self._head) < _HANDSHAKE_LEN:
            self._head += data[:_HANDSHAKE_LEN - len(self._head)]
        self._corked = True
        batched = self._handler.batched
        run: list | None = None  # consecutive ``batched`` requests, decoded
        try:
            for msg_id, packet, args in self.endpoint.feed(data):
                if packet is batched:
                    if run is None:
                        run = []
                    run.append((msg_id, packet, args))
                    continue
                if run is not None:
                    # decoded already: dispatched even if reading paused
                    # meanwhile (at most one chunk of data more)
                    run = self._dispatch_run(run)
                if packet.is_answer:
                    self._answer_received(msg_id, packet, args)
                else:
                    self._request_received(msg_id, packet, args)
                if not self._reading:
                    return
        except ProtocolError as e:
            if run is not None:  # the valid requests before the bad one
                run = self._dispatch_run(run)
            # Undecodable input: msg_id 0 for the Error; after a failed
            # handshake the peer does not speak this protocol at all.
            self._flush_out()
            self._protocol_error(str(e), 0 if self._head == HANDSHAKE else None)
        finally:
            if run is not None:
                self._dispatch_run(run)
            if self._corked and not self._held:
                self._flush_out()

    def _dispatch_run(self, run: list[tuple[int, Any, tuple]]) -> None:
        handler = self._handler
        if len(run) > 1:
            try:
                handler.prefetch(self, run)
            except Exception as e:  # e.g. the database: as the first request would
                self._internal_error(run[0][1], e)
                return None
        try:
            for msg_id, packet, args in run:
                self._request_received(msg_id, packet, args)
        finally:
            try:
                handler.prefetched()
            except Exception as e:
                self._internal_error(run[0][1], e)
        return None

    def _answer_received(self, msg_id: int, packet: Any, args: tuple) -> None:
        endpoint = self.endpoint
        entry = endpoint.pending.get(msg_id)
        try:
            token, result, error = endpoint.match(msg_id, packet, args)
        except ProtocolError as e:
            if entry is not None and msg_id not in endpoint.pending:
                endpoint.pending[msg_id] = entry  # failed with the others
            self._protocol_error(str(e), msg_id)
            return
        if isinstance(token, asyncio.Future):
            if not token.done():
                if error is None:
                    token.set_result(result)
                else:
                    token.set_exception(error)
        elif token is not None:
            try:
                token(self, result, error)
            except Exception as e:
                self._internal_error(packet, e)

    def _request_received(self, msg_id: int, packet: Any, args: tuple) -> None:
        """Dispatch a request or notification (also used to replay delayed ones)."""
        if self.closed and packet.ignorable:
            log.debug("%s: %s from %s dropped: connection closed",
                      self.app.label, packet.name, self.label)
            return
        try:
            self._handler.dispatch(self, msg_id, packet, args)
        except HandlerError as e:
            if packet.is_request:
                self.error(msg_id, e.code, str(e))
            else:
                log.warning("%s: %s from %s refused: %s", self.app.label, packet.name, self.label, e)
            if e.close:
                self._shutdown(str(e), logging.INFO)
        except ProtocolError as e:
            self._protocol_error(str(e), msg_id)
        except Exception as e:
            self._internal_error(packet, e)

    def _internal_error(self, packet: Any, exc: Exception) -> None:
        """A handler raised.  The application decides first (``fatal_error``:
        e.g. a storage's database failing to write stops the node); a bug in
        a handler must not take the node down: drop this peer."""
        fatal = getattr(self.app, "fatal_error", None)
        if fatal is not None and fatal(exc, f"{packet.name} from {self.label}"):
            return
        log.exception("%s: error handling %s from %s", self.app.label, packet.name, self.label)
        self.close(f"internal error handling {packet.name}")

    def _protocol_error(self, reason: str, msg_id: int | None) -> None:
        """The peer sent something malformed or unexpected: tell it why (best
        effort, with the offending message's id) and close."""
        if msg_id is not None:
            self.error(msg_id, ErrorCodes.PROTOCOL_ERROR, reason)
        self._shutdown(f"protocol error: {reason}", logging.WARNING)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._stop_keepalive()
        self._reading = False
        if not self.closed:
            self.closed = True
            self.close_reason = self.close_reason or (str(exc) if exc else "closed by peer")
        self._closed()

    def _closed(self) -> None:
        """The connection is gone for the application (idempotent)."""
        self._take_soon()
        self._uncount()
        self.cancel_identify_deadline()
        for token in self.endpoint.fail_pending():
            if isinstance(token, asyncio.Future):
                if not token.done():
                    token.set_exception(ConnectionClosed(self.close_reason))
            elif token is not None:
                try:
                    token(self, None, ConnectionClosed(self.close_reason))
                except Exception:
                    log.exception("%s: error handling loss of %s", self.app.label, self.label)
        if not self.closed_future.done():
            self.closed_future.set_result(None)
            try:
                self._handler.connection_lost(self)
            except Exception:
                log.exception("%s: error handling loss of %s", self.app.label, self.label)

    # -- sending (the rest: net/output.py) ----------------------------------------
    def ask(self, packet: Any, *args: Any, callback: Callable | None = None) -> asyncio.Future | None:
        """Send a request.  Without callback, return a future of the answer."""
        token: Any = callback
        if callback is None:
            token = asyncio.get_event_loop().create_future()
        if self.closed:
            err = ConnectionClosed(self.close_reason or "closed")
            if callback is None:
                token.set_exception(err)
            else:
                callback(self, None, err)
            return token if callback is None else None
        self._write(self.endpoint.request(packet, args, token))
        return token if callback is None else None

    def notify(self, packet: Any, *args: Any) -> None:
        if not self.closed:
            self._write(self.endpoint.notify(packet, args))

    def answer(self, msg_id: int, packet: Any, *args: Any) -> None:
        if not self.closed:
            self._write(self.endpoint.answer(msg_id, packet, args))

    def ack(self, msg_id: int, message: str = "") -> None:
        self.error(msg_id, ErrorCodes.ACK, message)

    def error(self, msg_id: int, code: ErrorCodes, message: str) -> None:
        if not self.closed:
            self._write(self.endpoint.error(msg_id, code, message))

    # -- closing ----------------------------------------------------------------
    def close(self, reason: str = "", flush: bool = False) -> None:
        """Close once, logging why.

        Without ``flush``: abort; pending requests fail with ConnectionClosed
        now.  With ``flush``: queued output is sent, then an EOF; until the
        peer closes (or ``linger`` expires), received answers resolve their
        requests, notifications and non-ignorable requests are dispatched,
        other requests are dropped.  Pending requests fail, and the handler
        learns of the loss, when the connection is really gone.  Without EOF
        support (TLS), a flushing close stops reading at once.
        """
        transport = self.transport
        if self.closed:
            if not flush and (self._reading or self._paused) and transport is not None:
                self._abort()  # hurry a graceful close
            return
        if flush and self._soon is not None:
            self._write(b"")
        self.closed = True
        self.close_reason = reason or "closed"
        self._stop_keepalive()
        if reason:
            log.info("%s: closing connection with %s: %s", self.app.label, self._who(), reason)
        if transport is None:
            self._reading = False
            self._closed()
        elif not flush:
            self._abort()
        elif _can_write_eof(transport):
            self._flush_out()
            try:
                transport.write_eof()
            except OSError:  # the peer is already gone: nothing to flush to
                self._abort()
                return
            self._arm_timer()
        else:
            self._stop(transport)

    def _shutdown(self, reason: str, level: int) -> None:
        """Stop reading, flush queued output, close; the application learns
        of the loss now.  Logs one line."""
        if self.closed and not (self._reading or self._paused):
            return
        if not self.closed:
            self.closed = True
            self.close_reason = reason
        log.log(level, "%s: closing connection with %s: %s", self.app.label, self._who(), reason)
        if self.transport is None:
            self._reading = False
            self._closed()
        else:
            self._stop(self.transport)

    def _stop(self, transport: asyncio.Transport) -> None:
        self._reading = self._paused = False
        self._stop_keepalive()
        self._flush_out()
        transport.close()
        self._arm_timer()
        self._closed()

    def _abort(self) -> None:
        self._out.clear()  # nothing more leaves an aborted connection
        self._out_size = 0
        self._corked = False
        self._reading = self._paused = False
        self._cancel_timer()
        self._stop_keepalive()
        self.transport.abort()  # type: ignore[union-attr]
        self._closed()

    def _arm_timer(self) -> None:
        if self._timer is None:
            self._timer = asyncio.get_event_loop().call_later(self.linger, self._linger_expired)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _linger_expired(self) -> None:
        self._timer = None
        log.info("%s: aborting connection with %s: still open %ss after close",
                 self.app.label, self._who(), self.linger)
        self._abort()

    # -- keep-alive ---------------------------------------------------------------
    def _keepalive_check(self) -> None:
        """Timer: ping a peer silent for half the keep-alive, close one
        silent for the other half after the Ping."""
        self._ka_timer = None
        if self.closed:
            return
        half = self.keepalive / 2
        now = _monotonic()
        sent = self._ping_sent
        if sent and self._last_received <= sent:  # nothing since the Ping
            if now - sent >= half:
                if self._head == HANDSHAKE:
                    reason = f"no answer to keep-alive for {half:g} s"
                else:
                    reason = f"no handshake after {self.keepalive:g} s"
                self._keepalive_expired(reason)
                return
            delay = sent + half - now
        else:
            self._ping_sent = 0.0
            delay = self._last_received + half - now
            if delay <= 0:
                # Silent for half the keep-alive.  No Ping before the peer's
                # handshake: the timeout alone decides then.
                self._ping_sent = now
                if self._head == HANDSHAKE:
                    self.ask(_PING, callback=_ignore_answer)
                delay = half
        self._ka_timer = asyncio.get_event_loop().call_later(delay, self._keepalive_check)

    def _keepalive_expired(self, reason: str) -> None:
        log.warning("%s: closing connection with %s: %s", self.app.label, self._who(), reason)
        self.went_silent = True
        self.closed = True
        self.close_reason = reason
        self._abort()

    def _stop_keepalive(self) -> None:
        if self._ka_timer is not None:
            self._ka_timer.cancel()
            self._ka_timer = None


def _can_write_eof(transport: Any) -> bool:
    try:
        return bool(transport.can_write_eof())
    except (AttributeError, NotImplementedError):
        return False


async def connect(app: Any, handler: Handler, address: tuple[str, int]) -> Connection:
    """Connect to a node; over TLS when ``app.tls`` is set (the handshake
    is part of connecting: a peer refusing our certificate, or whose
    certificate we refuse, is an ``OSError`` like an unreachable one)."""
    loop = asyncio.get_running_loop()
    tls = getattr(app, "tls", None)
    kw: dict[str, Any] = {}
    if tls is not None:
        # no host name check: the cluster's CA is the authentication
        kw = {"ssl": tls.client, "server_hostname": "", "ssl_handshake_timeout": 10.0}
    _, conn = await loop.create_connection(lambda: Connection(app, handler, outgoing=True),
                                           *address, **kw)
    conn.peer = "%s:%s" % address
    return conn


__all__ = [
    "Connection",
    "ConnectionClosed",
    "Delay",
    "Denied",
    "Handler",
    "HandlerError",
    "NotReady",
    "RemoteError",
    "connect",
    "get_keepalive",
    "set_identify_timeout",
    "set_keepalive",
    "set_max_accepted",
]
