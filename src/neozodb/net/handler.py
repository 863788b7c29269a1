"""What a node's message handlers are made of (net/connection.py
dispatches to them): the dispatch table, and the exceptions a handler
raises to answer a request with an error or to have it replayed later."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from neozodb.protocol import PACKETS, ErrorCodes, ProtocolError
from neozodb.protocol.features import common

if TYPE_CHECKING:
    from neozodb.net.connection import Connection


class HandlerError(Exception):
    """Raised by a handler to answer the request with an Error packet.

    ``close``: close the connection too, once the Error is sent.  It
    defaults to True for ``PROTOCOL_ERROR`` (the peer is confused or does
    not belong to this cluster), False otherwise.
    """

    code = ErrorCodes.DENIED
    close = False

    def __init__(self, message: str, code: ErrorCodes | None = None,
                 close: bool | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        if close is not None:
            self.close = close
        elif self.code is ErrorCodes.PROTOCOL_ERROR:
            self.close = True


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
    #: a request type whose consecutive occurrences in one chunk of
    #: received data are dispatched as a run, after ``prefetch(conn, run)``
    #: saw them all (e.g. a storage looking up the serials of a burst of
    #: stores in one query); None: every message alone
    batched: Any = None

    def prefetch(self, conn: Connection, run: list[tuple[int, Any, tuple]]) -> None:
        """Prepare for a run of ``batched`` requests, not validated yet."""

    def prefetched(self) -> None:
        """The run was dispatched: forget what ``prefetch`` prepared."""

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

    def NotifyFeatures(self, conn: Connection, msg_id: int, features: tuple) -> None:
        # the accepting neozodb peer's features (protocol/features.py)
        conn.peer_features = common(features)

    def FlushLog(self, conn: Connection, msg_id: int) -> None:
        # NEO's `neoctl flush_log` reaches every node, whatever its role,
        # and must not be taken for a protocol error; our log handlers
        # write each record at once, flushing is all there is to do
        for handler in logging.getLogger().handlers:
            handler.flush()
