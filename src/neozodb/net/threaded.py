"""The client's connections: blocking sockets, read by the thread waiting.

This is the seam between ZODB's application threads and the network.
Application threads write requests directly (under the connection's lock,
so a message is never interleaved with another).  One thread at a time
reads: everything it reads is decoded and handled there, in order.
Answers go to the queue given with the request, after an optional hook run
by the reading thread (so that, for instance, the cache is updated for a
commit before any later invalidation is processed); requests and
notifications go to the handler.

Who reads (leader/follower): a thread waiting for an answer on one
connection (``call``, ``wait``) reads the socket itself when no other
thread does, so that the answer costs no wake-up of another thread (a
handoff through a reader thread and a queue added about 20-35 µs per round
trip on this project's machines).  While another thread reads, it waits
for the end of that read, which may have brought its answer.  Each
connection also has a reader thread, which reads whenever no application
thread does, for what the peer sends unasked (invalidations, pings, the
end of the connection).  It stays out of the socket for ``DIRECT_GRACE``
seconds after an application thread read it, as the next request of that
thread usually follows: a reader thread blocked in ``recv`` would get its
answer first.  A thread that waits for answers from several connections
at once (``wait_any``, net/waiting.py: the stores and votes of a commit
on replicas) reads them all itself, polling their sockets, while no
other thread reads any of them; otherwise it asks their reader threads to read meanwhile.  Anyone
else waiting on a queue still gets its answers, at most ``DIRECT_GRACE``
later.

Keep-alive: ``recv`` times out (``SO_RCVTIMEO``, so nothing is added to
the normal path) after half of ``keepalive`` seconds of silence; the reader
then sends ``Ping``, and if the peer still sends nothing during the other
half, the connection is closed like a lost one (pending requests fail with
``ConnectionClosed``).  A ``Ping`` from the peer is answered here, whatever
the handler.
"""
from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from queue import Empty, SimpleQueue
from typing import Any

from neozodb.net.endpoint import ConnectionClosed, Endpoint, tune_socket
from neozodb.net.tls import TLSSocket
from neozodb.net.waiting import DIRECT_GRACE, wait_for_readers
from neozodb.protocol import HANDSHAKE, Packets, ProtocolError, nid_str
from neozodb.protocol.features import NO_FEATURES, common

log = logging.getLogger("neozodb.client")

# Buffered requests are sent once this many bytes wait.  The storage starts
# on a burst of stores when it arrives: what is still buffered at the vote
# is the tail it handles while the client waits (50 stores of 300 bytes
# here, about 1 ms; 64 KiB made it 1.5 ms longer, bench/README.md, "The
# end of a big commit"), and smaller bursts cost it a lookup each.
BUFFER_SIZE = 1 << 14

# Keep-alive, in seconds, of the client's and neoctl's connections, and the
# default of the server nodes' (net/connection.py, --keepalive): a peer
# silent for half of it is pinged, one silent for all of it is dropped.
# Long enough for a busy node's pauses, far shorter than what TCP's own
# keepalive takes (60 s + 3 x 10 s), and useless anyway against a peer whose
# kernel still answers (a stopped process).  0 disables it.
DEFAULT_KEEPALIVE = 30.0

_PING = Packets.Ping
_PONG = Packets.Pong
_FEATURES = Packets.NotifyFeatures
_HANDSHAKE_LEN = len(HANDSHAKE)
_MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)


class _Discard:
    """Answer queue of keep-alive Pings: receiving anything was the point."""

    @staticmethod
    def put(item: Any) -> None:
        pass


_DISCARD = _Discard()


class ThreadedConnection:
    def __init__(self, address: tuple[str, int], handler: Any, label: str = "C?",
                 keepalive: float | None = None, tls: ssl.SSLContext | None = None) -> None:
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
        # extensions both ends have (protocol/features.py); none with NEO
        self.peer_features: frozenset[bytes] = NO_FEATURES
        self._reader: threading.Thread | None = None
        # requests buffered by ask(buffer=True): one send for many stores
        self._out: list[bytes] = []
        self._out_size = 0
        # seconds (0: none); see the module docstring
        self.keepalive = DEFAULT_KEEPALIVE if keepalive is None else keepalive
        self.tls = tls  # the client TLS context (net/tls.py), None: plain
        # Reading (module docstring): one thread at a time reads, the one
        # that set _reading; the others wait on _turn for their answer or
        # for the end of its read.  The reader thread keeps out until
        # _direct_until unless threads _need it.
        self._turn = threading.Condition(threading.Lock())
        self._reading = False
        self.direct_grace = DIRECT_GRACE
        self._direct_until = 0.0
        self._need = 0
        self._need_lock = threading.Lock()
        self._kick = threading.Event()
        self._finished: str | None = None  # why reading ended: the reader cleans up
        self._head = 0         # bytes received, counted up to the handshake's length
        self._silent = False   # the last recv() timed out: a Ping is waiting

    def __repr__(self) -> str:
        return f"<{self.label}>"

    @property
    def label(self) -> str:
        return nid_str(self.nid) if self.nid is not None else self.peer

    def connect(self, timeout: float = 10.0) -> None:
        sock = socket.create_connection(self.address, timeout=timeout)
        if self.tls is not None:
            try:
                wrapped = TLSSocket(sock, self.tls)
                wrapped.handshake()  # within the connection timeout
            except BaseException:
                sock.close()
                raise
        sock.settimeout(None)
        tune_socket(sock)
        self._set_receive_timeout(sock)
        self.sock = sock if self.tls is None else wrapped
        self.sock.sendall(self.endpoint.handshake())
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

    def ask_buffered(self, packet: Any, args: tuple, queue: SimpleQueue, token: Any) -> None:
        """``ask(packet, *args, queue=queue, token=token, buffer=True)``
        with fewer steps: a big commit sends thousands of stores."""
        with self.lock:
            if self.closed:
                queue.put((token, None, ConnectionClosed(self.close_reason), self))
                return
            data = self.endpoint.request(packet, args, (queue, token, None))
            self._out.append(data)
            self._out_size += len(data)
            if self._out_size >= BUFFER_SIZE:
                self._send(b"")

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
        # Before the request leaves: a reader thread that gets its answer
        # must not go back to recv() before wait() says we read, or it would
        # also read the answer to our next request.
        self._direct_until = time.monotonic() + self.direct_grace
        queue = self.ask(packet, *args)
        try:
            _, result, error, _ = self.wait(queue, timeout)
        except Empty:
            raise ConnectionClosed(f"no answer to {packet.name} from {self.label}") from None
        if error is not None:
            raise error
        return result

    def wait(self, queue: SimpleQueue, timeout: float | None = None) -> tuple:
        """The next item of ``queue``, whose answers all come from this
        connection, reading them in this thread (module docstring).  Raises
        ``queue.Empty`` after ``timeout`` seconds (checked between reads: up
        to half the keep-alive later)."""
        if timeout is not None and not 0 < self.keepalive <= 2 * timeout:
            return wait_for_readers(queue, (self,), timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # before waiting for our turn: the reader thread, if it reads,
            # must not read again once it got our answer
            self._direct_until = time.monotonic() + self.direct_grace
            with self._turn:
                while True:
                    if not queue.empty():
                        return queue.get()
                    if self._finished is not None:
                        break
                    if not self._reading:
                        self._reading = True
                        break
                    if deadline is None:
                        self._turn.wait()
                    else:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise Empty
                        self._turn.wait(remaining)
            if self._finished is not None:
                break
            try:
                self._read_once()
            finally:
                self._end_turn()
        # the reader thread fails the pending requests, ours among them
        return wait_for_readers(queue, (self,), None)

    def _end_turn(self) -> None:
        # waiters may have got their answer, or wait to read
        with self._turn:
            self._reading = False
            self._turn.notify_all()

    def alive(self) -> bool:
        """Whether the connection is open, as far as can be known now: when
        no thread reads it (the reader thread keeps out for a while after an
        application thread read it), whatever the peer sent meanwhile, its
        end for instance, is read first.  One non-blocking peek at the
        socket, so that a request is not sent to a peer that is gone, while
        a new connection could take it."""
        if self.closed or self._finished is not None:
            return False
        with self._turn:
            if self._reading:
                return True
            self._reading = True
        try:
            raw = getattr(self.sock, "sock", self.sock)  # under TLSSocket, the plain one
            while self._finished is None:
                try:
                    raw.recv(1, socket.MSG_PEEK | _MSG_DONTWAIT)
                except BlockingIOError:
                    break  # nothing waits
                except OSError:
                    pass  # read below, as an error
                self._read_once()
        finally:
            self._end_turn()
        return not self.closed and self._finished is None

    def _needed(self, n: int) -> None:
        with self._need_lock:
            self._need += n
        if n > 0:
            self._kick.set()

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
        self._kick.set()  # the reader thread reads the end and cleans up

    # -- keep-alive ----------------------------------------------------------------
    def _set_receive_timeout(self, sock: socket.socket) -> None:
        """Make the reader's recv() give up after half the keep-alive.  The
        socket stays blocking: senders are not affected."""
        half = self.keepalive / 2
        if not half > 0:
            return
        seconds = int(half)
        micro = int((half - seconds) * 1e6) or (0 if seconds else 1)  # 0 s 0 us: no timeout
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", seconds, micro))
        except (OSError, AttributeError, struct.error) as e:
            log.warning("%s: no keep-alive on the connection with %s: %s", self.owner_label, self.peer, e)
            self.keepalive = 0

    def _ping(self) -> None:
        """Reader thread, peer silent for half the keep-alive: send a Ping,
        never blocking on a peer that may be dead."""
        # A thread holding the lock may be blocked sending to this very peer:
        # then no Ping, the timeout decides.
        if not self.lock.acquire(timeout=min(1.0, self.keepalive / 2)):
            return
        try:
            if self.closed:
                return
            data = self.endpoint.request(_PING, (), (_DISCARD, None, None))
            try:
                sent = self.sock.send(data, _MSG_DONTWAIT)
            except BlockingIOError:  # send buffer full: the peer reads nothing either
                sent = 0
            except OSError as e:
                self._shutdown(f"send failed: {e}")
                return
            if not sent:
                # the Ping, never sent: the last entry, as writers wait
                # for the lock we hold and the reader only removes entries
                self.endpoint.pending.popitem()
            elif sent < len(data):
                self._shutdown("send buffer full, peer not reading")  # half a message left
        finally:
            self.lock.release()

    def _pong(self, msg_id: int) -> None:
        """Reader thread: answer the peer's Ping, unless a writer has been
        holding the lock for a second (blocked sending to this peer: the
        reader must go on reading, and the peer hears from us anyway)."""
        if not self.lock.acquire(timeout=1.0):
            return
        try:
            if not self.closed:
                self._send(self.endpoint.answer(msg_id, _PONG, ()))
        finally:
            self.lock.release()

    def _keepalive_expired(self, sock: socket.socket, handshaked: bool) -> str:
        if handshaked:
            reason = f"no answer to keep-alive for {self.keepalive / 2:g} s"
        else:
            reason = f"no handshake after {self.keepalive:g} s"
        log.warning("%s: closing connection with %s: %s", self.owner_label, self.label, reason)
        # Without the lock, which a thread blocked sending to this peer may
        # hold: shutting the socket down wakes it up (with an error).
        if not self.closed:
            self.close_reason = reason
            self.closed = True
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return reason

    # -- reading --------------------------------------------------------------------
    def _read_loop(self) -> None:
        """The reader thread: reads when no application thread does."""
        turn = self._turn
        kick = self._kick
        while True:
            grace = self._direct_until - time.monotonic()
            if grace > 0 and not self._need and not self.closed and self._finished is None:
                kick.wait(grace)
                kick.clear()
                continue
            with turn:
                if self._finished is not None:
                    break
                if self._reading:
                    turn.wait()
                    continue
                if not (self._need or self.closed or self._direct_until <= time.monotonic()):
                    continue
                self._reading = True
            try:
                self._read_once()
            finally:
                self._end_turn()
        self._cleanup()

    def _read_once(self) -> None:
        """One ``recv`` and everything it brings, by the thread whose turn
        it is;
        ``_finished`` set when the connection ends."""
        sock = self.sock
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:  # nothing for half the keep-alive
            self._quiet()
            return
        except OSError as e:
            self._finish(str(e))
            return
        if not data:
            self._finish("closed by peer")
            return
        self._silent = False
        if self._head < _HANDSHAKE_LEN:
            self._head += len(data)
        try:
            self._handle(data)
        except ProtocolError as e:
            reason = f"protocol error: {e}"
            log.error("%s: closing connection with %s: %s", self.owner_label, self.label, reason)
            self._finish(reason)
        except OSError as e:
            self._finish(str(e))
        except Exception as e:
            log.exception("%s: error on connection with %s", self.owner_label, self.label)
            self._finish(f"internal error: {e!r}")
        except BaseException:
            # e.g. KeyboardInterrupt in an application thread: what was
            # read and not handled is lost, so is the connection
            self._finish("interrupted while reading")
            raise

    def _quiet(self) -> None:
        """In a reading turn, the peer silent for half the keep-alive: a
        Ping, or the end of the connection if the last one got nothing."""
        if self._silent:
            self._finish(self._keepalive_expired(self.sock, self._head >= _HANDSHAKE_LEN))
            return
        self._silent = True
        if self._head >= _HANDSHAKE_LEN:  # no Ping before the peer's handshake
            self._ping()

    def _handle(self, data: bytes) -> None:
        endpoint = self.endpoint
        for msg_id, packet, args in endpoint.feed(data):
            if packet.is_answer:
                # Not under self.lock: a writer holds it while blocked
                # sending to a peer that stopped reading until its answers
                # are read (backpressure); waiting for it here would be a
                # deadlock.  The table of pending requests is a dict: one
                # insertion (writers) and one pop (here) are atomic.
                token, result, error = endpoint.match(msg_id, packet, args)
                queue, user_token, hook = token
                if hook is not None:
                    try:
                        hook(result, error)
                    except Exception as e:  # report to the waiting thread
                        log.exception("%s: error in answer hook", self.owner_label)
                        error = e
                queue.put((user_token, result, error, self))
            elif packet is _PING:
                self._pong(msg_id)
            elif packet is _FEATURES:
                self.peer_features = common(args[0])
            else:
                self.handler.dispatch(self, msg_id, packet, args)

    def _finish(self, reason: str) -> None:
        # in a reading turn: nobody reads any more; the reader thread,
        # woken (by the kick or the turn's end), fails what is pending
        self._finished = reason
        self._kick.set()

    def _cleanup(self) -> None:
        sock = self.sock
        with self.lock:
            if not self.closed:
                self.close_reason = self._finished
            self._shutdown(self._finished)
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
