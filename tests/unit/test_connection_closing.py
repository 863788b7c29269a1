"""A Connection whose transport closed before connection_lost reached it:
what it writes meanwhile (a keep-alive Ping from its timer, an answer, a
request) is dropped, and the request fails once the loss arrives.  uvloop
raises on a write to a closed transport, in a timer callback where nothing
catches it (found by tests/security/test_fuzz.py: a storage logged that
traceback).  The loss is held back by a protocol in front of the
Connection, the window made as wide as the test needs."""
from __future__ import annotations

import asyncio
import socket

import pytest

from neozodb.net.connection import Connection, ConnectionClosed, Handler
from neozodb.protocol import HANDSHAKE, Packets, encode

uvloop = pytest.importorskip("uvloop")

pytestmark = pytest.mark.timeout(30)


class App:
    label = "S1"


class Pinged(Handler):
    def __init__(self) -> None:
        self.pinged = asyncio.Event()

    def Ping(self, conn, msg_id) -> None:
        self.pinged.set()  # after the handshake: the keep-alive may ping


class LossHeldBack(asyncio.Protocol):
    """Forwards everything to ``conn`` but the loss, kept in ``lost``."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lost: asyncio.Future = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.conn.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.conn.data_received(data)

    def connection_lost(self, exc) -> None:
        self.lost.set_result(exc)


@pytest.mark.parametrize("loop_factory", [uvloop.new_event_loop, asyncio.new_event_loop],
                         ids=["uvloop", "asyncio"])
def test_writes_to_a_transport_closed_before_the_loss_arrives(loop_factory):
    errors: list = []

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, context: errors.append(context))
        handler = Pinged()
        conn = Connection(App(), handler, keepalive=60)
        front = LossHeldBack(conn)
        server = await loop.create_server(lambda: front, "127.0.0.1", 0)
        peer = socket.create_connection(server.sockets[0].getsockname(), timeout=5)
        try:
            peer.sendall(HANDSHAKE + encode(1, Packets.Ping.code, ()))
            await asyncio.wait_for(handler.pinged.wait(), 5)
            conn.transport.abort()
            await asyncio.wait_for(front.lost, 5)  # the transport is closed now
            assert not conn.closed
            conn._last_received -= 60  # silent for the keep-alive: its timer pings
            conn._keepalive_check()
            conn.answer(1, Packets.Pong)
            future = conn.ask(Packets.AskLastTransaction)
            conn.connection_lost(front.lost.result())
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(future, 5)
        finally:
            peer.close()
            server.close()
            await server.wait_closed()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())
    assert errors == []
