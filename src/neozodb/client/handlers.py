"""What the cluster sends the client unasked, in the thread reading the
connection (``neozodb.net.threaded``: its reader thread, or an
application thread waiting for an answer on it): the master's notifications (node list, partition
table, invalidations), a storage's deadlock notices, lost connections; and
``Changes``, the oids committed while a pack's mark phase runs."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from neozodb.net.bootstrap import FollowsPrimary
from neozodb.net.connection import Handler
from neozodb.protocol import NodeStates, NodeTypes
from neozodb.pt import PartitionTable

if TYPE_CHECKING:
    from neozodb.client.app import ClientApp

log = logging.getLogger("neozodb.client")


class MasterHandler(FollowsPrimary, Handler):
    def __init__(self, app: ClientApp) -> None:
        self.app = app

    # A TTID block the master reserved before a node list, a partition
    # table or a change of them is refused: forgotten at once
    # (client/begin.py, Reserved).

    def NotifyNodeInformation(self, conn, msg_id, timestamp, entries):
        app = self.app
        app.reserved.clear()
        with app.lock:
            changed = app.nm.update(entries)
        app.cells_changed()
        for node in changed:
            if node.type is NodeTypes.STORAGE and node.state is not NodeStates.RUNNING:
                app.drop_storage(node.nid)
        app.wake()

    def SendPartitionTable(self, conn, msg_id, ptid, replicas, rows):
        pt = PartitionTable(len(rows), replicas)
        pt.load(ptid, replicas, rows)
        self.app.reserved.clear()
        self.app.pt = pt
        self.app.cells_changed()
        self.app.wake()

    def NotifyPartitionChanges(self, conn, msg_id, ptid, replicas, changes):
        self.app.reserved.clear()
        self.app.pt.apply_changes(ptid, replicas, changes)
        self.app.cells_changed()
        self.app.wake()

    def NotifyClusterInformation(self, conn, msg_id, state):
        self.app.cluster_state = state

    def InvalidateObjects(self, conn, msg_id, tid, oids):
        self.app.invalidate(tid, oids)

    def StopOperation(self, conn, msg_id):
        # The master closes the connection next, but may still answer on it
        # meanwhile: nothing asked from now on may be taken for an answer
        # of the cluster as it will run (a sync must reconnect).
        log.warning("%s: cluster stopped operation", self.app.label)
        conn.close("cluster stopped operation")

    def connection_lost(self, conn) -> None:
        self.app.master_lost(conn)


class StorageHandler(Handler):
    def __init__(self, app: ClientApp) -> None:
        self.app = app

    def NotifyDeadlock(self, conn, msg_id, ttid, oid):
        self.app.deadlock(conn, ttid, oid)

    def connection_lost(self, conn) -> None:
        self.app.storage_lost(conn)


class Changes:
    """Oids committed since a ``ClientApp.watch_changes``."""

    def __init__(self, lock) -> None:
        self.lock = lock
        self.oids: set[bytes] = set()

    def take(self) -> set[bytes]:
        with self.lock:
            oids, self.oids = self.oids, set()
        return oids
