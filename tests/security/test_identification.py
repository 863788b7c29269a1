"""Every peer is limited to the role it may claim: the cluster name is
required and never told back, what an identification says is checked
before anything is registered, a master is accepted only from the -m list,
redirections are followed only from configured masters, and storages
outside the partition table neither decide it nor hold recovery back."""
from __future__ import annotations

import os
import signal
import socket
import sys

import pytest
from rawpeer import Recorder, commit_one, load

from neozodb.cli.cluster import NodeProcess, wait_until
from neozodb.cli.config import format_address
from neozodb.net.endpoint import RemoteError
from neozodb.net.threaded import ThreadedConnection
from neozodb.protocol import (
    HANDSHAKE,
    CellStates,
    ClusterStates,
    Decoder,
    ErrorCodes,
    NodeTypes,
    Packets,
    encode,
    make_nid,
)
from scripted import ScriptedPeer
from wire import node_address, storage_address

pytestmark = pytest.mark.timeout(180)


def _identify(address, node_type, nid=None, addr=None, name=b"test", id_timestamp=None,
              extra=None) -> list:
    """Identify on a raw socket; the messages received until the peer
    closes (within 10 s: a socket timeout fails the test)."""
    payload = HANDSHAKE + encode(0, Packets.RequestIdentification.code,
                                 (node_type, nid, addr, name, id_timestamp, extra or {}))
    received = b""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(payload)
        try:
            while data := sock.recv(65536):
                received += data
        except ConnectionResetError:
            pass
    decoder = Decoder()
    decoder.feed(received[len(HANDSHAKE):])
    return list(decoder)


def _refusal(messages) -> str:
    """The only message must be Error(PROTOCOL_ERROR): its text."""
    assert len(messages) == 1, messages
    (_, code, (error, text)), = messages
    assert (code, error) == (Packets.Error.code, ErrorCodes.PROTOCOL_ERROR.value), messages
    return text.decode()


def _still_serving(cluster) -> None:
    assert cluster.nodes["M1"].running
    assert cluster.cluster_state() == "RUNNING"
    oid, _ = commit_one(cluster, b"still serving")
    assert load(cluster, oid) == b"still serving"


@pytest.mark.parametrize("node", ["master", "storage", "admin"])
def test_cluster_name_is_never_told_back(cluster, node):
    """Before: "wrong cluster name: 'guess' (this is 'test')"."""
    address = node_address(cluster, node)
    node_type = NodeTypes.ADMIN if node == "admin" else NodeTypes.CLIENT
    text = _refusal(_identify(address, node_type, name=b"guess"))
    assert text == "wrong cluster name"
    assert "test" not in text and "guess" not in text


@pytest.mark.parametrize("node_type, nid, addr, id_timestamp, extra, reason", [
    # before: the master registered a master at port 70000 and exited
    (NodeTypes.MASTER, None, (b"127.0.0.1", 70000), None, {}, "port"),
    (NodeTypes.STORAGE, None, (b"127.0.0.1", 0), None, {}, "port"),
    (NodeTypes.STORAGE, make_nid(NodeTypes.CLIENT, 1), None, None, {}, "not a STORAGE id"),
    (NodeTypes.MASTER, make_nid(NodeTypes.STORAGE, 1), (b"127.0.0.1", 1), None, {},
     "not a MASTER id"),
    (NodeTypes.CLIENT, 1 << 40, None, None, {}, "invalid node id"),
    (NodeTypes.STORAGE, None, (b"", 1), None, {}, "host"),
    (NodeTypes.STORAGE, None, (b"\xff\xfe", 1), None, {}, "host"),
    # before: tuple(5) failed after the node was registered
    (NodeTypes.STORAGE, None, (b"127.0.0.1", 1), None, {b"devpath": 5}, "devpath"),
    (NodeTypes.CLIENT, None, None, None, {b"read_only": b"yes"}, "read_only"),
    (NodeTypes.CLIENT, None, None, -1.0, {}, "timestamp"),
])
def test_identification_is_checked_before_anything_is_registered(
        cluster, node_type, nid, addr, id_timestamp, extra, reason):
    before = cluster.ctl().nodes()
    text = _refusal(_identify(cluster.master_address, node_type, nid, addr,
                              id_timestamp=id_timestamp, extra=extra))
    assert reason in text
    assert len(cluster.ctl().nodes()) == len(before)  # nothing registered
    _still_serving(cluster)


def test_master_only_from_the_list_of_masters(cluster):
    """Before: any peer claiming to be a master became a secondary (and,
    during an election, one claiming an earlier start made the master
    yield to the address it gave)."""
    for address in ((b"127.0.0.1", 1), (b"10.1.2.3", 1)):
        text = _refusal(_identify(cluster.master_address, NodeTypes.MASTER, None, address,
                                  id_timestamp=1.0))
        assert text == "not a master of this cluster"
    _still_serving(cluster)


def test_one_identification_per_connection(cluster):
    """A storage delays an identification whose id the master has not
    announced yet; a second one on that connection is a protocol error
    (before: delayed too, and so on without end)."""
    recorder = Recorder()
    conn = ThreadedConnection(storage_address(cluster), recorder)
    conn.connect()
    try:
        unknown = make_nid(NodeTypes.CLIENT, 999)
        conn.ask(Packets.RequestIdentification, NodeTypes.CLIENT, unknown, None, b"test", 1.0,
                 {})
        with pytest.raises(RemoteError) as e:
            conn.call(Packets.RequestIdentification, NodeTypes.CLIENT, unknown, None, b"test",
                      1.0, {}, timeout=10)
        assert e.value.code is ErrorCodes.PROTOCOL_ERROR
        assert "already" in e.value.message
        wait_until(lambda: conn.closed, 10, "the storage to close the connection")
    finally:
        conn.close()
    _still_serving(cluster)


def test_redirection_followed_only_from_configured_masters(tmp_path):
    """An admin configured with one master: that master may name the
    primary, but what that one says is not followed further.  Before:
    every address named was learnt and followed."""
    third = ScriptedPeer(lambda conn, msg_id, packet, args: None)
    second = ScriptedPeer(lambda conn, msg_id, packet, args: conn.send(
        msg_id, Packets.NotPrimaryMaster, 0, [(b"127.0.0.1", third.address[1])]))
    first = ScriptedPeer(lambda conn, msg_id, packet, args: conn.send(
        msg_id, Packets.NotPrimaryMaster, 0, [(b"127.0.0.1", second.address[1])]))
    admin = NodeProcess("A1", [sys.executable, "-m", "neozodb.cli.admin", "-c", "neo",
                               "-m", format_address(first.address), "-b", "127.0.0.1:0"],
                        os.path.join(str(tmp_path), "A1.log"))
    admin.start()
    try:
        second.wait_for("RequestIdentification")  # the configured master named it
        with first.changed:  # the admin went round its list again
            assert first.changed.wait_for(lambda: sum(
                n == "RequestIdentification" for n, _ in first.received) >= 2, 30)
        assert third.received == [] and third.conns == []
        assert admin.running
    finally:
        admin.kill()
        for peer in (first, second, third):
            peer.close()
    with open(os.path.join(str(tmp_path), "A1.log")) as f:
        assert "not a configured master" in f.read()


def test_unknown_storage_neither_decides_the_table_nor_holds_recovery(cluster):
    """In recovery, a storage outside the partition table that claims a
    newer table is not asked for it, and one that never answers does not
    keep the cluster from starting.  Before: the master asked the newcomer
    for its table and waited for it forever."""
    oid, _ = commit_one(cluster, b"kept")
    for name in ("S1", "S2"):
        cluster.nodes[name].signal(signal.SIGKILL)
        cluster.nodes[name].wait(10)
    wait_until(lambda: cluster.cluster_state() == "RECOVERING", 30, "recovery")
    master_log = cluster.nodes["M1"].logfile
    with open(master_log) as f:
        seen = len(f.read())
    cluster.storage(1).start()

    def loaded():
        with open(master_log) as f:
            return "loaded from S1" in f.read()[seen:]
    wait_until(loaded, 30, "the master to load S1's table")

    def claim(conn, msg_id, packet, args):
        if packet is Packets.AskRecovery:
            conn.answer(msg_id, Packets.AnswerRecovery, 1 << 40, None, None)
    claimer, silent = Recorder(claim), Recorder()
    conns = []
    for recorder in (claimer, silent):
        conn = ThreadedConnection(cluster.master_address, recorder)
        conn.connect()
        conn.call(Packets.RequestIdentification, NodeTypes.STORAGE, None,
                  (b"127.0.0.1", 1), b"test", None, {}, timeout=10)
        conns.append(conn)
    try:
        for recorder in (claimer, silent):
            recorder.wait(lambda r: "AskRecovery" in r.names(), 10, "AskRecovery")
        cluster.storage(2).start()
        cluster.wait_state("RUNNING", 60)
        assert "AskPartitionTable" not in claimer.names()
    finally:
        for conn in conns:
            conn.close()
    assert load(cluster, oid) == b"kept"
    ctl = cluster.ctl()
    try:
        assert ctl.call(Packets.AskClusterState)[0] is ClusterStates.RUNNING
    finally:
        ctl.close()


def test_a_late_answer_with_an_older_table_is_ignored(cluster):
    """In recovery, a storage that announced an older table and answers
    for it only once a storage with a newer table came (whose table was
    loaded, and the cluster started) does not give the master its table
    back.  Before, it did, whenever it came: test_crash.py found it under
    load, the master then ran on a table where a storage that lacked the
    last commits was UP_TO_DATE, and a client read from it a revision
    older than an acknowledged commit."""
    oid, _ = commit_one(cluster, b"before")
    cluster.nodes["S2"].signal(signal.SIGKILL)
    cluster.nodes["S2"].wait(10)
    wait_until(lambda: "U" not in cluster.cells()["S2"], 30, "S2's cells outdated")
    commit_one(cluster, b"after", oid)  # S2 lacks it
    cluster.nodes["S1"].signal(signal.SIGKILL)
    cluster.nodes["S1"].wait(10)
    wait_until(lambda: cluster.cluster_state() == "RECOVERING", 30, "recovery")
    master_log = cluster.nodes["M1"].logfile
    with open(master_log) as f:
        seen = len(f.read())
    asked: dict[str, int] = {}

    def reply(conn, msg_id, packet, args):
        if packet is Packets.AskRecovery:  # table 1: the cluster's first
            conn.answer(msg_id, Packets.AnswerRecovery, 1, None, None)
        elif packet is Packets.AskPartitionTable:
            asked["msg_id"] = msg_id  # answered later
    # S2 as it was before its cells were outdated, slow to answer
    stale = Recorder(reply)
    conn = ThreadedConnection(cluster.master_address, stale)
    conn.connect()
    try:
        conn.call(Packets.RequestIdentification, NodeTypes.STORAGE,
                  make_nid(NodeTypes.STORAGE, 2), (b"127.0.0.1", 1), b"test", None, {},
                  timeout=10)
        stale.wait(lambda r: "AskPartitionTable" in r.names(), 10, "S2 asked for its table")
        cluster.storage(1).start()  # with the newer table
        cluster.wait_state("RUNNING", 60)
        rows = [[(1, CellStates.UP_TO_DATE), (2, CellStates.UP_TO_DATE)]
                for _ in range(cluster.partitions)]
        conn.answer(asked["msg_id"], Packets.AnswerPartitionTable, 1, 1, rows)

        def ignored():
            with open(master_log) as f:
                return "partition table 1 of S2 ignored" in f.read()[seen:]
        wait_until(ignored, 30, "the late table to be ignored")
        assert "U" not in cluster.cells()["S2"]
    finally:
        conn.close()
    with open(master_log) as f:
        assert "partition table 1 loaded" not in f.read()[seen:]
    assert load(cluster, oid) == b"after"
