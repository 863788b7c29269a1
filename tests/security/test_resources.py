"""What an untrusted peer can make a node spend, against real node
processes over TCP: message sizes before identification, decoding cost,
output to a peer that does not read, connection floods, silent
connections (docs/operations.md, "Limits")."""
from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from fsdata import commit
from neozodb.cli.cluster import LocalCluster, wait_until
from neozodb.protocol import HANDSHAKE, Decoder, ErrorCodes, NodeTypes, Packets, encode
from wire import messages_until_closed, node_address

pytestmark = pytest.mark.timeout(180)

DEADLINE = 3  # --identify-timeout of the nodes under test
CAP = 100     # --max-connections
MB = 1 << 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(str(tmp_path_factory.mktemp("resources")), name="test",
                     storages=1, replicas=0, partitions=4,
                     node_args=["--identify-timeout", str(DEADLINE),
                                "--max-connections", str(CAP)])
    try:
        c.start(wait=60)
        yield c
    finally:
        c.kill()


def _pid(cluster, node: str) -> int:
    return cluster.nodes[{"master": "M1", "admin": "A1", "storage": "S1"}[node]].proc.pid


def _status(pid: int, key: str) -> int:
    """A /proc/PID/status field in bytes (VmRSS, VmHWM)."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _log(cluster, name: str) -> str:
    with open(os.path.join(cluster.directory, name + ".log")) as f:
        return f.read()


def _send_until_closed(sock: socket.socket, payload: bytes, timeout: float = 20) -> bool:
    """Send ``payload`` (the peer may close midway), then read until the
    peer closes; False if it is still open after ``timeout`` seconds."""
    sock.settimeout(timeout)
    try:
        sock.sendall(payload)
    except (BrokenPipeError, ConnectionResetError):
        return True
    except socket.timeout:
        return False
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except socket.timeout:
        return False
    return True


@pytest.mark.parametrize("node", ["master", "storage", "admin"])
def test_large_first_message_is_refused(cluster, node):
    """100 KiB before identifying (here the beginning of a big bin, which
    the node would otherwise wait for): PROTOCOL_ERROR, closed at once."""
    payload = HANDSHAKE + b"\x93\x00\x01\x91\xc6" + struct.pack(">I", 8 * MB) + bytes(100 << 10)
    with socket.create_connection(node_address(cluster, node), timeout=10) as sock:
        try:
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass
        messages = messages_until_closed(sock)
    (msg_id, code, (err, text)), = messages
    assert (code, err) == (Packets.Error.code, ErrorCodes.PROTOCOL_ERROR.value)
    assert b"before identification" in text


@pytest.mark.parametrize("shape", ["empty maps", "deep nesting"])
def test_cheap_bombs_are_refused_cheaply(cluster, shape):
    """16 MiB of 1-byte empty maps would cost the storage over 1 GB
    decoded; deep nesting, msgpack's stack.  The node closes the
    connection and its peak memory barely moves."""
    if shape == "empty maps":  # 16 arrays of 1 M (within the length limits)
        inner = b"\xdd" + struct.pack(">I", MB) + b"\x80" * MB
        bomb = b"\x93\x00\x02\xdc\x00\x10" + inner * 16
    else:
        bomb = b"\x91" * (16 * MB)
    pid = _pid(cluster, "storage")
    before = _status(pid, "VmRSS")
    with socket.create_connection(node_address(cluster, "storage"), timeout=10) as sock:
        assert _send_until_closed(sock, HANDSHAKE + bomb)
    growth = _status(pid, "VmHWM") - before
    assert growth < 200 * MB, "storage peak memory grew by %d MB" % (growth // MB)
    _still_commits(cluster)


def _identified_client(cluster) -> socket.socket:
    """A raw connection identified by the master as a client."""
    sock = socket.create_connection(cluster.master_address, timeout=10)
    sock.sendall(HANDSHAKE + encode(0, Packets.RequestIdentification.code, (
        NodeTypes.CLIENT, None, None, cluster.name.encode(), None, {})))
    decoder = Decoder()
    head = b""
    while len(head) < len(HANDSHAKE):
        head += sock.recv(len(HANDSHAKE) - len(head))
    assert head == HANDSHAKE
    while True:
        decoder.feed(sock.recv(65536))
        for _, code, _ in decoder:
            if code == Packets.AcceptIdentification.code:
                return sock


def _rx_queue(port: int, peer_port: int) -> int:
    """Bytes waiting in the receive queue of the node's socket (local
    ``port``, remote ``peer_port``): what it has not read from us."""
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.split(":")[1], 16) == port and int(remote.split(":")[1], 16) == peer_port:
                return int(fields[4].split(":")[1], 16)
    return 0


def test_peer_that_never_reads(cluster):
    """A client asks for 100 KB answers (10000 new OIDs) 4000 times, then
    sends 32 MB of Pings, and never reads: 400 MB the master would buffer.
    It stops reading that client instead: its memory stays bounded, the
    client's sending blocks (requests wait in the kernel buffers), other
    clients still commit."""
    pid = _pid(cluster, "master")
    before = _status(pid, "VmRSS")
    sock = _identified_client(cluster)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        big = b"".join(encode(i, Packets.AskNewOIDs.code, (10000,)) for i in range(1, 4001))
        ping = encode(0, Packets.Ping.code, ())
        sock.settimeout(5)
        with pytest.raises(socket.timeout):  # blocked 5 s: the master stopped reading
            sock.sendall(big + ping * (32 * MB // len(ping)))
        port = cluster.master_address[1]
        peer_port = sock.getsockname()[1]
        assert _rx_queue(port, peer_port) > 0
        growth = _status(pid, "VmHWM") - before
        assert growth < 200 * MB, "master peak memory grew by %d MB" % (growth // MB)
        _still_commits(cluster)
    finally:
        sock.close()


def test_connection_flood_is_capped(cluster):
    """2000 connections to the storage: it keeps at most CAP, refuses the
    rest with log lines naming them, serves its client meanwhile."""
    from neozodb.client import Storage
    storage = Storage(cluster.masters, cluster.name)
    socks = []
    try:
        # connected to the storage before the flood (new peers wait for
        # the flood to end: the cap does not know who is who)
        oid = storage.new_oid()
        commit(storage, [(oid, b"\0" * 8, b"before the flood")])
        address = node_address(cluster, "storage")
        pid = _pid(cluster, "storage")
        fds_before = len(os.listdir("/proc/%d/fd" % pid))
        for _ in range(2000):
            try:
                socks.append(socket.create_connection(address, timeout=5))
            except OSError:
                pass
        # every connection was accepted by the kernel; the node dropped those over the cap
        wait_until(lambda: "refused connection from" in _log(cluster, "S1"), 20, "refusal logged")
        # refused sockets close in the next loop iterations; before the
        # deadline frees the accepted ones
        wait_until(lambda: len(os.listdir("/proc/%d/fd" % pid)) - fds_before <= CAP,
                   DEADLINE - 1, "the storage to hold at most CAP more descriptors")
        commit(storage, [(oid, storage.load(oid)[1], b"during the flood")])
        assert storage.load(oid)[0] == b"during the flood"
    finally:
        for s in socks:
            s.close()
        storage.close()


def test_silent_connection_closed_after_deadline(cluster):
    """A connection that sends the handshake and nothing more is closed
    after the identification deadline, with a log line saying why."""
    with socket.create_connection(node_address(cluster, "storage"), timeout=10) as sock:
        sock.sendall(HANDSHAKE)
        start = time.monotonic()
        assert messages_until_closed(sock, timeout=DEADLINE + 7) == []
        assert time.monotonic() - start < DEADLINE + 5
    wait_until(lambda: "not identified after %d s" % DEADLINE in _log(cluster, "S1"),
               10, "deadline logged")


def _still_commits(cluster) -> None:
    from neozodb.client import Storage
    storage = Storage(cluster.masters, cluster.name)
    try:
        oid = storage.new_oid()
        tid = commit(storage, [(oid, b"\0" * 8, b"still serving")])
        assert storage.load(oid) == (b"still serving", tid)
    finally:
        storage.close()


def test_limits_do_not_refuse_big_legitimate_messages(cluster):
    """Big messages from identified peers still pass: a 20 MB object and a
    transaction of 50000 objects (its invalidations and oid lists)."""
    from neozodb.client import Storage
    storage = Storage(cluster.masters, cluster.name)
    try:
        oid = storage.new_oid()
        big = os.urandom(20 * MB)
        tid = commit(storage, [(oid, b"\0" * 8, big)])
        assert storage.load(oid) == (big, tid)
        oids = [storage.new_oid() for _ in range(50000)]
        commit(storage, [(o, b"\0" * 8, b"x") for o in oids])
        assert storage.load(oids[-1])[0] == b"x"
    finally:
        storage.close()
