"""The node registry every node keeps: who is in the cluster, where, in
which state.  The master is its source; others mirror it from
``NotifyNodeInformation``.  Pure: connections are opaque attributes."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from neozodb.protocol import NodeStates, NodeTypes, ProtocolError, make_nid, nid_str

# NodeStates letter shown by `neoctl print pt`
STATE_LETTER = {
    NodeStates.RUNNING: "R",
    NodeStates.DOWN: "D",
    NodeStates.PENDING: "P",
    NodeStates.UNKNOWN: "U",
}


@dataclass(eq=False)
class Node:
    type: NodeTypes
    nid: int
    address: tuple[str, int] | None = None
    state: NodeStates = NodeStates.UNKNOWN
    id_timestamp: float | None = None
    conn: Any = None
    devpath: tuple = ()
    # what it announced (protocol/features.py); empty: NEO's, or not seen
    features: frozenset = frozenset()
    # node lists and partition tables (or their changes) a master sent it
    # so far: a TTID block reserved before the last is stale (feature
    # begin-ahead, master/transactions.py Reservations)
    topology: int = 0

    def __repr__(self) -> str:
        return f"<{nid_str(self.nid)} {self.state.name}>"

    @property
    def label(self) -> str:
        return nid_str(self.nid)

    @property
    def running(self) -> bool:
        return self.state is NodeStates.RUNNING

    @property
    def connected(self) -> bool:
        return self.conn is not None and not self.conn.closed

    def notify_topology(self, packet, *args) -> None:
        """Send it a node list or a partition table, or changes of them
        (a master): what it was told before is out of date."""
        self.topology += 1
        self.conn.notify(packet, *args)

    def wire(self) -> tuple:
        addr = None if self.address is None else (self.address[0].encode(), self.address[1])
        return (self.type, addr, self.nid, self.state, self.id_timestamp)


def address_from_wire(addr: tuple | None) -> tuple[str, int] | None:
    if addr is None:
        return None
    host, port = addr
    # from the wire: a host that is not text (or a port out of range) was
    # an internal error (UnicodeDecodeError) of whoever identified the peer
    if not 0 <= port <= 0xFFFF:
        raise ProtocolError("invalid port %r" % port)
    if isinstance(host, bytes):
        try:
            host = host.decode()
        except UnicodeDecodeError:
            raise ProtocolError("invalid host %r" % host[:64]) from None
    return (host, port)


class NodeManager:
    def __init__(self) -> None:
        self.by_nid: dict[int, Node] = {}

    def __iter__(self) -> Iterator[Node]:
        return iter(list(self.by_nid.values()))

    def get(self, nid: int | None) -> Node | None:
        return self.by_nid.get(nid) if nid is not None else None

    def add(self, node: Node) -> Node:
        self.by_nid[node.nid] = node
        return node

    def remove(self, nid: int) -> Node | None:
        return self.by_nid.pop(nid, None)

    def of_type(self, node_type: NodeTypes, state: NodeStates | None = None) -> list[Node]:
        return sorted(
            (n for n in self.by_nid.values()
             if n.type is node_type and (state is None or n.state is state)),
            key=lambda n: n.nid)

    def storages(self, state: NodeStates | None = None) -> list[Node]:
        return self.of_type(NodeTypes.STORAGE, state)

    def free_nid(self, node_type: NodeTypes, taken: Iterable[int] = ()) -> int:
        taken = set(taken) | set(self.by_nid)
        n = 1
        while make_nid(node_type, n) in taken:
            n += 1
        return make_nid(node_type, n)

    def update(self, entries: Iterable[tuple]) -> list[Node]:
        """Apply NotifyNodeInformation entries; return the nodes changed.
        Entries without an id are skipped: NEO's master lists the masters
        of its -m list it never reached by address only, and every node
        here is known by its id."""
        changed = []
        for node_type, addr, nid, state, id_timestamp in entries:
            if nid is None:
                continue
            if state is NodeStates.UNKNOWN:
                node = self.by_nid.pop(nid, None)
                if node is not None:
                    node.state = state
                    changed.append(node)
                continue
            node = self.by_nid.get(nid)
            if node is None:
                node = self.by_nid[nid] = Node(node_type, nid)
            node.type = node_type
            node.address = address_from_wire(addr)
            node.state = state
            node.id_timestamp = id_timestamp
            changed.append(node)
        return changed
