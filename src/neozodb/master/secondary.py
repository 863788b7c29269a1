"""The secondary master role: follow the primary and mirror its state.

A secondary keeps one connection to the primary, which sends it what it
sends storages (node list, partition table, cluster state) plus an
``InvalidateObjects`` per commit; it asks ``AskLastIDs`` once.  When the
primary is lost, the secondary plays primary again starting from this
copy (``MasterApp.take_over``) rather than only from what storages report.
It exits when the primary says the cluster is STOPPING or that it is DOWN.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from neozodb.master import majority
from neozodb.master.base import BaseHandler
from neozodb.net.bootstrap import FollowsPrimary
from neozodb.net.connection import Connection, ConnectionClosed, RemoteError, connect
from neozodb.protocol import ClusterStates, NodeStates, NodeTypes, Packets, nid_str, u64
from neozodb.protocol.features import ANNOUNCEMENT
from neozodb.pt import PartitionTable

if TYPE_CHECKING:
    from neozodb.master.app import MasterApp

log = logging.getLogger("neozodb.master")

IDENTIFY_TIMEOUT = 10.0


class PrimaryHandler(FollowsPrimary, BaseHandler):
    """On a secondary (or a master asking for election), the connection to
    the primary.  State messages count only on the connection followed."""

    def _followed(self, conn) -> bool:
        return conn is self.app.primary_conn

    def NotifyNodeInformation(self, conn, msg_id, timestamp, entries):
        app = self.app
        if not self._followed(conn):
            return
        mine = [e for e in entries if e[2] == app.nid]
        if any(e[3] in (NodeStates.DOWN, NodeStates.UNKNOWN) for e in mine):
            log.info("%s: told to stop by the primary", app.label)
            app.stopping = True
            app.exit_now()
            return
        app.nm.update(e for e in entries if e[2] != app.nid)

    def SendPartitionTable(self, conn, msg_id, ptid, replicas, rows):
        if self._followed(conn) and ptid is not None:
            pt = PartitionTable(len(rows), replicas)
            pt.load(ptid, replicas, rows)
            self.app.pt = pt
            self.app.num_partitions = len(rows)

    def NotifyPartitionChanges(self, conn, msg_id, ptid, replicas, changes):
        pt = self.app.pt
        if self._followed(conn) and pt is not None:
            pt.apply_changes(ptid, replicas, changes)

    def NotifyClusterInformation(self, conn, msg_id, state):
        app = self.app
        if not self._followed(conn):
            return
        app.cluster_state = state
        if state is ClusterStates.STOPPING:
            log.info("%s: the cluster is stopping", app.label)
            app.stopping = True
            app.exit_now()

    def InvalidateObjects(self, conn, msg_id, tid, oids):
        if self._followed(conn):
            tm = self.app.tm
            tm.last_tid = max(tm.last_tid, u64(tid))
            for oid in oids:
                tm.saw_oid(u64(oid))


async def follow(app: MasterApp, address: tuple[str, int], conn: Connection | None) -> None:
    """Be the secondary of the primary at ``address`` until it is lost.
    ``conn`` is the election connection it accepted, if any."""
    try:
        if conn is None:
            await majority.quiet(app)  # counted by no primary before it ends
            conn = await asyncio.wait_for(connect(app, PrimaryHandler(app), address),
                                          IDENTIFY_TIMEOUT)
            app.primary_conn = conn
            addr = (app.address[0].encode(), app.address[1])
            node_type, primary_nid, my_nid = await asyncio.wait_for(conn.ask(
                Packets.RequestIdentification, NodeTypes.MASTER, app.nid, addr, app.name_bytes,
                None, ANNOUNCEMENT), IDENTIFY_TIMEOUT)
            if node_type is not NodeTypes.MASTER:
                raise ConnectionClosed("peer is not a master")
            conn.nid = primary_nid
            app.nid = my_nid
        log.info("%s: secondary of %s at %s:%s", app.label, nid_str(conn.nid), *address)
        if b"mirror" in conn.peer_features:
            last_tid, last_oid, _ = await conn.ask(Packets.AskLastIDs)
            tm = app.tm
            if last_tid is not None:
                tm.last_tid = max(tm.last_tid, u64(last_tid))
            if last_oid is not None:
                tm.saw_oid(u64(last_oid))
        else:
            log.info("%s: %s is NEO's: nothing to mirror, a take-over will recover",
                     app.label, nid_str(conn.nid))
        await asyncio.shield(conn.closed_future)  # a cancelled follow leaves it alone
        log.warning("%s: lost the primary master (%s)", app.label, conn.close_reason)
        majority.lost_primary(app, conn)
    except (OSError, ConnectionClosed, RemoteError, asyncio.TimeoutError) as e:
        log.warning("%s: cannot follow the primary at %s:%s: %s", app.label, *address, e)
    finally:
        if conn is not None:
            conn.close("primary lost")
        app.primary_conn = None
        app.primary_address = None
