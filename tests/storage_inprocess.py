"""A storage node driven in-process (no network, no event loop of its
own beyond the one ``run`` starts): handlers called directly with
connections that record what the storage answers."""
from __future__ import annotations

import asyncio

from neozodb.protocol import CellStates, NodeTypes, make_nid
from neozodb.storage.app import StorageApp
from neozodb.storage.backends.sqlite import SQLiteBackend

PARTITIONS = 4


class FakeConn:
    """A connection that records what the storage answers or sends."""

    def __init__(self, nid=None, handler=None) -> None:
        self.nid = nid
        self.closed = False
        self.sent: list = []
        self.handler = handler  # what replays a delayed request of ours
        self.peer_features: frozenset = frozenset()
        self.label = "fake %s" % nid

    def _request_received(self, msg_id, packet, args):
        self.handler.dispatch(self, msg_id, packet, args)

    def answer(self, msg_id, packet, *args):
        self.sent.append((packet, args))

    def notify(self, packet, *args):
        self.sent.append((packet, args))

    def error(self, msg_id, code, message):
        self.sent.append((code, message))

    def close(self, reason="", flush=False):
        self.closed = True

    def hold(self):  # output kept for the group commit: recorded all the same
        pass

    def release(self):
        pass


def run(tmp_path, scenario, rows=None) -> None:
    """``scenario(app)`` (a function, or a coroutine function) with a storage node (nid S1) on a new SQLite
    database, operational under a master that is a FakeConn
    (``app.master_conn``).  ``rows(nid)``: its partition table's rows
    (default: PARTITIONS partitions, each with one UP_TO_DATE cell, ours)."""
    async def main():
        backend = SQLiteBackend(str(tmp_path / "storage.sqlite"))
        backend.open()
        app = StorageApp("test", [], backend)
        app.nid = make_nid(NodeTypes.STORAGE, 1)
        app.set_pt(1, 1 if rows else 0, rows(app.nid) if rows else
                   [[(app.nid, CellStates.UP_TO_DATE)]] * PARTITIONS)
        master = FakeConn()
        app.start_operation(master)
        app.master_conn = master
        app.packer.stale = False  # its pack orders are known: none
        try:
            result = scenario(app)
            if asyncio.iscoroutine(result):  # a scenario that lets the loop run
                await result
        finally:
            app.replicator.stop()
            app.packer.stop()
            backend.close()
    asyncio.run(main())
