"""The admin's identification with a master that goes away half-way: what
the master sent on that connection (its partition table) is forgotten
with it.  Found in a clean-clone run: the connection was reset while the
admin waited for the cluster state, after the table had arrived; the master
was then killed, no connection followed, and the admin kept serving the
old table (tests/cluster/test_neoctl.py timed out waiting for it to
forget)."""
from __future__ import annotations

import asyncio

import pytest

from neozodb.admin.app import AdminApp
from neozodb.net.endpoint import ConnectionClosed
from neozodb.protocol import NodeTypes, Packets, make_nid

pytestmark = pytest.mark.timeout(30)

MASTER, ADMIN = make_nid(NodeTypes.MASTER, 1), make_nid(NodeTypes.ADMIN, 2)


class ResetAfterTheTable:
    """A master connection: identification accepted, then the table
    arrives, then the connection is reset before the cluster state."""

    def __init__(self, app: AdminApp) -> None:
        self.app = app
        self.nid = None

    def ask(self, packet, *args, callback=None):
        if packet is Packets.RequestIdentification:
            future = asyncio.get_running_loop().create_future()
            future.set_result((NodeTypes.MASTER, MASTER, ADMIN))
            return future
        assert packet is Packets.AskClusterState
        self.app.pt = object()  # what SendPartitionTable would have left
        callback(self, None, ConnectionClosed("reset by peer"))
        return None


def test_a_table_received_on_a_connection_that_failed_is_forgotten():
    app = AdminApp("test", [("127.0.0.1", 1)], ("127.0.0.1", 0))
    app.address = ("127.0.0.1", 0)

    async def identify():
        with pytest.raises(ConnectionClosed, match="reset by peer"):
            await app._identify(ResetAfterTheTable(app))

    asyncio.run(identify())
    assert app.master_conn is None
    assert app.pt is None
    assert app.cluster_state is None
