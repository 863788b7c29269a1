"""neozodb.net.connection.Connection driven through a fake transport.

No sockets: the transport records what the connection writes and whether
it was closed (flushing) or aborted; the peer's bytes are fed directly to
``data_received``.  Each test runs inside its own event loop.  At the end,
the keep-alive of the threaded (client) connection, against a plain socket
on loopback.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

import threadpeer
from neozodb.net.connection import (
    Connection,
    ConnectionClosed,
    Handler,
    HandlerError,
    NotReady,
    RemoteError,
    get_keepalive,
    set_keepalive,
)
from neozodb.protocol import (
    HANDSHAKE,
    ClusterStates,
    Decoder,
    ErrorCodes,
    NodeTypes,
    Packets,
    ProtocolError,
    encode,
    p64,
)

pytestmark = pytest.mark.timeout(30)

ERROR = Packets.Error.code
TID = p64(42)
OID = p64(7)


class FakeTransport:
    """What Connection uses of an asyncio transport; records every call."""

    def __init__(self):
        self.data = bytearray()
        self.calls: list[str] = []

    def write(self, data):
        assert not ({"close", "abort", "write_eof"} & set(self.calls)), "write after close"
        self.data += data

    def close(self):
        self.calls.append("close")

    def abort(self):
        self.calls.append("abort")

    def is_closing(self):
        return bool({"close", "abort"} & set(self.calls))

    def get_extra_info(self, name, default=None):
        return ("192.0.2.1", 1234) if name == "peername" else default

    def messages(self) -> list[tuple[int, int, tuple]]:
        """What was sent after our handshake, decoded."""
        assert bytes(self.data[:len(HANDSHAKE)]) == HANDSHAKE
        decoder = Decoder()
        decoder.feed(bytes(self.data[len(HANDSHAKE):]))
        return list(decoder)


class EofTransport(FakeTransport):
    """A transport that can half-close (plain TCP)."""

    def can_write_eof(self):
        return True

    def write_eof(self):
        self.calls.append("write_eof")


class App:
    label = "M1"


class Recorder(Handler):
    def __init__(self):
        self.calls: list[tuple] = []
        self.lost = 0

    def connection_lost(self, conn):
        self.lost += 1

    def Ping(self, conn, msg_id):
        self.calls.append(("Ping", msg_id))
        conn.answer(msg_id, Packets.Pong)

    def RequestIdentification(self, conn, msg_id, node_type, nid, address, name, ts, extra):
        raise HandlerError("wrong cluster name: %r" % name, ErrorCodes.PROTOCOL_ERROR)

    def AskLastTransaction(self, conn, msg_id):
        raise HandlerError("not now", ErrorCodes.DENIED)

    def AskClusterState(self, conn, msg_id):
        raise NotReady("cluster not ready")

    def AskNewOIDs(self, conn, msg_id, count):
        raise RuntimeError("handler bug")

    def AskPrimary(self, conn, msg_id):
        raise ProtocolError("bad request")

    def AskObject(self, conn, msg_id, oid, at, before):  # ignorable
        self.calls.append(("AskObject", msg_id))

    def AskFinishTransaction(self, conn, msg_id, ttid, oids, deleted, checked, pack):  # not ignorable
        self.calls.append(("AskFinishTransaction", msg_id))

    def InvalidateObjects(self, conn, msg_id, tid, oids):  # notification
        self.calls.append(("InvalidateObjects", msg_id))

    def StopOperation(self, conn, msg_id):  # notification: the handler closes gracefully
        self.calls.append(("StopOperation", msg_id))
        conn.close("stop", flush=True)


def run(test, transport_class=FakeTransport, handler_class=None):
    """Run ``test(conn, transport, handler)`` (a coroutine function) in a new
    loop; the handler a ``Recorder`` unless ``handler_class`` says."""
    async def main():
        transport = transport_class()
        handler = (handler_class or Recorder)()
        conn = Connection(App(), handler)
        conn.connection_made(transport)
        return await test(conn, transport, handler)
    return asyncio.run(main())


def msg(msg_id, packet, *args) -> bytes:
    return encode(msg_id, packet.code, args)


def error(msg_id, code: ErrorCodes, message: bytes = b"") -> bytes:
    return encode(msg_id, ERROR, (code.value, message))


# -- normal operation ----------------------------------------------------------------------


def test_handshake_then_request_dispatches_to_the_handler():
    async def test(conn, transport, handler):
        assert conn.peer == "192.0.2.1:1234"
        assert bytes(transport.data) == HANDSHAKE  # ours, sent at once
        data = HANDSHAKE + msg(7, Packets.Ping)
        for i in range(len(data)):  # byte by byte: framing is incremental
            conn.data_received(data[i:i + 1])
        assert handler.calls == [("Ping", 7)]
        assert transport.messages() == [(7, Packets.Pong.code, ())]
        assert not conn.closed and transport.calls == []
    run(test)


def test_answers_resolve_futures_and_callbacks():
    async def test(conn, transport, handler):
        conn.data_received(HANDSHAKE)
        future = conn.ask(Packets.AskLastTransaction)
        got = []
        assert conn.ask(Packets.AskClusterState, callback=lambda *a: got.append(a)) is None
        sent = transport.messages()
        assert [(m[0], m[1]) for m in sent] == [
            (0, Packets.AskLastTransaction.code), (1, Packets.AskClusterState.code)]
        # answered out of order
        conn.data_received(msg(1, Packets.AnswerClusterState, ClusterStates.RUNNING)
                           + msg(0, Packets.AnswerLastTransaction, TID))
        assert got == [(conn, (ClusterStates.RUNNING,), None)]
        assert await future == (TID,)
        assert not conn.closed
    run(test)


def test_error_ack_to_an_acked_request_resolves_its_message():
    async def test(conn, transport, handler):
        conn.data_received(HANDSHAKE)
        future = conn.ask(Packets.SetClusterState, ClusterStates.STOPPING)
        conn.data_received(error(0, ErrorCodes.ACK))
        assert await future == ("",)
    run(test)


def test_error_code_raises_remote_error():
    async def test(conn, transport, handler):
        conn.data_received(HANDSHAKE)
        future = conn.ask(Packets.AskObject, OID, None, None)
        got = []
        conn.ask(Packets.AskObject, OID, None, None, callback=lambda *a: got.append(a))
        conn.data_received(error(0, ErrorCodes.OID_DOES_NOT_EXIST, b"no such object")
                           + error(1, ErrorCodes.ACK))  # ACK is a failure for a non-acked request
        with pytest.raises(RemoteError) as e:
            await future
        assert e.value.code is ErrorCodes.OID_DOES_NOT_EXIST
        assert e.value.message == "no such object"
        (c, result, err), = got
        assert c is conn and result is None and isinstance(err, RemoteError) and err.code is ErrorCodes.ACK
        assert not conn.closed
    run(test)


# -- refusals ------------------------------------------------------------------------------------


def test_handler_error_answers_its_code_and_keeps_the_connection():
    async def test(conn, transport, handler):
        conn.data_received(HANDSHAKE + msg(3, Packets.AskLastTransaction) + msg(4, Packets.Ping))
        assert transport.messages() == [(3, ERROR, (ErrorCodes.DENIED.value, b"not now")),
                                        (4, Packets.Pong.code, ())]
        assert not conn.closed and transport.calls == []
    run(test)


def test_protocol_error_code_answers_then_closes():
    # e.g. a wrong cluster name at identification
    async def test(conn, transport, handler):
        conn.data_received(HANDSHAKE + msg(0, Packets.RequestIdentification, NodeTypes.CLIENT,
                                           None, None, b"other", None, {})
                           + msg(1, Packets.Ping))
        (msg_id, code, (err, text)), = transport.messages()
        assert (msg_id, code, err) == (0, ERROR, ErrorCodes.PROTOCOL_ERROR.value)
        assert text.startswith(b"wrong cluster name")
        assert transport.calls == ["close"]  # flushed, not aborted
        assert conn.closed and handler.lost == 1
        assert handler.calls == []  # nothing read after the refusal
    run(test)


def test_not_ready_answers_and_closes():
    async def test(conn, transport, handler):
        future = conn.ask(Packets.AskLastTransaction)
        conn.data_received(HANDSHAKE + msg(5, Packets.AskClusterState) + msg(6, Packets.Ping))
        assert transport.messages()[1:] == [
            (5, ERROR, (ErrorCodes.NOT_READY.value, b"cluster not ready"))]
        assert transport.calls == ["close"]
        assert conn.closed and conn.close_reason == "cluster not ready"
        assert handler.calls == [] and handler.lost == 1
        with pytest.raises(ConnectionClosed):
            await future
    run(test)


def test_handler_bug_closes_only_that_connection(caplog):
    async def main():
        other_transport, other_handler = FakeTransport(), Recorder()
        other = Connection(App(), other_handler)
        other.connection_made(other_transport)
        other.data_received(HANDSHAKE)

        transport, handler = FakeTransport(), Recorder()
        conn = Connection(App(), handler)
        conn.connection_made(transport)
        conn.data_received(HANDSHAKE + msg(0, Packets.AskNewOIDs, 1) + msg(1, Packets.Ping))
        assert conn.closed and transport.calls == ["abort"]
        assert "internal error handling AskNewOIDs" in conn.close_reason
        assert handler.calls == [] and handler.lost == 1

        other.data_received(msg(0, Packets.Ping))
        assert other_handler.calls == [("Ping", 0)] and not other.closed
        assert other_transport.calls == []
    with caplog.at_level(logging.ERROR, "neozodb.net"):
        asyncio.run(main())
    assert any("handler bug" in r.exc_text for r in caplog.records if r.exc_text)


# -- protocol errors -----------------------------------------------------------------------------


def _one_close_line(caplog, reason):
    lines = [r.getMessage() for r in caplog.records if "closing connection" in r.getMessage()]
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("M1: ") and "192.0.2.1:1234" in line and reason in line, line


@pytest.mark.parametrize("garbage", [
    b"\xc1\xc1\xc1garbage",        # 0xc1 is never valid msgpack
    b"\x93\x00\xcd\xff\xff\x90",   # unknown message code
    b"\x93\x00\x02\x91\x01",       # Ping with an argument
])
def test_garbage_sends_protocol_error_then_closes(caplog, garbage):
    async def test(conn, transport, handler):
        future = conn.ask(Packets.AskLastTransaction)
        conn.data_received(HANDSHAKE + msg(0, Packets.Ping) + garbage)
        sent = transport.messages()
        assert sent[1] == (0, Packets.Pong.code, ())  # what came before is processed
        (msg_id, code, (err, _)), = sent[2:]
        assert (msg_id, code, err) == (0, ERROR, ErrorCodes.PROTOCOL_ERROR.value)
        assert transport.calls == ["close"]
        assert conn.closed and conn.close_reason.startswith("protocol error")
        assert handler.lost == 1 and conn.closed_future.done()
        with pytest.raises(ConnectionClosed):
            await future
        conn.data_received(msg(1, Packets.Ping))  # nothing more is read
        assert handler.calls == [("Ping", 0)]
    with caplog.at_level(logging.INFO, "neozodb.net"):
        run(test)
    _one_close_line(caplog, "protocol error")


@pytest.mark.parametrize("data", [b"GET / HTTP/1.0\r\n\r\n", b"\x92\xa3NEO\x04"])
def test_failed_handshake_closes_without_error_message(caplog, data):
    async def test(conn, transport, handler):
        conn.data_received(data)
        assert bytes(transport.data) == HANDSHAKE
        assert transport.calls == ["close"] and conn.closed and handler.lost == 1
    with caplog.at_level(logging.INFO, "neozodb.net"):
        run(test)
    _one_close_line(caplog, "protocol error")


def test_unexpected_request_answers_protocol_error_with_its_msg_id(caplog):
    async def test(conn, transport, handler):
        conn.data_received(HANDSHAKE + msg(9, Packets.AskTIDs, 0, 1, 0) + msg(10, Packets.Ping))
        (msg_id, code, (err, text)), = transport.messages()
        assert (msg_id, code, err) == (9, ERROR, ErrorCodes.PROTOCOL_ERROR.value)
        assert b"unexpected packet AskTIDs" in text
        assert transport.calls == ["close"] and handler.calls == []
    with caplog.at_level(logging.INFO, "neozodb.net"):
        run(test)
    _one_close_line(caplog, "unexpected packet AskTIDs")


def test_handler_protocol_error_answers_and_closes(caplog):
    async def test(conn, transport, handler):
        conn.nid = 1  # identified: the log line names it too
        conn.data_received(HANDSHAKE + msg(4, Packets.AskPrimary))
        assert transport.messages() == [(4, ERROR, (ErrorCodes.PROTOCOL_ERROR.value, b"bad request"))]
        assert transport.calls == ["close"] and conn.closed
    with caplog.at_level(logging.INFO, "neozodb.net"):
        run(test)
    _one_close_line(caplog, "S1 (192.0.2.1:1234): protocol error: bad request")


def test_delayed_request_replayed_with_protocol_error_does_not_raise():
    # storage handlers replay delayed requests through _request_received
    async def test(conn, transport, handler):
        conn.data_received(HANDSHAKE)
        conn._request_received(4, Packets.AskPrimary, ())
        assert transport.messages() == [(4, ERROR, (ErrorCodes.PROTOCOL_ERROR.value, b"bad request"))]
        assert conn.closed
    run(test)


@pytest.mark.parametrize("answer", [
    msg(5, Packets.AnswerLastTransaction, TID),   # nothing asked with that id
    msg(0, Packets.AnswerClusterState, None),     # answers another request
])
def test_unexpected_answer_answers_protocol_error_and_closes(answer):
    async def test(conn, transport, handler):
        future = conn.ask(Packets.AskLastTransaction)
        conn.data_received(HANDSHAKE + answer)
        decoder = Decoder()
        decoder.feed(answer)
        (expected_id, _, _), = decoder
        (sent_id, code, (err, _)), = transport.messages()[1:]
        assert (sent_id, code, err) == (expected_id, ERROR, ErrorCodes.PROTOCOL_ERROR.value)
        assert transport.calls == ["close"]
        with pytest.raises(ConnectionClosed):  # never left hanging
            await future
    run(test)


# -- loss and closing ----------------------------------------------------------------------------


def test_connection_lost_fails_pending_requests():
    async def test(conn, transport, handler):
        conn.data_received(HANDSHAKE)
        future = conn.ask(Packets.AskLastTransaction)
        got = []
        conn.ask(Packets.AskClusterState, callback=lambda *a: got.append(a))
        conn.connection_lost(ConnectionResetError("reset by peer"))
        with pytest.raises(ConnectionClosed, match="reset by peer"):
            await future
        assert got[0][0] is conn and got[0][1] is None and isinstance(got[0][2], ConnectionClosed)
        assert conn.closed and conn.closed_future.done() and handler.lost == 1
        # too late: refused at once
        with pytest.raises(ConnectionClosed):
            await conn.ask(Packets.AskLastTransaction)
        conn.connection_lost(None)
        assert handler.lost == 1
    run(test)


class ClosedHandleTransport(FakeTransport):
    """uvloop's transport whose handle libuv closed (a reset) before it
    says it is closing: a write raises RuntimeError."""

    def write(self, data):
        if self.data:  # the handshake went out before the reset
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>;"
                               " the handler is closed")
        self.data += data


def test_a_write_on_a_closed_handle_is_dropped_and_the_transport_aborted():
    """Found by test_fuzz: a storage's keep-alive Ping raised from its
    timer.  The write is dropped, the transport aborted; connection_lost,
    which follows, fails what waits for an answer."""
    async def test(conn, transport, handler):
        conn.data_received(HANDSHAKE)
        future = conn.ask(Packets.AskLastTransaction)
        assert transport.calls == ["abort"]
        conn.connection_lost(ConnectionResetError("reset by peer"))
        with pytest.raises(ConnectionClosed, match="reset by peer"):
            await future
    run(test, ClosedHandleTransport)


def test_close_without_flush_aborts():
    async def test(conn, transport, handler):
        future = conn.ask(Packets.AskLastTransaction)
        conn.close("going away")
        assert transport.calls == ["abort"] and handler.lost == 1
        with pytest.raises(ConnectionClosed, match="going away"):
            await future
        conn.notify(Packets.Ping)  # no write after close (FakeTransport asserts)
    run(test)


def test_graceful_close_keeps_reading_until_the_peer_closes():
    async def test(conn, transport, handler):
        conn.data_received(HANDSHAKE)
        future = conn.ask(Packets.AskLastTransaction)
        conn.notify(Packets.StopOperation)
        conn.close("operation stopped", flush=True)
        assert transport.calls == ["write_eof"]  # output flushed, then EOF
        assert conn.closed and not conn.closed_future.done() and handler.lost == 0
        conn.data_received(
            msg(0, Packets.AskObject, OID, None, None)          # ignorable: dropped
            + msg(1, Packets.AskFinishTransaction, TID, [], [], [], None)  # not ignorable
            + msg(2, Packets.InvalidateObjects, TID, [OID])      # notification
            + msg(0, Packets.AnswerLastTransaction, TID))        # answer
        assert handler.calls == [("AskFinishTransaction", 1), ("InvalidateObjects", 2)]
        assert await future == (TID,)
        assert [m[1] for m in transport.messages()] == [
            Packets.AskLastTransaction.code, Packets.StopOperation.code]  # nothing answered
        conn.connection_lost(None)  # the peer closed
        assert conn.closed_future.done() and handler.lost == 1
        assert conn.close_reason == "operation stopped"
    run(test, EofTransport)


def test_graceful_close_from_a_handler_processes_the_rest_of_the_data():
    async def test(conn, transport, handler):
        conn.data_received(HANDSHAKE + msg(0, Packets.StopOperation) + msg(1, Packets.Ping)
                           + msg(2, Packets.InvalidateObjects, TID, [OID]))
        assert handler.calls == [("StopOperation", 0), ("InvalidateObjects", 2)]
        assert transport.calls == ["write_eof"] and transport.messages() == []
    run(test, EofTransport)


def test_graceful_close_gives_up_after_linger():
    async def test(conn, transport, handler):
        conn.linger = 0.01
        future = conn.ask(Packets.AskLastTransaction)
        conn.close("bye", flush=True)
        await asyncio.wait_for(conn.closed_future, 5)  # the peer never closes
        assert transport.calls == ["write_eof", "abort"] and handler.lost == 1
        with pytest.raises(ConnectionClosed, match="bye"):
            await future
    run(test, EofTransport)


def test_graceful_close_hurried_by_close_without_flush():
    async def test(conn, transport, handler):
        conn.close("bye", flush=True)
        conn.close("now")
        assert transport.calls == ["write_eof", "abort"] and handler.lost == 1
    run(test, EofTransport)


def test_graceful_close_without_eof_support_stops_reading():
    # TLS transports cannot half-close: flush and close at once
    async def test(conn, transport, handler):
        conn.data_received(HANDSHAKE)
        future = conn.ask(Packets.AskLastTransaction)
        conn.close("bye", flush=True)
        assert transport.calls == ["close"] and handler.lost == 1
        with pytest.raises(ConnectionClosed):
            await future
        conn.data_received(msg(0, Packets.InvalidateObjects, TID, [OID]))
        assert handler.calls == []
    run(test)


def test_protocol_error_while_closing_gracefully_stops_reading():
    async def test(conn, transport, handler):
        conn.data_received(HANDSHAKE)
        conn.close("bye", flush=True)
        conn.data_received(b"\xc1" + msg(0, Packets.InvalidateObjects, TID, [OID]))
        assert transport.calls == ["write_eof", "close"] and handler.lost == 1
        assert handler.calls == [] and transport.messages() == []
    run(test, EofTransport)


# -- keep-alive ----------------------------------------------------------------------------------
#
# Real time, small keep-alives: what is tested is when the timer acts.
# Waits are bounded waits on what the connection does (a Ping written, the
# connection closed) or on the peer's scheduled messages.

KEEPALIVE = 0.4  # Ping after 0.2 s of silence, close 0.2 s after it
HALF = KEEPALIVE / 2
EPSILON = 0.005  # clock and scheduling slack


class PingTransport(FakeTransport):
    """Also records when each keep-alive Ping is written."""

    def __init__(self):
        super().__init__()
        self.pings: list[tuple[float, int]] = []  # (monotonic time, msg_id)
        self.changed = asyncio.Event()

    def write(self, data):
        super().write(data)
        pings = [m for m in self.messages() if m[1] == Packets.Ping.code]
        for msg_id, _, _ in pings[len(self.pings):]:
            self.pings.append((time.monotonic(), msg_id))
            self.changed.set()

    async def wait_pings(self, n: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.pings) < n:
                self.changed.clear()
                await self.changed.wait()


def run_keepalive(test, keepalive=KEEPALIVE, transport_class=PingTransport):
    async def main():
        transport = transport_class()
        handler = Recorder()
        conn = Connection(App(), handler, keepalive=keepalive)
        conn.connection_made(transport)
        return await test(conn, transport, handler)
    return asyncio.run(main())


def test_keepalive_pings_a_silent_peer_and_the_pong_keeps_it():
    async def test(conn, transport, handler):
        conn.data_received(HANDSHAKE)
        start = time.monotonic()
        await transport.wait_pings(1)
        sent, msg_id = transport.pings[0]
        assert sent - start >= HALF - EPSILON
        assert not conn.closed and msg_id in conn.endpoint.pending
        conn.data_received(msg(msg_id, Packets.Pong))  # answered: nothing pending
        answered = time.monotonic()
        assert not conn.endpoint.pending
        await transport.wait_pings(2)  # silent again: pinged again, never closed
        assert transport.pings[1][0] - answered >= HALF - EPSILON
        assert not conn.closed and transport.calls == []
    run_keepalive(test)


def test_keepalive_closes_a_peer_silent_after_the_ping(caplog):
    async def test(conn, transport, handler):
        conn.data_received(HANDSHAKE)
        start = time.monotonic()
        future = conn.ask(Packets.AskLastTransaction)
        await asyncio.wait_for(conn.closed_future, 5)
        assert time.monotonic() - start >= KEEPALIVE - EPSILON
        assert len(transport.pings) == 1
        assert conn.close_reason == "no answer to keep-alive for 0.2 s"
        assert transport.calls == ["abort"] and handler.lost == 1
        with pytest.raises(ConnectionClosed, match="no answer to keep-alive"):
            await future  # pending requests fail as with any close
    with caplog.at_level(logging.INFO, "neozodb.net"):
        run_keepalive(test)
    _one_close_line(caplog, "no answer to keep-alive for 0.2 s")
    assert [r.levelno for r in caplog.records if "keep-alive" in r.getMessage()] == [logging.WARNING]


def test_keepalive_any_data_is_a_sign_of_life():
    async def test(conn, transport, handler):
        conn.data_received(HANDSHAKE)
        await transport.wait_pings(1)
        # not the Pong, but something: without it the connection would
        # close half a keep-alive after the Ping; with it, it stays and the
        # next Ping comes half a keep-alive after the data
        conn.data_received(msg(0, Packets.InvalidateObjects, TID, [OID]))
        last = time.monotonic()
        await transport.wait_pings(2)
        assert transport.pings[1][0] - last >= HALF - EPSILON
        assert transport.pings[1][0] - transport.pings[0][0] > HALF
        assert not conn.closed and transport.calls == []
        assert handler.calls == [("InvalidateObjects", 0)]
    run_keepalive(test)


def test_keepalive_no_ping_while_traffic_flows():
    async def test(conn, transport, handler):
        conn.data_received(HANDSHAKE)
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        count = int(2 * KEEPALIVE / (HALF / 4))
        delivered = []

        def deliver(i):  # a message every eighth of a keep-alive, for two
            conn.data_received(msg(i, Packets.InvalidateObjects, TID, [OID]))
            delivered.append(time.monotonic())
            if i + 1 < count:
                loop.call_later(HALF / 4, deliver, i + 1)
            else:
                done.set_result(None)
        deliver(0)
        await asyncio.wait_for(done, 5 * KEEPALIVE)
        # A loaded machine may leave a gap of half a keep-alive between two
        # messages: a ping then is right.  Never one sooner after a message,
        # and never a close.
        for sent, _ in transport.pings:
            last = max(t for t in delivered if t <= sent)
            assert sent - last >= HALF - EPSILON, (sent - last, delivered)
        gaps = [b - a for a, b in zip(delivered, delivered[1:], strict=False)]
        if max(gaps) < HALF - EPSILON:
            assert transport.pings == [] and transport.messages() == []
        assert not conn.closed and transport.calls == []
    run_keepalive(test)


def test_keepalive_no_ping_before_the_handshake():
    async def test(conn, transport, handler):
        start = time.monotonic()
        await asyncio.wait_for(conn.closed_future, 5)
        assert time.monotonic() - start >= KEEPALIVE - EPSILON
        assert bytes(transport.data) == HANDSHAKE  # ours only: no Ping
        assert conn.close_reason == "no handshake after 0.4 s"
        assert transport.calls == ["abort"] and handler.lost == 1
    run_keepalive(test)


def test_keepalive_timer_stops_on_close():
    async def test(conn, transport, handler):
        assert conn._ka_timer is not None
        conn.close("bye", flush=True)  # lingering: the linger timer decides
        assert conn._ka_timer is None and conn._timer is not None
        conn.close("now")
        assert conn._ka_timer is None
    run_keepalive(test, transport_class=EofTransport)

    async def lost(conn, transport, handler):
        conn.connection_lost(None)
        assert conn._ka_timer is None
    run_keepalive(lost)

    async def refused(conn, transport, handler):
        conn.data_received(HANDSHAKE + msg(5, Packets.AskClusterState))  # NotReady: closes
        assert conn.closed and conn._ka_timer is None
    run_keepalive(refused)

    async def disabled(conn, transport, handler):
        assert conn._ka_timer is None
    run_keepalive(disabled, keepalive=0)


def test_set_keepalive_is_the_default_of_new_connections():
    saved = get_keepalive()
    try:
        set_keepalive(5)
        assert get_keepalive() == 5.0

        async def main():
            return Connection(App(), Recorder()).keepalive, Connection(App(), Recorder(), keepalive=1).keepalive
        assert asyncio.run(main()) == (5.0, 1)
        for bad in (-1, float("nan"), float("inf")):
            with pytest.raises(ValueError):
                set_keepalive(bad)
        assert get_keepalive() == 5.0
    finally:
        set_keepalive(saved)


# -- keep-alive of the threaded (client) connection ---------------------------------------------


class Peer(threadpeer.Peer):
    def __init__(self, keepalive=KEEPALIVE):
        super().__init__(keepalive)



def test_threaded_keepalive_pings_then_closes(caplog):
    peer = Peer()
    try:
        peer.sock.sendall(HANDSHAKE)
        start = time.monotonic()
        msg_id, code, args = peer.read()
        assert (code, args) == (Packets.Ping.code, ())
        assert time.monotonic() - start >= HALF - EPSILON
        queue = peer.conn.ask(Packets.AskLastTransaction)
        assert peer.read()[1] == Packets.AskLastTransaction.code
        with caplog.at_level(logging.WARNING, "neozodb.client"):
            assert peer.lost.wait(5)
        assert time.monotonic() - start >= KEEPALIVE - EPSILON
        assert peer.conn.closed and peer.conn.close_reason == "no answer to keep-alive for 0.2 s"
        _, result, error, _ = queue.get(timeout=5)
        assert result is None and isinstance(error, ConnectionClosed)
        assert "no answer to keep-alive" in str(error)
        assert any(r.getMessage() == "C1: closing connection with 127.0.0.1:%d: "
                   "no answer to keep-alive for 0.2 s" % peer.listener.getsockname()[1]
                   for r in caplog.records)
    finally:
        peer.close()


def test_threaded_answers_pings_and_pongs_keep_it_alive():
    peer = Peer()
    try:
        peer.sock.sendall(HANDSHAKE + msg(7, Packets.Ping))
        assert peer.read() == (7, Packets.Pong.code, ())  # answered whatever the handler
        for _ in range(3):  # 3 keep-alive periods, each Ping answered
            msg_id, code, _ = peer.read()
            assert code == Packets.Ping.code
            peer.sock.sendall(msg(msg_id, Packets.Pong))
        # alive after 3 periods (the next Ping may already be on its way:
        # what is pending is not asserted)
        assert not peer.conn.closed
        assert peer.dispatched == []
    finally:
        peer.close()


def test_threaded_keepalive_no_ping_before_the_handshake():
    peer = Peer()
    try:
        assert peer.lost.wait(5)
        assert peer.conn.close_reason == "no handshake after 0.4 s"
        peer.sock.settimeout(1)
        assert peer.sock.recv(100) == b""  # closed, and no Ping was sent
    finally:
        peer.close()


def test_threaded_keepalive_unblocks_a_sender_stuck_on_the_silent_peer():
    peer = Peer()
    peer.sock.sendall(HANDSHAKE)  # then reads nothing: the sender fills the buffers
    big = b"x" * (1 << 20)

    def sender():
        while not peer.conn.closed:
            peer.conn.ask(Packets.AskStoreObject, OID, TID, 0, bytes(20), big, None, TID)

    thread = threading.Thread(target=sender, daemon=True)
    try:
        thread.start()
        assert peer.lost.wait(10)
        thread.join(5)
        assert not thread.is_alive()
        assert peer.conn.close_reason == "no answer to keep-alive for 0.2 s"
        # the sender held the connection's lock, blocked: no Ping could go
        codes = set()
        while data := peer.sock.recv(1 << 20):
            peer.decoder.feed(data)
            codes.update(m[1] for m in peer.decoder)
        assert codes == {Packets.AskStoreObject.code}
    finally:
        peer.close()


def test_held_output_leaves_in_one_write_on_release():
    """The storage's group commit holds a connection's output until its
    durable answers are synced: the answers of the chunk leave with them."""
    async def test(conn, transport, handler):
        conn.data_received(HANDSHAKE)
        writes: list[bytes] = []
        write = transport.write
        transport.write = lambda data: (writes.append(bytes(data)), write(data))
        conn.hold()
        conn.data_received(msg(7, Packets.Ping))  # answered at once, but held
        assert writes == []
        conn.answer(8, Packets.Pong)  # the durable answer, later
        conn.release()
        assert len(writes) == 1
        assert transport.messages()[-2:] == [(7, Packets.Pong.code, ()), (8, Packets.Pong.code, ())]
        conn.data_received(msg(9, Packets.Ping))  # released: chunks flush as before
        assert len(writes) == 2
    run(test)


# -- runs of a handler's ``batched`` requests --------------------------------------------


class Batching(Recorder):
    """Pings are ``batched``: prefetch sees each run of them whole."""

    batched = Packets.Ping

    def prefetch(self, conn, run):
        self.calls.append(("prefetch", [msg_id for msg_id, _, _ in run]))

    def prefetched(self):
        self.calls.append(("prefetched",))


def test_a_run_is_prefetched_whole_then_dispatched_in_order():
    async def test(conn, transport, handler):
        conn.data_received(HANDSHAKE + msg(1, Packets.Ping) + msg(2, Packets.Ping)
                           + msg(3, Packets.Ping) + msg(4, Packets.AskObject, OID, None, None)
                           + msg(5, Packets.Ping))
        assert handler.calls == [
            ("prefetch", [1, 2, 3]), ("Ping", 1), ("Ping", 2), ("Ping", 3), ("prefetched",),
            ("AskObject", 4),
            ("Ping", 5), ("prefetched",)]  # a run of one: nothing to prefetch
        assert [m[0] for m in transport.messages()] == [1, 2, 3, 5]
        # a run split across two chunks of data is two runs
        handler.calls.clear()
        conn.data_received(msg(6, Packets.Ping) + msg(7, Packets.Ping))
        conn.data_received(msg(8, Packets.Ping))
        assert handler.calls == [("prefetch", [6, 7]), ("Ping", 6), ("Ping", 7), ("prefetched",),
                                 ("Ping", 8), ("prefetched",)]
    run(test, handler_class=Batching)


def test_a_run_before_garbage_is_dispatched_before_the_protocol_error(caplog):
    async def test(conn, transport, handler):
        conn.data_received(HANDSHAKE + msg(1, Packets.Ping) + msg(2, Packets.Ping) + b"\xc1\xc1")
        assert handler.calls == [("prefetch", [1, 2]), ("Ping", 1), ("Ping", 2), ("prefetched",)]
        sent = transport.messages()
        assert [m[0] for m in sent[:2]] == [1, 2] and sent[2][1] == ERROR
        assert conn.closed and conn.close_reason.startswith("protocol error")
    with caplog.at_level(logging.INFO, "neozodb.net"):
        run(test, handler_class=Batching)
