"""The pure half of a NEO connection: handshake, framing, request matching.

An ``Endpoint`` turns received bytes into decoded messages and produces the
bytes to send; it owns the msg_id counter and the table of requests waiting
for an answer.  It does no I/O, so both the asyncio connection of the server
nodes and the client's threaded socket use it unchanged.  It is not
thread-safe: the threaded client serialises access with its own lock.
"""
from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

from neozodb.protocol import (
    HANDSHAKE,
    PACKETS,
    Decoder,
    ErrorCodes,
    Packets,
    ProtocolError,
    check_handshake,
    encode,
)

_ERROR = Packets.Error
_ERROR_CODE = _ERROR.code
_MSG_ID_MASK = 0xFFFFFFFF


class RemoteError(Exception):
    """An ``Error`` packet received in answer to a request."""

    def __init__(self, code: ErrorCodes, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class ConnectionClosed(Exception):
    """The connection closed before the answer arrived."""


def error_code(value: int) -> ErrorCodes:
    try:
        return ErrorCodes(value)
    except ValueError:
        return ErrorCodes.PROTOCOL_ERROR


class Endpoint:
    __slots__ = ("_handshaked", "_hs_buf", "_decoder", "_next_id", "pending")

    def __init__(self, first_limit: int | None = None) -> None:
        self._handshaked = False
        self._hs_buf = b""
        # first_limit: bytes accepted before identified() (an incoming
        # connection's peer is anyone until then)
        self._decoder = Decoder(first_limit=first_limit)
        self._next_id = 0
        # msg_id -> (request PacketType, token); the token is the caller's
        # (a future, a callback...), returned untouched by match().
        self.pending: dict[int, tuple[Any, Any]] = {}

    @staticmethod
    def handshake() -> bytes:
        return HANDSHAKE

    def feed(self, data: bytes) -> Iterator[tuple[int, Any, tuple]]:
        """Yield (msg_id, PacketType, args) for each complete message."""
        if not self._handshaked:
            buf = self._hs_buf + data
            if len(buf) < len(HANDSHAKE):
                if buf != HANDSHAKE[: len(buf)]:
                    check_handshake(buf)  # raises, saying why
                self._hs_buf = buf
                return
            check_handshake(buf[: len(HANDSHAKE)])
            self._handshaked = True
            self._hs_buf = b""
            data = buf[len(HANDSHAKE):]
            if not data:
                return
        decoder = self._decoder
        decoder.feed(data)
        for msg_id, code, args in decoder:
            yield msg_id, PACKETS[code], args

    def identified(self) -> None:
        """The peer identified: lift the limit on what it may send."""
        self._decoder.lift_limit()

    def _alloc(self) -> int:
        msg_id = self._next_id
        self._next_id = (msg_id + 1) & _MSG_ID_MASK
        return msg_id

    def request(self, packet: Any, args: tuple, token: Any) -> bytes:
        msg_id = self._alloc()
        self.pending[msg_id] = (packet, token)
        return encode(msg_id, packet.code, args)

    def notify(self, packet: Any, args: tuple) -> bytes:
        return encode(self._alloc(), packet.code, args)

    @staticmethod
    def answer(msg_id: int, packet: Any, args: tuple) -> bytes:
        return encode(msg_id, packet.code, args)

    @staticmethod
    def error(msg_id: int, code: ErrorCodes, message: str) -> bytes:
        return encode(msg_id, _ERROR_CODE, (code.value, message.encode()))

    def match(self, msg_id: int, packet: Any, args: tuple) -> tuple[Any, Any, Exception | None]:
        """Pair an answer with its request: (token, result, error).

        ``result`` is the answer's argument tuple; for requests that are
        acknowledged by ``Error(ACK)``, the acknowledgement's text alone.
        An answer nobody asked for is a
        protocol error: the peer is confused and the connection must close.
        """
        try:
            request, token = self.pending.pop(msg_id)
        except KeyError:
            raise ProtocolError(f"unexpected answer {packet.name} (msg_id {msg_id})") from None
        if packet is _ERROR:
            code = error_code(args[0])
            if code is ErrorCodes.ACK and request.acked:
                return token, (args[1].decode("utf-8", "replace"),), None
            return token, None, RemoteError(code, args[1].decode("utf-8", "replace"))
        if packet is not request.answer:
            raise ProtocolError(f"{packet.name} does not answer {request.name}")
        return token, args, None

    def fail_pending(self) -> list[Any]:
        tokens = [token for _, token in self.pending.values()]
        self.pending.clear()
        return tokens


def tune_socket(sock: socket.socket | None) -> None:
    """No Nagle delay; TCP keepalive as NEO sets it (60 s idle, 3 x 10 s)."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        opt = getattr(socket, name, None)
        if opt is not None:
            sock.setsockopt(socket.IPPROTO_TCP, opt, value)
