"""The first message of every connection to a master: who the peer is.

Everything the peer says about itself is checked before anything is
registered (protocol/values.py): a node type, a NID of that type's
namespace, an address with a host and a port in 1..65535, an ``extra`` of
the expected shape.  The cluster name must match, and is never told back.
A connection identifies once: a second ``RequestIdentification`` is a
protocol error (the role handlers do not accept it, and the one kept here
while a client is held or a storage waits refuses another).  A peer claims
the MASTER role only from an address of this master's ``-m`` list whose
host is the one the connection comes from: otherwise anybody could make
this master yield to, and follow, an address of their choosing.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket

from neozodb.master import election, majority
from neozodb.master.base import BaseHandler
from neozodb.master.handlers import AdminHandler, ClientHandler, SecondaryHandler, StorageHandler
from neozodb.net.connection import HandlerError, NotReady
from neozodb.nodes import Node
from neozodb.protocol import (
    ClusterStates,
    ErrorCodes,
    NodeStates,
    NodeTypes,
    Packets,
    ProtocolError,
    nid_type,
)
from neozodb.protocol.features import FEATURES, NO_FEATURES, announced, greet
from neozodb.protocol.values import check_identification, host_of

log = logging.getLogger("neozodb.master")


async def resolve_masters(masters: list[tuple[str, int]]) -> set[tuple[str, int]]:
    """The -m list as (IP, port) too: a master announces the address it
    listens on, which is an IP where the list may hold a host name."""
    loop = asyncio.get_running_loop()
    allowed = set(masters)
    for host, port in masters:
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            continue  # unresolvable now: only its literal form is accepted
        allowed.update((info[4][0], port) for info in infos)
    return allowed


def same_host(a: str, b: str) -> bool:
    """Whether two host strings are one host (an IPv4 address seen by a
    dual-stack socket as ::ffff:a.b.c.d included)."""
    try:
        ips = [ipaddress.ip_address(a), ipaddress.ip_address(b)]
    except ValueError:
        return a == b
    ips = [getattr(ip, "ipv4_mapped", None) or ip for ip in ips]
    return ips[0] == ips[1]


class IdentificationHandler(BaseHandler):
    def RequestIdentification(self, conn, msg_id, node_type, nid, address, name, id_timestamp,
                              extra):
        app = self.app
        first = getattr(conn, "identification", None)
        if first is not None and first != msg_id:
            raise ProtocolError("identification already requested on this connection")
        conn.identification = msg_id
        if name != app.name_bytes:
            # the name is a shared secret of sorts: not told back
            log.warning("%s: refused %s from %s: wrong cluster name", app.label,
                        getattr(node_type, "name", node_type), conn.peer)
            raise HandlerError("wrong cluster name", ErrorCodes.PROTOCOL_ERROR) from None
        try:
            peer = check_identification(node_type, nid, address, id_timestamp, extra)
        except ProtocolError as e:
            log.warning("%s: refused identification from %s: %s", app.label, conn.peer, e)
            raise
        if app.primary_address is not None:
            app.redirect(conn, msg_id, app.primary_address)
            return
        if node_type is not NodeTypes.MASTER and not majority.may_lead(app):
            # not a primary anybody may use yet: they try the other masters
            app.redirect(conn, msg_id, None)
            return
        state = NodeStates.RUNNING
        if node_type is NodeTypes.STORAGE:
            if app.stopping:
                raise NotReady("cluster is stopping")
            taken = app.pt.nids() if app.pt is not None else ()
            if nid is None:
                nid = app.nm.free_nid(NodeTypes.STORAGE, taken)
            else:
                other = app.nm.get(nid)
                if other is not None and other.connected:
                    raise HandlerError("a storage with id %s is already connected" % other.label,
                                       ErrorCodes.PROTOCOL_ERROR)
            known = app.pt is not None and nid in app.pt.nids()
            if app.cluster_state is ClusterStates.RECOVERING or not known:
                state = NodeStates.PENDING
            handler = StorageHandler(app)
        elif node_type is NodeTypes.CLIENT:
            if app.stopping:
                raise NotReady("cluster is stopping")
            if app.cluster_state is not ClusterStates.RUNNING:
                # held until the cluster runs (or refused after a while),
                # rather than bounced into a reconnection loop
                app.hold_client(conn, lambda: self.RequestIdentification(
                    conn, msg_id, node_type, nid, address, name, id_timestamp, extra),
                    lambda why: conn.error(msg_id, ErrorCodes.NOT_READY, why))
                return
            nid = app.temporary_nid(NodeTypes.CLIENT)
            handler = ClientHandler(app, read_only=bool(extra.get(b"read_only")))
        elif node_type is NodeTypes.ADMIN:
            nid = app.temporary_nid(NodeTypes.ADMIN)
            handler = AdminHandler(app)
        elif node_type is NodeTypes.MASTER:
            self._check_master(conn, peer)
            if id_timestamp is not None:  # a master playing primary
                if id_timestamp == app.election_time and nid == app.nid:
                    raise HandlerError("this is myself", ErrorCodes.PROTOCOL_ERROR)
                if app.electing and election.earlier(
                        (id_timestamp, peer), (app.election_time, app.address)):
                    app.redirect(conn, msg_id, peer)
                    app.yield_to(peer)
                    return
            nid = self._master_nid(nid, peer)
            handler = SecondaryHandler(app)
        else:
            raise ProtocolError("bad node type")
        node = app.nm.get(nid)
        if node is None:
            node = app.nm.add(Node(node_type, nid))
        node.address = peer
        node.state = state
        node.id_timestamp = app.id_timestamp()
        node.conn = conn
        if node_type is NodeTypes.STORAGE:
            if extra:
                node.devpath = tuple(extra.get(b"devpath") or ())
            # an importing storage reports again once operational
            app.import_status.pop(node.label, None)
        conn.nid = nid
        conn.node = node
        conn.handler = handler
        greet(conn, extra, app.client_features() if node_type is NodeTypes.CLIENT else FEATURES)
        node.features = announced(extra) or NO_FEATURES
        conn.answer(msg_id, Packets.AcceptIdentification, NodeTypes.MASTER, app.nid, nid)
        log.info("%s: %s identified (%s, %s)", app.label, node.label, conn.peer, state.name)
        app.send_node_list(node)
        conn.notify(Packets.NotifyClusterInformation, app.cluster_state)
        app.broadcast_nodes([node], exclude=node)
        if node_type is NodeTypes.STORAGE:
            if app.cluster_state is ClusterStates.RECOVERING:
                app.ask_recovery(node)
            elif app.cluster_state is not ClusterStates.STOPPING:
                app.push_missed_truncation(node)
                app.send_pt(node)
                if state is NodeStates.RUNNING and app.cluster_state is ClusterStates.RUNNING:
                    app.start_storage(node)
        else:
            app.send_pt(node)
        app.changed()

    def _check_master(self, conn, address: tuple[str, int] | None) -> None:
        """Only a master of our -m list, connecting from its own host."""
        app = self.app
        if address is None or address not in app.allowed_masters:
            log.warning("%s: refused master identification from %s: %s is not in the list"
                        " of masters", app.label, conn.peer,
                        "no address" if address is None else "%s:%s" % address)
            raise HandlerError("not a master of this cluster", ErrorCodes.PROTOCOL_ERROR)
        if not same_host(address[0], host_of(conn.peer)):
            log.warning("%s: refused master identification from %s: it claims %s:%s",
                        app.label, conn.peer, *address)
            raise HandlerError("announced address is not the connection's",
                               ErrorCodes.PROTOCOL_ERROR)

    def _master_nid(self, nid: int | None, address) -> int:
        """The id a secondary proposes, unless another master has it; a
        master that reconnects from the same address replaces itself.
        Without a proposal (NEO's masters restart without one), the master
        known at that address gets its id back: two entries with one
        address would make NEO's nodes take one for the other."""
        app = self.app
        if nid is not None and nid_type(nid) is NodeTypes.MASTER and nid != app.nid:
            other = app.nm.get(nid)
            if other is None or not other.connected:
                return nid
            if other.address == address:
                old, other.conn = other.conn, None
                old.close("replaced by a new connection")
                return nid
        for other in app.nm.of_type(NodeTypes.MASTER):
            if other.address == address and other.nid != app.nid and not other.connected:
                return other.nid
        return app.nm.free_nid(NodeTypes.MASTER, {app.nid})
