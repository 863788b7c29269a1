"""asyncio connections of the server nodes (master, storage, admin).

A ``Connection`` is an ``asyncio.Protocol``: bytes in, decoded messages
dispatched to its current ``Handler``; answers resolve the future (or call
the callback) given when the request was sent.  No Task is created per
message.  Malformed input closes that one connection with a logged reason.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from neozodb.net.endpoint import ConnectionClosed, Endpoint, RemoteError, tune_socket
from neozodb.protocol import PACKETS, ErrorCodes, ProtocolError, nid_str

log = logging.getLogger("neozodb.net")


class HandlerError(Exception):
    """Raised by a handler to answer the request with an Error packet."""

    code = ErrorCodes.DENIED
    close = False

    def __init__(self, message: str, code: ErrorCodes | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class NotReady(HandlerError):
    code = ErrorCodes.NOT_READY
    close = True


class Denied(HandlerError):
    code = ErrorCodes.DENIED


class Delay(Exception):
    """Raised by a handler that cannot process the message yet.

    The application queues it and replays it when its state changes.
    """


class Handler:
    """Dispatch table: a method named after each packet it accepts.

    Methods are called as ``method(conn, msg_id, *args)``.  A packet with no
    method is unexpected: protocol error, the connection closes.
    """

    _table: dict[int, str]

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls._table = {code: p.name for code, p in PACKETS.items() if callable(getattr(cls, p.name, None))}

    def dispatch(self, conn: Connection, msg_id: int, packet: Any, args: tuple) -> None:
        name = self._table.get(packet.code)
        if name is None:
            raise ProtocolError(f"unexpected packet {packet.name}")
        getattr(self, name)(conn, msg_id, *args)

    def connection_lost(self, conn: Connection) -> None:
        pass


class Connection(asyncio.Protocol):
    def __init__(self, app: Any, handler: Handler, outgoing: bool = False) -> None:
        self.app = app
        self.handler = handler
        self.outgoing = outgoing
        self.endpoint = Endpoint()
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.nid: int | None = None
        self.node: Any = None  # the node registry entry once identified
        self.closed = False
        self.close_reason = ""
        self.closed_future: asyncio.Future = asyncio.get_event_loop().create_future()

    def __repr__(self) -> str:
        who = nid_str(self.nid) if self.nid is not None else self.peer
        return f"<{who}>"

    @property
    def label(self) -> str:
        return nid_str(self.nid) if self.nid is not None else self.peer

    # -- asyncio.Protocol ---------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = "%s:%s" % peer[:2]
        tune_socket(transport.get_extra_info("socket"))
        transport.write(self.endpoint.handshake())  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            for msg_id, packet, args in self.endpoint.feed(data):
                if self.closed:
                    return
                if packet.is_answer:
                    self._answer_received(msg_id, packet, args)
                else:
                    self._request_received(msg_id, packet, args)
        except ProtocolError as e:
            self.close(f"protocol error: {e}")

    def _answer_received(self, msg_id: int, packet: Any, args: tuple) -> None:
        token, result, error = self.endpoint.match(msg_id, packet, args)
        if isinstance(token, asyncio.Future):
            if not token.done():
                if error is None:
                    token.set_result(result)
                else:
                    token.set_exception(error)
        elif token is not None:
            token(self, result, error)

    def _request_received(self, msg_id: int, packet: Any, args: tuple) -> None:
        try:
            self.handler.dispatch(self, msg_id, packet, args)
        except HandlerError as e:
            if not packet.answer and not packet.acked:
                log.warning("%s: %s from %s refused: %s", self.app.label, packet.name, self.label, e)
            else:
                self.error(msg_id, e.code, str(e))
            if e.close:
                self.close(str(e), flush=True)
        except ProtocolError:
            raise
        except Exception:
            # A bug in a handler must not take the node down: drop this peer.
            log.exception("%s: error handling %s from %s", self.app.label, packet.name, self.label)
            self.close(f"internal error handling {packet.name}")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self.close_reason = self.close_reason or (str(exc) if exc else "closed by peer")
        self._closed()

    def _closed(self) -> None:
        for token in self.endpoint.fail_pending():
            if isinstance(token, asyncio.Future):
                if not token.done():
                    token.set_exception(ConnectionClosed(self.close_reason))
            elif token is not None:
                token(self, None, ConnectionClosed(self.close_reason))
        if not self.closed_future.done():
            self.closed_future.set_result(None)
            try:
                self.handler.connection_lost(self)
            except Exception:
                log.exception("%s: error handling loss of %s", self.app.label, self.label)

    # -- sending --------------------------------------------------------------
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
        self.transport.write(self.endpoint.request(packet, args, token))  # type: ignore[union-attr]
        return token if callback is None else None

    def notify(self, packet: Any, *args: Any) -> None:
        if not self.closed:
            self.transport.write(self.endpoint.notify(packet, args))  # type: ignore[union-attr]

    def answer(self, msg_id: int, packet: Any, *args: Any) -> None:
        if not self.closed:
            self.transport.write(self.endpoint.answer(msg_id, packet, args))  # type: ignore[union-attr]

    def ack(self, msg_id: int, message: str = "") -> None:
        self.error(msg_id, ErrorCodes.ACK, message)

    def error(self, msg_id: int, code: ErrorCodes, message: str) -> None:
        if not self.closed:
            self.transport.write(self.endpoint.error(msg_id, code, message))  # type: ignore[union-attr]

    def close(self, reason: str = "", flush: bool = False) -> None:
        """Close once, logging why; pending requests fail with ConnectionClosed."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason or "closed"
        if reason:
            log.info("%s: closing connection with %s: %s", self.app.label, self.label, reason)
        if self.transport is not None:
            if flush:
                self.transport.close()
            else:
                self.transport.abort()
        self._closed()


async def connect(app: Any, handler: Handler, address: tuple[str, int]) -> Connection:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: Connection(app, handler, outgoing=True), *address)
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
]
