"""The client's connections: blocking sockets, one reader thread each.

This is the seam between ZODB's application threads and the network.
Application threads write requests directly (under the connection's lock,
so a message is never interleaved with another) and wait for the answer on a
queue of their own.  The reader thread decodes everything the peer sends:
answers go to the queue given with the request, after an optional hook run
in the reader thread itself (so that, for instance, the cache is updated for
a commit before any later invalidation is processed); requests and
notifications go to the handler, in order, in the reader thread.
"""
from __future__ import annotations

import logging
import socket
import threading
from queue import SimpleQueue
from typing import Any

from neozodb.net.endpoint import ConnectionClosed, Endpoint, tune_socket
from neozodb.protocol import ProtocolError, nid_str

log = logging.getLogger("neozodb.client")

BUFFER_SIZE = 1 << 16  # buffered requests are sent once this many bytes wait


class ThreadedConnection:
    def __init__(self, address: tuple[str, int], handler: Any, label: str = "C?") -> None:
        self.address = address
        self.handler = handler  # .dispatch(conn, msg_id, packet, args), .connection_lost(conn)
        self.owner_label = label
        self.endpoint = Endpoint()
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.closed = False
        self.close_reason = ""
        self.nid: int | None = None
        self.peer = "%s:%s" % address
        self._reader: threading.Thread | None = None
        # requests buffered by ask(buffer=True): one send for many stores
        self._out: list[bytes] = []
        self._out_size = 0

    def __repr__(self) -> str:
        return f"<{self.label}>"

    @property
    def label(self) -> str:
        return nid_str(self.nid) if self.nid is not None else self.peer

    def connect(self, timeout: float = 10.0) -> None:
        sock = socket.create_connection(self.address, timeout=timeout)
        sock.settimeout(None)
        tune_socket(sock)
        self.sock = sock
        sock.sendall(self.endpoint.handshake())
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name=f"neozodb reader {self.peer}")
        self._reader.start()

    # -- sending (any thread) ---------------------------------------------------
    def ask(self, packet: Any, *args: Any, queue: SimpleQueue | None = None, token: Any = None,
            hook: Any = None, buffer: bool = False) -> SimpleQueue:
        """Send a request; its answer is put on ``queue`` as
        ``(token, result, error, conn)``.  ``hook(result, error)`` runs first,
        in the reader thread.  With ``buffer``, the request may wait in a
        buffer until ``flush()`` or the next unbuffered send."""
        if queue is None:
            queue = SimpleQueue()
        with self.lock:
            if self.closed:
                queue.put((token, None, ConnectionClosed(self.close_reason), self))
                return queue
            data = self.endpoint.request(packet, args, (queue, token, hook))
            if buffer:
                self._out.append(data)
                self._out_size += len(data)
                if self._out_size < BUFFER_SIZE:
                    return queue
                data = b""
            self._send(data)
        return queue

    def _send(self, data: bytes) -> None:
        # called with self.lock held; buffered requests go first, in order
        if self._out:
            self._out.append(data)
            data = b"".join(self._out)
            self._out.clear()
            self._out_size = 0
        try:
            self.sock.sendall(data)
        except OSError as e:
            self._shutdown(f"send failed: {e}")

    def flush(self) -> None:
        with self.lock:
            if self._out and not self.closed:
                self._send(b"")

    def call(self, packet: Any, *args: Any, timeout: float | None = None) -> Any:
        """Send a request and wait for its answer (raise the error, if any)."""
        queue = self.ask(packet, *args)
        try:
            _, result, error, _ = queue.get(timeout=timeout)
        except Exception:
            raise ConnectionClosed(f"no answer to {packet.name} from {self.label}") from None
        if error is not None:
            raise error
        return result

    def notify(self, packet: Any, *args: Any) -> None:
        with self.lock:
            if not self.closed:
                self._send(self.endpoint.notify(packet, args))

    def answer(self, msg_id: int, packet: Any, *args: Any) -> None:
        with self.lock:
            if not self.closed:
                self._send(self.endpoint.answer(msg_id, packet, args))

    def close(self, reason: str = "closed") -> None:
        with self.lock:
            self._shutdown(reason)

    def _shutdown(self, reason: str) -> None:
        # called with self.lock held
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- reader thread ---------------------------------------------------------------
    def _read_loop(self) -> None:
        sock = self.sock
        endpoint = self.endpoint
        reason = "closed by peer"
        try:
            while True:
                data = sock.recv(1 << 16)
                if not data:
                    break
                for msg_id, packet, args in endpoint.feed(data):
                    if packet.is_answer:
                        with self.lock:
                            token, result, error = endpoint.match(msg_id, packet, args)
                        queue, user_token, hook = token
                        if hook is not None:
                            try:
                                hook(result, error)
                            except Exception as e:  # report to the waiting thread
                                log.exception("%s: error in answer hook", self.owner_label)
                                error = e
                        queue.put((user_token, result, error, self))
                    else:
                        self.handler.dispatch(self, msg_id, packet, args)
        except ProtocolError as e:
            reason = f"protocol error: {e}"
            log.error("%s: closing connection with %s: %s", self.owner_label, self.label, reason)
        except OSError as e:
            reason = str(e)
        except Exception as e:
            reason = f"internal error: {e!r}"
            log.exception("%s: error on connection with %s", self.owner_label, self.label)
        with self.lock:
            if not self.closed:
                self.close_reason = reason
            self._shutdown(reason)
            pending = self.endpoint.fail_pending()
        try:
            sock.close()
        except OSError:
            pass
        err = ConnectionClosed(self.close_reason)
        for queue, user_token, hook in pending:
            if hook is not None:
                try:
                    hook(None, err)
                except Exception:
                    log.exception("%s: error in answer hook", self.owner_label)
            queue.put((user_token, None, err, self))
        self.handler.connection_lost(self)
