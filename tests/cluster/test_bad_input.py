"""Bad input against real node processes: refused or closed, never fatal."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from neozodb.net.endpoint import RemoteError
from neozodb.net.threaded import ThreadedConnection
from neozodb.protocol import HANDSHAKE, ErrorCodes, NodeTypes, Packets

pytestmark = pytest.mark.timeout(120)


class _Ignore:
    def dispatch(self, conn, msg_id, packet, args):
        pass

    def connection_lost(self, conn):
        pass


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(10)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return True


def _master(cluster):
    return cluster.master_address


def test_wrong_cluster_name_is_refused(cluster):
    conn = ThreadedConnection(_master(cluster), _Ignore())
    conn.connect()
    try:
        with pytest.raises(RemoteError) as e:
            conn.call(Packets.RequestIdentification, NodeTypes.CLIENT, None, None,
                      b"not-this-cluster", None, {}, timeout=10)
        assert e.value.code is ErrorCodes.PROTOCOL_ERROR
        assert "wrong cluster name" in e.value.message
    finally:
        conn.close()


def test_client_with_wrong_name_gets_clear_error(cluster):
    from neozodb.client import NEOStorageError, Storage
    with pytest.raises(NEOStorageError, match="wrong cluster name"):
        Storage(cluster.masters, "other", connect_timeout=5)


@pytest.mark.parametrize("payload", [
    os.urandom(64),
    b"GET / HTTP/1.0\r\n\r\n",
    HANDSHAKE + b"\xc1\xc1\xc1garbage",          # 0xc1 is never valid msgpack
    HANDSHAKE + b"\x93\x00\xcd\xff\xff\x90",      # unknown message code
    b"\x92\xa3NEO\x04",                          # protocol version mismatch
])
@pytest.mark.parametrize("node", ["master", "admin", "storage"])
def test_garbage_closes_that_connection_only(cluster, node, payload):
    if node == "master":
        address = cluster.master_address
    elif node == "admin":
        address = cluster.admin_address
    else:
        ctl = cluster.ctl()
        try:
            storages = ctl.nodes(NodeTypes.STORAGE)
        finally:
            ctl.close()
        host, port = storages[0][1]
        address = (host.decode(), port)
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(payload)
        assert _closed_by_peer(sock)
    # the node keeps serving everybody else
    assert cluster.cluster_state() == "RUNNING"
    from neozodb.client import Storage
    storage = Storage(cluster.masters, cluster.name)
    try:
        assert storage.lastTransaction() is not None
        assert storage.new_oid()
    finally:
        storage.close()


def _run(*argv):
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("argv", [
    ["neozodb.cli.master", "-c", "x", "-b", "127.0.0.1:notaport"],
    ["neozodb.cli.master", "-p", "3"],
    ["neozodb.cli.storage", "-c", "x", "-m", "127.0.0.1:1"],
    ["neozodb.cli.storage", "-c", "x", "-m", "127.0.0.1:1", "-d", "db", "-a", "Oracle"],
    ["neozodb.cli.admin", "-c", "x", "-m", "127.0.0.1:1", "-f", "/nonexistent/neo.conf"],
    ["neozodb.cli.simple", "--storages", "many", "dir"],
    ["neozodb.ctl.neoctl", "-a", "not an address", "print", "cluster"],
])
def test_bad_options_exit_2_with_one_line(argv):
    proc = _run(*argv)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
