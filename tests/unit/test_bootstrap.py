"""Following a secondary master's NotPrimaryMaster redirection; the
connection to the master once the node stops."""
from __future__ import annotations

import asyncio

import pytest

from neozodb.master.election import earlier
from neozodb.net.bootstrap import FollowsPrimary, follow_master, next_masters
from neozodb.net.handler import Handler

pytestmark = pytest.mark.timeout(10)


class FakeConn:
    closed_with = None

    def __init__(self, peer="10.0.0.1:1"):
        self.peer = peer

    def close(self, reason=""):
        self.closed_with = reason


def test_redirect_names_the_primary_and_other_masters():
    conn = FakeConn()
    FollowsPrimary().NotPrimaryMaster(conn, 0, 1, [(b"10.0.0.1", 1), (b"10.0.0.3", 3)])
    assert conn.closed_with == "not the primary master"
    masters = [("10.0.0.1", 1), ("10.0.0.2", 2)]
    assert next_masters(masters, conn) == [("10.0.0.3", 3), ("10.0.0.1", 1)]
    # tried this time only: the configured list is left alone
    assert masters == [("10.0.0.1", 1), ("10.0.0.2", 2)]


def test_redirect_from_a_master_not_configured_is_ignored():
    conn = FakeConn("10.0.0.3:3")  # reached through a redirection
    FollowsPrimary().NotPrimaryMaster(conn, 0, 0, [(b"10.6.6.6", 6)])
    assert next_masters([("10.0.0.1", 1), ("10.0.0.2", 2)], conn) == []


def test_invalid_addresses_are_dropped():
    conn = FakeConn()
    FollowsPrimary().NotPrimaryMaster(conn, 0, 0, [(b"10.0.0.9", 70000), (b"10.0.0.3", 3)])
    assert conn.redirect is None
    assert next_masters([("10.0.0.1", 1)], conn) == [("10.0.0.3", 3)]


def test_no_primary_known_or_bad_index():
    for primary in (None, 5, -1):
        conn = FakeConn("h:1")
        FollowsPrimary().NotPrimaryMaster(conn, 0, primary, [(b"h", 1)])
        assert next_masters([("h", 1)], conn) == [("h", 1)]


def test_refusal_without_redirect():
    assert next_masters([("h", 1)], FakeConn()) == []


def test_earlier_claim_wins_ties_by_address():
    assert earlier((1.0, ("b", 2)), (2.0, ("a", 1)))
    assert not earlier((2.0, ("a", 1)), (1.0, ("b", 2)))
    assert earlier((1.0, ("a", 1)), (1.0, ("a", 2)))
    assert not earlier((1.0, ("a", 2)), (1.0, ("a", 2)))


class App:
    label = "S1"


def test_a_stopped_follow_leaves_the_connection_to_close_gracefully():
    """The node cancels its master cycle when it stops, then waits for the
    master to close the connection it closed (handling what the master
    still sends, the unlock of the last commit, say): cancelling the cycle
    must not cancel the connection's future (it did, and the node closed
    its database at once: the unlock was lost)."""
    async def main():
        server = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
        identified = asyncio.get_running_loop().create_future()

        async def identify(conn):
            identified.set_result(conn)
        cycle = asyncio.ensure_future(follow_master(
            App(), [server.sockets[0].getsockname()[:2]], Handler, identify, lambda: None))
        conn = await asyncio.wait_for(identified, 5)
        cycle.cancel()
        await asyncio.gather(cycle, return_exceptions=True)
        try:
            assert not conn.closed_future.done()
        finally:
            conn.close()
            server.close()
        assert conn.closed_future.done() and not conn.closed_future.cancelled()
    asyncio.run(main())
