"""Bad input against real node processes: refused or closed, never fatal."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from neozodb.net.endpoint import RemoteError
from neozodb.net.threaded import ThreadedConnection
from neozodb.protocol import HANDSHAKE, ErrorCodes, NodeTypes, Packets, encode
from wire import Silent, messages_until_closed, node_address

pytestmark = pytest.mark.timeout(120)


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


def _exchange(address, payload: bytes) -> list:
    """Send ``payload``, read until the peer closes (within 10 s) and
    return the messages it sent after its handshake."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(payload)
        return messages_until_closed(sock)


def _identify(node_type, name, extra=None) -> bytes:
    return HANDSHAKE + encode(0, Packets.RequestIdentification.code,
                              (node_type, None, None, name, None, extra or {}))


def _protocol_error(messages, msg_id=0) -> str:
    """The single message received must be Error(PROTOCOL_ERROR); its text."""
    assert len(messages) == 1, messages
    (got_id, code, (error, text)), = messages
    assert (got_id, code, error) == (msg_id, Packets.Error.code, ErrorCodes.PROTOCOL_ERROR.value)
    return text.decode()


@pytest.mark.parametrize("node", ["master", "admin", "storage"])
def test_wrong_cluster_name_answers_then_closes(cluster, node):
    node_type = NodeTypes.ADMIN if node == "admin" else NodeTypes.CLIENT
    text = _protocol_error(_exchange(node_address(cluster, node), _identify(node_type, b"not-this-cluster")))
    assert text.startswith("wrong cluster name")
    assert cluster.cluster_state() == "RUNNING"


@pytest.mark.parametrize("node", ["master", "admin", "storage"])
def test_malformed_message_answers_protocol_error_then_closes(cluster, node):
    address = node_address(cluster, node)
    # 0xc1 is never valid msgpack
    assert "malformed" in _protocol_error(_exchange(address, HANDSHAKE + b"\xc1"))
    # a well-formed message that nobody may send there: answered with its msg_id
    unexpected = HANDSHAKE + encode(5, Packets.AskTIDs.code, (0, 1, 0))
    # (the admin wants an identification first: only neoctl talks to it)
    expected = "identify first" if node == "admin" else "unexpected packet AskTIDs"
    assert expected in _protocol_error(_exchange(address, unexpected), 5)
    assert cluster.cluster_state() == "RUNNING"


def test_read_only_client_cannot_write(cluster):
    conn = ThreadedConnection(_master(cluster), Silent())
    conn.connect()
    try:
        conn.call(Packets.RequestIdentification, NodeTypes.CLIENT, None, None,
                  cluster.name.encode(), None, {b"read_only": True}, timeout=10)
        for packet, args in (
                (Packets.AskBeginTransaction, (None,)),
                (Packets.AskNewOIDs, (1,)),
                (Packets.AskFinishTransaction, (b"\0" * 7 + b"\1", [], [], [], None))):
            with pytest.raises(RemoteError) as e:
                conn.call(packet, *args, timeout=10)
            assert e.value.code is ErrorCodes.READ_ONLY_ACCESS, packet.name
        # still connected: reads work
        (tid,) = conn.call(Packets.AskLastTransaction, timeout=10)
        assert len(tid) == 8 and not conn.closed
    finally:
        conn.close()
    # a read-write client may begin
    conn = ThreadedConnection(_master(cluster), Silent())
    conn.connect()
    try:
        conn.call(Packets.RequestIdentification, NodeTypes.CLIENT, None, None,
                  cluster.name.encode(), None, {}, timeout=10)
        (ttid,) = conn.call(Packets.AskBeginTransaction, None, timeout=10)
        conn.notify(Packets.AbortTransaction, ttid, [])
    finally:
        conn.close()


def test_wrong_cluster_name_is_refused(cluster):
    conn = ThreadedConnection(_master(cluster), Silent())
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
    pytest.param(os.urandom(64), id="random-bytes"),
    b"GET / HTTP/1.0\r\n\r\n",
    HANDSHAKE + b"\xc1\xc1\xc1garbage",          # 0xc1 is never valid msgpack
    HANDSHAKE + b"\x93\x00\xcd\xff\xff\x90",      # unknown message code
    b"\x92\xa3NEO\x04",                          # protocol version mismatch
])
@pytest.mark.parametrize("node", ["master", "admin", "storage"])
def test_garbage_closes_that_connection_only(cluster, node, payload):
    with socket.create_connection(node_address(cluster, node), timeout=10) as sock:
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


def test_bad_checksum_is_refused_and_not_stored(cluster):
    """A store whose data does not match its checksum closes that client's
    connection to the storage and leaves nothing behind."""
    from neozodb.client import Storage
    storage = Storage(cluster.masters, cluster.name)
    try:
        app = storage.app
        oid = storage.new_oid()
        (ttid,) = app.get_master().call(Packets.AskBeginTransaction, None, timeout=10)
        nid = app.writable_cells(oid)[0]
        conn = app.storage_conn(nid)
        with pytest.raises(RemoteError) as e:
            conn.call(Packets.AskStoreObject, oid, b"\0" * 8, 0, b"\1" * 20, b"data", None,
                      ttid, timeout=10)
        assert e.value.code is ErrorCodes.PROTOCOL_ERROR
        assert "wrong checksum" in e.value.message
        from neozodb.cli.cluster import wait_until
        wait_until(lambda: conn.closed, 10, "the storage to close the connection")
        app.get_master().notify(Packets.AbortTransaction, ttid, [])
        with pytest.raises(KeyError):
            app.load(oid)  # nothing of it was stored
    finally:
        storage.close()
