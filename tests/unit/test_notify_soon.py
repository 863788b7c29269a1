"""``Connection.notify_soon``: notifications that wait, a little, for
other output to their peer (the master's invalidations to a client waiting
for its own finish)."""
from __future__ import annotations

import asyncio

import pytest
from test_connection import OID, TID, EofTransport, msg, run

from neozodb.net import output
from neozodb.protocol import HANDSHAKE, Packets, p64

pytestmark = pytest.mark.timeout(30)


def test_notify_soon_leaves_with_the_next_output_in_order():
    """The master's invalidations to a client waiting for its finish: they
    leave with the next thing written to it, before it."""
    async def test(conn, transport, handler):
        conn.data_received(HANDSHAKE)
        writes: list[bytes] = []
        write = transport.write
        transport.write = lambda data: (writes.append(bytes(data)), write(data))
        conn.notify_soon(Packets.InvalidateObjects, TID, [OID])
        conn.notify_soon(Packets.InvalidateObjects, p64(43), [OID])
        assert writes == []
        conn.data_received(msg(7, Packets.Ping))  # answered: everything in one write
        assert len(writes) == 1
        assert [(m[1], m[2]) for m in transport.messages()] == [
            (Packets.InvalidateObjects.code, (TID, (OID,))),
            (Packets.InvalidateObjects.code, (p64(43), (OID,))),
            (Packets.Pong.code, ())]
        conn.answer(8, Packets.Pong)  # nothing waits any more: alone
        assert len(writes) == 2
    run(test)


def test_notify_soon_leaves_alone_within_its_delay(monkeypatch):
    monkeypatch.setattr(output, "SOON", 0.01)

    async def test(conn, transport, handler):
        conn.data_received(HANDSHAKE)
        written = asyncio.Event()
        write = transport.write
        transport.write = lambda data: (written.set(), write(data))
        conn.notify_soon(Packets.InvalidateObjects, TID, [OID])
        assert not written.is_set()
        await asyncio.wait_for(written.wait(), 5)
        assert [m[1] for m in transport.messages()] == [Packets.InvalidateObjects.code]
    run(test)


def test_notify_soon_flushed_by_a_graceful_close_dropped_by_an_abort():
    async def test(conn, transport, handler):
        conn.data_received(HANDSHAKE)
        conn.notify_soon(Packets.InvalidateObjects, TID, [OID])
        conn.close("stopping", flush=True)
        assert [m[1] for m in transport.messages()] == [Packets.InvalidateObjects.code]
    run(test, EofTransport)

    async def aborted(conn, transport, handler):
        conn.data_received(HANDSHAKE)
        conn.notify_soon(Packets.InvalidateObjects, TID, [OID])
        conn.close("going away")
        assert transport.messages() == [] and conn._soon_timer is None
    run(aborted)
