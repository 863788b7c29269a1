"""The listening socket of a server node, plain or TLS.

Connections are accepted here rather than by ``loop.create_server`` so
that a peer of the wrong kind is told apart and named in the log: on a TLS
port, a peer whose first byte is not a TLS handshake record (a plain NEO
handshake) is closed with one line; a failed TLS handshake (no
certificate, another CA, a revoked one) is logged with the peer and the
reason, where asyncio would say nothing.  On a plain port, a TLS
ClientHello is recognised by the connection itself (``check_handshake``).
"""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from neozodb.net.limits import Limits
from neozodb.net.tls import TLS_HANDSHAKE_RECORD

log = logging.getLogger("neozodb.net")

# How long an accepted TLS peer has to send its ClientHello and complete
# the handshake
TLS_HANDSHAKE_TIMEOUT = 10.0


class Listener:
    """Accepts connections on ``sock`` for ``app`` (``app.label``,
    ``app.tls``: a ``TLS`` or None), each handed to the protocol
    ``make_protocol()`` builds."""

    def __init__(self, app: Any, sock: socket.socket, make_protocol: Callable[[], Any]) -> None:
        self.app = app
        self.sock = sock
        self.sockets = [sock]
        self.make_protocol = make_protocol
        self._task: asyncio.Task | None = None
        self._starting: set[asyncio.Task] = set()  # TLS handshakes in progress
        self._refused = 0
        self._refusal_logged = 0.0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._accept_loop())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for task in list(self._starting):
            task.cancel()
        self.sock.close()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, addr = await loop.sock_accept(self.sock)
            except asyncio.CancelledError:
                raise
            except OSError as e:
                # out of file descriptors, typically: let some close first
                log.warning("%s: cannot accept a connection: %s", self.app.label, e)
                await asyncio.sleep(0.1)  # backoff, not synchronisation
                continue
            peer = "%s:%s" % addr[:2]
            tls = getattr(self.app, "tls", None)
            if tls is None:
                try:
                    await loop.connect_accepted_socket(self.make_protocol, sock)
                except OSError as e:
                    log.info("%s: connection from %s lost at once: %s", self.app.label, peer, e)
                    sock.close()
                continue
            cap = Limits.max_accepted
            if cap and len(self._starting) >= cap:
                # a flood of handshakes that never finish: each holds a
                # descriptor for up to TLS_HANDSHAKE_TIMEOUT
                self._refused += 1
                now = time.monotonic()
                if now - self._refusal_logged >= 1.0:
                    log.warning("%s: refused connection from %s: %d TLS handshakes in progress"
                                " (cap %d); %d refused since the last report", self.app.label,
                                peer, len(self._starting), cap, self._refused - 1)
                    self._refusal_logged, self._refused = now, 0
                sock.close()
                continue
            task = loop.create_task(self._start_tls(sock, peer, tls.server))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    async def _start_tls(self, sock: socket.socket, peer: str, context: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        label = self.app.label
        try:
            first = await asyncio.wait_for(_peek(loop, sock), TLS_HANDSHAKE_TIMEOUT)
        except (TimeoutError, OSError) as e:
            log.info("%s: closing connection with %s: no TLS handshake (%s)", label, peer,
                     e or "timed out")
            sock.close()
            return
        if not first:
            sock.close()
            return
        if first[0] != TLS_HANDSHAKE_RECORD:
            log.warning("%s: closing connection with %s: not a TLS handshake on a TLS port"
                        " (a plain NEO peer?)", label, peer)
            sock.close()
            return
        try:
            await loop.connect_accepted_socket(
                self.make_protocol, sock, ssl=context,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        except (ssl.SSLError, OSError, TimeoutError) as e:
            reason = getattr(e, "verify_message", None) or getattr(e, "reason", None) or e
            log.warning("%s: closing connection with %s: TLS handshake failed: %s",
                        label, peer, reason or type(e).__name__)
            sock.close()


async def _peek(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """The first byte the peer sends, left in the socket for the TLS layer."""
    readable = loop.create_future()
    fd = sock.fileno()
    loop.add_reader(fd, lambda: readable.done() or readable.set_result(None))
    try:
        await readable
    finally:
        loop.remove_reader(fd)
    return sock.recv(1, socket.MSG_PEEK)


async def listen(app: Any, bind: tuple[str, int], make_protocol: Callable[[], Any],
                 backlog: int = 128) -> Listener:
    """Bind ``bind`` and accept connections for ``app``."""
    host, port = bind
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, type_, proto, _, address = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    listener = Listener(app, sock, make_protocol)
    listener.start()
    return listener
