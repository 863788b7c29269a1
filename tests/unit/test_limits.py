"""Resource limits of the codec and of asyncio connections (no sockets):
first-message budget, container lengths, backpressure, connection cap,
identification deadline."""
from __future__ import annotations

import asyncio
import logging
import struct

import pytest

from neozodb.net import limits as limits_module
from neozodb.net.connection import Connection, Handler
from neozodb.protocol import HANDSHAKE, Decoder, Packets, ProtocolError, encode
from neozodb.protocol.codec import FIRST_BYTES_LIMIT, MAX_ARRAY_LEN

pytestmark = pytest.mark.timeout(30)

PING = encode(0, Packets.Ping.code, ())


def test_restricted_decoder_passes_small_messages_byte_by_byte():
    d = Decoder(first_limit=100)
    for b in PING + PING:
        d.feed(bytes([b]))
    assert len(list(d)) == 2


def test_restricted_decoder_refuses_more_than_its_budget():
    d = Decoder(first_limit=100)
    d.feed(bytes([0x93, 0x00, 0x01, 0x91, 0xc5, 0x10, 0x00]))  # a 4 KiB bin begins
    with pytest.raises(ProtocolError, match="more than 100 bytes before identification"):
        d.feed(bytes(200))
    with pytest.raises(ProtocolError):  # broken for good
        d.feed(PING)


def test_lifted_decoder_takes_the_rest_in_order():
    d = Decoder(first_limit=100)
    big = encode(1, Packets.Ping.code, ())
    d.feed(PING + big[:2])
    assert [m[0] for m in d] == [0]
    d.lift_limit()
    d.feed(big[2:] + bytes(0))
    assert [m[0] for m in d] == [1]
    d.feed(encode(2, Packets.AskNewOIDs.code, (1,)) * 1000)  # > 100 bytes now fine
    assert len(list(d)) == 1000


def test_restricted_decoder_processes_what_precedes_garbage():
    d = Decoder(first_limit=1000)
    d.feed(PING + b"\xc1")
    it = iter(d)
    assert next(it)[0] == 0
    with pytest.raises(ProtocolError, match="malformed"):
        next(it)


def test_restricted_decoder_refuses_deep_nesting_without_building_it():
    d = Decoder(first_limit=FIRST_BYTES_LIMIT)
    with pytest.raises(ProtocolError):
        d.feed(b"\x91" * 2000)
        list(d)


def test_container_headers_over_the_limits_are_refused():
    d = Decoder()
    d.feed(b"\x93\x00\x02\xdd" + struct.pack(">I", MAX_ARRAY_LEN + 1))
    with pytest.raises(ProtocolError, match="max_array_len"):
        list(d)


# -- Connection ------------------------------------------------------------------------


class Transport(asyncio.Transport):
    def __init__(self):
        super().__init__()
        self.data = bytearray()
        self.calls: list[str] = []
        self.paused = False

    protocol = None
    high = 1 << 30
    writing_paused = False

    def set_write_buffer_limits(self, high, low):
        self.high = high

    def write(self, data):
        # as asyncio's transports: the protocol learns at once that its
        # output crossed the high-water mark
        self.data += data
        if self.protocol and not self.writing_paused and len(self.data) > self.high:
            self.writing_paused = True
            self.protocol.pause_writing()

    def drain(self):
        self.data.clear()
        if self.writing_paused:
            self.writing_paused = False
            self.protocol.resume_writing()

    def get_write_buffer_size(self):
        return len(self.data)

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False

    def is_closing(self):
        return "abort" in self.calls or "close" in self.calls

    def abort(self):
        self.calls.append("abort")

    def close(self):
        self.calls.append("close")

    def get_extra_info(self, name, default=None):
        return ("192.0.2.1", 1234) if name == "peername" else default


class App:
    label = "S1"


class Pinged(Handler):
    def __init__(self):
        self.pings = 0

    def Ping(self, conn, msg_id):
        self.pings += 1
        conn.answer(msg_id, Packets.AnswerNewOIDs, [b"\0" * 8] * 20000)  # 200 KB


def test_backpressure_stops_processing_until_drained():
    async def main():
        handler = Pinged()
        conn = Connection(App(), handler, keepalive=0)
        transport = Transport()
        transport.protocol = conn
        conn.connection_made(transport)
        conn.data_received(HANDSHAKE)
        conn.handler = handler
        conn.data_received(PING * 10)
        # 2 answers exceed the high-water mark: the rest waits
        assert handler.pings == 2 and transport.paused
        conn.data_received(PING)  # in flight when we paused: kept
        assert handler.pings == 2
        for _ in range(20):
            transport.drain()
            if handler.pings == 11:
                break
        assert handler.pings == 11 and not transport.paused
        assert not conn.closed
    asyncio.run(main())


def test_connections_over_the_cap_are_refused(caplog, monkeypatch):
    monkeypatch.setattr(Connection, "max_accepted", 2)
    monkeypatch.setattr(limits_module, "_refusals", [0.0, 0])

    async def main():
        app = App()
        conns = [Connection(app, Handler(), keepalive=0) for _ in range(3)]
        transports = [Transport() for _ in conns]
        for c, t in zip(conns, transports, strict=True):
            c.connection_made(t)
        assert [t.calls for t in transports] == [[], [], ["abort"]]
        assert conns[2].closed
        conns[0].close("bye")
        c = Connection(app, Handler(), keepalive=0)
        t = Transport()
        c.connection_made(t)  # a place was freed
        assert t.calls == []
    with caplog.at_level(logging.WARNING, "neozodb.net"):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["S1: refused connection from 192.0.2.1:1234: 2 connections already (cap 2)"]


def test_unidentified_connection_closed_after_deadline(caplog, monkeypatch):
    monkeypatch.setattr(Connection, "identify_timeout", 0.05)

    async def main():
        silent = Connection(App(), Handler(), keepalive=0)
        silent.connection_made(Transport())
        identified = Connection(App(), Handler(), keepalive=0)
        identified.connection_made(Transport())
        identified.handler = Handler()
        await asyncio.wait_for(silent.closed_future, 5)
        assert not identified.closed
    with caplog.at_level(logging.WARNING, "neozodb.net"):
        asyncio.run(main())
    assert any("not identified after 0.05 s" in r.getMessage() for r in caplog.records)
