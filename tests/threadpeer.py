"""The far end of a client's ``ThreadedConnection`` (net/threaded.py): a
plain socket driven by the test, which is also the connection's handler."""
from __future__ import annotations

import socket
import threading

from neozodb.net.threaded import ThreadedConnection
from neozodb.protocol import HANDSHAKE, Decoder, encode


def msg(msg_id, packet, *args) -> bytes:
    return encode(msg_id, packet.code, args)


class Peer:
    def __init__(self, keepalive: float) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.lost = threading.Event()
        self.dispatched: list = []
        self.dispatched_in: list = []  # the thread that handled each of them
        self.handled = threading.Event()  # something was dispatched
        self.conn = ThreadedConnection(self.listener.getsockname(), self, "C1", keepalive=keepalive)
        self.conn.connect(timeout=5)
        self.sock, _ = self.listener.accept()
        self.sock.settimeout(5)  # every read of the test is bounded
        self.decoder = Decoder()
        assert self.sock.recv(len(HANDSHAKE)) == HANDSHAKE

    # the connection's handler
    def dispatch(self, conn, msg_id, packet, args):
        self.dispatched.append(packet.name)
        self.dispatched_in.append(threading.current_thread())
        self.handled.set()

    def connection_lost(self, conn):
        self.lost.set()

    def read(self):
        """Next message from the connection (bounded by the socket timeout)."""
        while True:
            for m in self.decoder:
                return m
            data = self.sock.recv(1 << 16)
            assert data, "connection closed"
            self.decoder.feed(data)

    def close(self):
        self.conn.close()
        self.sock.close()
        self.listener.close()
