"""A client connecting to a storage that does not answer (its SYNs
dropped: cut off from this client only) must not block the rest of the
client: the master connection's reader drops a storage the master says is
down (``drop_storage``) at once, not after the connection attempt, which
held the lock it needs (the master then dropped the client for not
answering its keep-alive; found by tests/net/test_storage_cutoff.py).  The
attempt gives up after CONNECT_TIMEOUT, and the storage is not tried again
for UNREACHABLE_PAUSE: the next attempt fails at once.

The storage that does not answer is a listening socket whose backlog is
full: the kernel drops further SYNs, as a cut network does."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from neozodb.cli.cluster import wait_until
from neozodb.client.app import UNREACHABLE_PAUSE, ClientApp
from neozodb.net.bootstrap import CONNECT_TIMEOUT
from neozodb.net.endpoint import ConnectionClosed
from neozodb.protocol import NodeStates, NodeTypes, make_nid

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def silent_address():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    fillers = []
    address = server.getsockname()
    # fill the accept queue: the next connection attempts hang
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(address)
        fillers.append(s)
    try:
        yield address
    finally:
        for s in fillers:
            s.close()
        server.close()


def test_drop_storage_while_connecting(silent_address):
    app = ClientApp([("127.0.0.1", 1)], "test", keepalive=6)
    nid = make_nid(NodeTypes.STORAGE, 2)
    app.nm.update([(NodeTypes.STORAGE, silent_address, nid, NodeStates.RUNNING, None)])
    outcome = []

    def connect():
        start = time.monotonic()
        try:
            app.storage_conn(nid)
            outcome.append(("connected", time.monotonic() - start))
        except (ConnectionClosed, OSError) as e:
            outcome.append((type(e).__name__, time.monotonic() - start))
    try:
        thread = threading.Thread(target=connect)
        thread.start()
        # the attempt under way (it holds its storage's connecting lock)
        wait_until(lambda: nid in app._connecting and app._connecting[nid].locked(), 5,
                   "the connection attempt")
        start = time.monotonic()
        app.drop_storage(nid)  # what the master connection's reader does
        assert time.monotonic() - start < 1.0, "drop_storage waited for the connection"
        thread.join(CONNECT_TIMEOUT + 5)
        kind, took = outcome[0]
        assert kind != "connected" and took < CONNECT_TIMEOUT + 1, outcome
        # not tried again for a while: the next attempt fails at once
        start = time.monotonic()
        with pytest.raises(ConnectionClosed, match="unreachable"):
            app.storage_conn(nid)
        assert time.monotonic() - start < 1.0
        assert UNREACHABLE_PAUSE > CONNECT_TIMEOUT
    finally:
        app.close()
