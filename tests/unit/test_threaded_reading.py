"""Who reads a client connection (net/threaded.py): the thread waiting for
an answer reads it itself; the reader thread reads what arrives unasked,
and whatever threads waiting on several connections need."""
from __future__ import annotations

import socket
import threading
import time
from queue import SimpleQueue

import pytest

from neozodb.net.endpoint import ConnectionClosed
from neozodb.net.waiting import wait_any
from neozodb.protocol import HANDSHAKE, ClusterStates, Packets, p64
from threadpeer import Peer, msg

pytestmark = pytest.mark.timeout(60)

LONG = 30.0  # a grace no test waits for: what must happen sooner cannot rely on it


class Responder(threading.Thread):
    """Answers every AskLastTransaction of the connection with its msg_id as
    the TID, and pings with Pong, until the connection closes."""

    def __init__(self, peer: Peer) -> None:
        super().__init__(daemon=True)
        self.peer = peer
        self.start()

    def run(self) -> None:
        try:
            while True:
                msg_id, code, _ = self.peer.read()
                if code == Packets.AskLastTransaction.code:
                    self.peer.sock.sendall(msg(msg_id, Packets.AnswerLastTransaction, p64(msg_id)))
                elif code == Packets.Ping.code:
                    self.peer.sock.sendall(msg(msg_id, Packets.Pong))
        except (AssertionError, OSError):
            pass


def ask(conn):
    """AskLastTransaction; (queue, [thread that ran its answer's hook])."""
    threads: list = []
    queue = conn.ask(Packets.AskLastTransaction,
                     hook=lambda result, error: threads.append(threading.current_thread()))
    return queue, threads


@pytest.fixture
def peer():
    p = Peer(keepalive=30)
    p.sock.sendall(HANDSHAKE)
    yield p
    p.close()


def test_the_waiting_thread_reads_its_own_answers(peer):
    peer.conn.direct_grace = LONG
    Responder(peer)
    peer.conn.call(Packets.AskLastTransaction)  # the reader thread may have been in recv
    for _ in range(20):
        queue, threads = ask(peer.conn)
        _, (tid,), error, _ = peer.conn.wait(queue)
        assert error is None and tid != p64(0)
        assert threads == [threading.current_thread()]


def test_what_arrives_unasked_is_handled_by_the_reader_thread(peer):
    peer.conn.direct_grace = 0.2
    Responder(peer)
    peer.conn.call(Packets.AskLastTransaction)
    peer.sock.sendall(msg(0, Packets.NotifyClusterInformation, ClusterStates.RUNNING))
    assert peer.handled.wait(10), peer.conn.close_reason
    assert peer.dispatched == ["NotifyClusterInformation"]
    assert peer.dispatched_in[0].name.startswith("neozodb reader")


@pytest.fixture
def two(peer):
    """Two answering peers whose reader threads keep out for LONG: each
    connection was just read by the thread waiting for its answer."""
    other = Peer(keepalive=30)
    try:
        other.sock.sendall(HANDSHAKE)
        for p in (peer, other):
            p.conn.direct_grace = LONG
            Responder(p)
            p.conn.call(Packets.AskLastTransaction)
            p.conn.call(Packets.AskLastTransaction)  # read directly: the grace runs
        yield peer, other
    finally:
        other.close()


def test_a_thread_waiting_on_several_connections_reads_them_itself(two):
    threads: list = []

    def hook(result, error):
        threads.append(threading.current_thread())

    for _ in range(20):
        queue: SimpleQueue = SimpleQueue()
        threads.clear()
        for p in two:
            p.conn.ask(Packets.AskLastTransaction, queue=queue, token=p, hook=hook)
        got = {wait_any(queue, [p.conn for p in two])[0] for _ in range(2)}
        assert got == set(two)
        assert threads == [threading.current_thread()] * 2


def test_waiting_on_several_connections_wakes_their_readers(two):
    # one of them is read by another thread: the reader threads read for
    # the waiting one (the reader thread keeps out for LONG unless told)
    peer, other = two
    queue: SimpleQueue = SimpleQueue()
    for p in two:
        p.conn.ask(Packets.AskLastTransaction, queue=queue, token=p)
    with other.conn._turn:
        other.conn._reading = True  # as if another thread read it
    threading.Timer(0.2, other.conn._end_turn).start()
    start = time.monotonic()
    got = {wait_any(queue, (peer.conn, other.conn))[0] for _ in range(2)}
    assert got == {peer, other}
    assert time.monotonic() - start < LONG / 3


def test_threads_waiting_on_one_connection_read_for_each_other(peer):
    peer.conn.direct_grace = LONG
    Responder(peer)
    errors: list = []
    done: list = []

    def caller():
        try:
            for _ in range(200):
                peer.conn.call(Packets.AskLastTransaction)
            done.append(True)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(done) == 4


def test_a_reading_thread_sees_the_peer_close(peer):
    peer.conn.direct_grace = LONG
    Responder(peer)
    peer.conn.call(Packets.AskLastTransaction)
    queue = peer.conn.ask(Packets.AskNewOIDs, 1)  # not answered: the peer closes instead
    threading.Timer(0.2, peer.sock.close).start()
    start = time.monotonic()
    with pytest.raises(ConnectionClosed):
        peer.conn.call(Packets.AskNewOIDs, 1)
    assert time.monotonic() - start < LONG / 3
    assert peer.lost.wait(10)  # the reader thread cleaned up
    _, result, error, _ = queue.get(timeout=10)
    assert result is None and isinstance(error, ConnectionClosed)
    assert peer.conn.closed


def test_a_reading_thread_pings_a_silent_peer_and_gives_up():
    peer = Peer(keepalive=0.4)
    try:
        peer.sock.sendall(HANDSHAKE)
        peer.conn.direct_grace = LONG
        start = time.monotonic()
        with pytest.raises(ConnectionClosed, match="no answer to keep-alive"):
            peer.conn.call(Packets.AskLastTransaction)
        assert 0.4 - 0.01 <= time.monotonic() - start < LONG / 3
        codes = [peer.read()[1] for _ in range(2)]
        assert codes == [Packets.AskLastTransaction.code, Packets.Ping.code]
    finally:
        peer.close()


def test_waiting_on_several_connections_pings_a_silent_one_and_gives_up():
    # the other connection keeps bringing something: the silent one is
    # still pinged after half its keep-alive, and dropped after the rest
    silent, busy = Peer(keepalive=0.4), Peer(keepalive=0.4)
    stop = threading.Event()

    def chatter():
        while not stop.wait(0.05):
            busy.sock.sendall(msg(0, Packets.NotifyClusterInformation, ClusterStates.RUNNING))

    try:
        for p in (silent, busy):
            p.sock.sendall(HANDSHAKE)
            p.conn.direct_grace = LONG
            for _ in range(2):  # read directly: their reader threads keep out
                queue = p.conn.ask(Packets.AskLastTransaction)
                msg_id, _, _ = p.read()
                p.sock.sendall(msg(msg_id, Packets.AnswerLastTransaction, p64(1)))
                assert p.conn.wait(queue)[2] is None
        threading.Thread(target=chatter, daemon=True).start()
        queue: SimpleQueue = SimpleQueue()
        silent.conn.ask(Packets.AskLastTransaction, queue=queue)
        start = time.monotonic()
        _, result, error, conn = wait_any(queue, (silent.conn, busy.conn))
        assert conn is silent.conn and isinstance(error, ConnectionClosed)
        assert "keep-alive" in str(error)
        assert 0.4 - 0.01 <= time.monotonic() - start < 5
        codes = [silent.read()[1] for _ in range(2)]
        assert codes == [Packets.AskLastTransaction.code, Packets.Ping.code]
        assert not busy.conn.closed
    finally:
        stop.set()
        silent.close()
        busy.close()


def test_a_call_with_a_timeout_gives_up(peer):
    # nobody answers: the timeout, not the keep-alive, ends the wait
    start = time.monotonic()
    with pytest.raises(ConnectionClosed, match="no answer to AskLastTransaction"):
        peer.conn.call(Packets.AskLastTransaction, timeout=0.3)
    assert 0.3 <= time.monotonic() - start < 10
    assert not peer.conn.closed


def test_an_answer_read_by_the_reader_thread_is_not_left_waiting(peer):
    # While a thread waits on several connections, the reader thread reads
    # this one and keeps reading: a thread waiting for its turn must see the
    # answer the reader thread got for it (not wait for the turn, behind a
    # recv() that nothing else will end).
    peer.conn.direct_grace = LONG
    Responder(peer)
    other = Peer(keepalive=30)  # never answers
    try:
        other.sock.sendall(HANDSHAKE)
        queue: SimpleQueue = SimpleQueue()
        other.conn.ask(Packets.AskLastTransaction, queue=queue)
        waiter = threading.Thread(target=wait_any, args=(queue, (peer.conn, other.conn)),
                                  daemon=True)
        waiter.start()
        start = time.monotonic()
        for _ in range(50):
            peer.conn.call(Packets.AskLastTransaction)
        assert time.monotonic() - start < LONG / 3
    finally:
        other.close()
    waiter.join(10)
    assert not waiter.is_alive()


def test_alive_reads_the_end_that_nobody_read_yet(peer):
    # after a direct read the reader thread keeps out of the socket: alive()
    # must read what came meanwhile rather than report a dead connection open
    peer.conn.direct_grace = LONG
    Responder(peer)
    peer.conn.call(Packets.AskLastTransaction)
    assert peer.conn.alive()
    peer.sock.sendall(msg(0, Packets.NotifyClusterInformation, ClusterStates.RUNNING))
    peer.sock.shutdown(socket.SHUT_RDWR)
    assert not peer.conn.alive()
    assert peer.dispatched == ["NotifyClusterInformation"]  # read before the end
    assert peer.lost.wait(10)
