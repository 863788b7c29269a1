"""Helpers of the tests that speak to a cluster's nodes on the wire: where
they listen, a handler that ignores what comes, the messages a node sent
before it closed."""
from __future__ import annotations

import socket

from neozodb.protocol import HANDSHAKE, Decoder, NodeTypes


def storage_address(cluster) -> tuple[str, int]:
    """Where the cluster's first storage listens (as its admin tells)."""
    ctl = cluster.ctl()
    try:
        host, port = ctl.nodes(NodeTypes.STORAGE)[0][1]
    finally:
        ctl.close()
    return (host.decode() if isinstance(host, bytes) else host, port)


def node_address(cluster, node: str) -> tuple[str, int]:
    """Where the cluster's "master", "admin" or (first) "storage" listens."""
    if node == "master":
        return cluster.master_address
    if node == "admin":
        return cluster.admin_address
    assert node == "storage", node
    return storage_address(cluster)


class Silent:
    """Handler of a raw ThreadedConnection that ignores what comes."""

    def dispatch(self, conn, msg_id, packet, args):
        pass

    def connection_lost(self, conn):
        pass


def messages_until_closed(sock: socket.socket, timeout: float = 10) -> list:
    """The messages the node sent on ``sock`` (after its handshake) until it
    closed the connection; socket.timeout if it does not within
    ``timeout`` seconds of silence."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    assert data[:len(HANDSHAKE)] == HANDSHAKE
    decoder = Decoder()
    decoder.feed(data[len(HANDSHAKE):])
    return list(decoder)
