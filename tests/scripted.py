"""A scripted protocol peer for tests: a real TCP listener on 127.0.0.1
that speaks protocol 5 the way a NEO node does where neozodb's own nodes
behave otherwise, so that neozodb-only tests can guard what NEO's nodes
revealed.  The test gives the reply to each message it receives."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

from neozodb.cli.cluster import NodeProcess, listening_address
from neozodb.cli.config import format_address
from neozodb.protocol import HANDSHAKE, PACKETS, Decoder, check_handshake, encode

Reply = Callable[["PeerConnection", int, Any, tuple], None]


class PeerConnection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.next_id = 0

    def send(self, msg_id: int, packet: Any, *args: Any) -> None:
        with self.lock:
            self.sock.sendall(encode(msg_id, packet.code, args))

    def notify(self, packet: Any, *args: Any) -> None:
        with self.lock:
            msg_id, self.next_id = self.next_id, self.next_id + 1
        self.send(msg_id, packet, *args)


class ScriptedPeer:
    """Accepts connections; every message received is recorded in
    ``received`` as (packet name, args) and passed to ``reply``."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.received: list[tuple[str, tuple]] = []
        self.changed = threading.Condition()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self.conns: list[PeerConnection] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        conn = PeerConnection(sock)
        self.conns.append(conn)
        try:
            sock.sendall(HANDSHAKE)
            head = b""
            while len(head) < len(HANDSHAKE):
                data = sock.recv(len(HANDSHAKE) - len(head))
                if not data:
                    return
                head += data
            check_handshake(head)
            decoder = Decoder()
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                decoder.feed(data)
                for msg_id, code, args in decoder:
                    packet = PACKETS[code]
                    with self.changed:
                        self.received.append((packet.name, args))
                        self.changed.notify_all()
                    self.reply(conn, msg_id, packet, args)
        except OSError:
            pass
        finally:
            sock.close()

    def wait_for(self, name: str, timeout: float = 30.0) -> tuple:
        """The arguments of the first ``name`` message received."""
        with self.changed:
            if not self.changed.wait_for(
                    lambda: any(n == name for n, _ in self.received), timeout):
                raise TimeoutError("no %s received" % name)
            return next(a for n, a in self.received if n == name)

    def close(self) -> None:
        self.listener.close()
        for conn in self.conns:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def run_neoctl(address: str, *words: str) -> subprocess.CompletedProcess:
    """Our neoctl, as a command, against the admin at ``address``."""
    return subprocess.run([sys.executable, "-m", "neozodb.ctl.neoctl", "-a", address, *words],
                          capture_output=True, text=True, timeout=30)


def admin_behind(peer: ScriptedPeer, directory, *options: str) -> tuple[NodeProcess, str]:
    """Our admin node (cluster "neo") following ``peer`` as its master,
    started; (the process, the address it listens on)."""
    admin = NodeProcess("A1", [sys.executable, "-m", "neozodb.cli.admin", "-c", "neo",
                               "-m", format_address(peer.address), "-b", "127.0.0.1:0",
                               *options], os.path.join(str(directory), "A1.log"))
    admin.start()
    try:
        return admin, format_address(listening_address(admin))
    except BaseException:
        admin.kill()
        raise
