"""What nodes keep for a peer that has gone: dropped with it."""
from __future__ import annotations

import asyncio

import pytest

from callbacks import callbacks_ran
from neozodb.master.app import MasterApp
from neozodb.net.connection import Connection, Handler

pytestmark = pytest.mark.timeout(30)


class Transport(asyncio.Transport):
    def write(self, data):
        pass

    def abort(self):
        pass

    def get_extra_info(self, name, default=None):
        return ("192.0.2.1", 1234) if name == "peername" else default


def _conn(app) -> Connection:
    conn = Connection(app, Handler(), keepalive=0)
    conn.connection_made(Transport())
    return conn


def test_held_client_forgotten_when_it_goes():
    async def main():
        app = MasterApp("x", ("127.0.0.1", 0))
        conns = [_conn(app) for _ in range(3)]
        for c in conns:
            app.hold_client(c, lambda: None, lambda why: None)
            assert c._id_timer is None  # the hold timeout replaces the deadline
        conns[1].close("gone")
        await callbacks_ran(conns[1].closed_future)  # the master's, added before, ran
        assert [e[0] for e in app.held_clients] == [conns[0], conns[2]]
        for c in conns:
            c.close("test over")
        for c in conns:
            await callbacks_ran(c.closed_future)
        assert app.held_clients == []
    asyncio.run(main())


def test_final_tid_waiters_of_a_lost_client_are_dropped():
    async def main():
        app = MasterApp("x", ("127.0.0.1", 0))
        a, b = _conn(app), _conn(app)
        app.final_tid_waiters = {1: [(a, 1), (b, 2), (a, 3)], 2: [(a, 4)]}
        from neozodb.nodes import Node
        from neozodb.protocol import NodeStates, NodeTypes, make_nid
        node = app.nm.add(Node(NodeTypes.CLIENT, make_nid(NodeTypes.CLIENT, 1)))
        node.state, node.conn = NodeStates.RUNNING, a
        a.close("gone")
        app.node_lost(node)
        assert app.final_tid_waiters == {1: [(b, 2)]}
        b.close("test over")
    asyncio.run(main())


def test_storage_delayed_requests_of_closed_connections_are_pruned():
    from types import SimpleNamespace

    from neozodb.storage.app import StorageApp

    fake = SimpleNamespace(delayed=[], _delayed_prune_at=1024)
    live = SimpleNamespace(conn=SimpleNamespace(closed=False))
    for _ in range(10):
        StorageApp.delay(fake, b"", live)
    gone = SimpleNamespace(conn=SimpleNamespace(closed=True))
    for _ in range(100_000):  # a peer asking again and again, then leaving
        StorageApp.delay(fake, b"", gone)
    assert len(fake.delayed) < 1100
    assert sum(1 for _, r in fake.delayed if r is live) == 10
