"""What NEO's nodes revealed, guarded without NEO: a scripted peer plays
the NEO node's part where it behaves unlike neozodb's (see
tests/interop/ for the same against NEO itself)."""
from __future__ import annotations

import threading

import pytest
import ZODB

from neozodb.cli.cluster import (
    LocalCluster,
    free_port,
    wait_until,
)
from neozodb.client import Storage
from neozodb.net.threaded import ThreadedConnection
from neozodb.protocol import (
    ClusterStates,
    NodeStates,
    NodeTypes,
    Packets,
    encode,
    make_nid,
    nid_str,
)
from neozodb.protocol.features import EXTRA_KEY
from scripted import ScriptedPeer, admin_behind, run_neoctl

pytestmark = pytest.mark.timeout(120)


def _neo_master(conn, msg_id, packet, args):
    """A NEO master as an admin sees it: no NotifyFeatures, and the cluster
    state only on request (it pushes it only when it changes)."""
    if packet is Packets.RequestIdentification:
        conn.send(msg_id, Packets.AcceptIdentification, NodeTypes.MASTER,
                  make_nid(NodeTypes.MASTER, 1), make_nid(NodeTypes.ADMIN, 1))
    elif packet is Packets.AskClusterState:
        conn.send(msg_id, Packets.AnswerClusterState, ClusterStates.RUNNING)


def _cluster_runs(address: str) -> bool:
    """The admin at ``address`` says the cluster runs."""
    return run_neoctl(address, "print", "cluster").stdout.strip() == "RUNNING"


def test_admin_asks_a_neo_master_for_the_cluster_state(tmp_path):
    master = ScriptedPeer(_neo_master)
    admin, address = admin_behind(master, tmp_path, "--allow-anonymous-ctl")
    try:
        extra = master.wait_for("RequestIdentification")[5]
        assert EXTRA_KEY in extra  # announced; the peer answers nothing of it
        wait_until(lambda: _cluster_runs(address), 30, "the admin to know the cluster runs")
    finally:
        admin.kill()
        master.close()


def test_admin_keeps_the_state_notified_right_behind_its_answer(tmp_path):
    """The master answers the admin's AskClusterState with VERIFYING and,
    in the same TCP segment, notifies RUNNING (its verification ended
    meanwhile).  The admin must end at RUNNING: it took the answer after
    the notification and stayed at VERIFYING (found by the power-loss
    soak, tests/durability)."""
    def master(conn, msg_id, packet, args):
        if packet is Packets.AskClusterState:
            with conn.lock:
                notify_id, conn.next_id = conn.next_id, conn.next_id + 1
                conn.sock.sendall(
                    encode(msg_id, Packets.AnswerClusterState.code, (ClusterStates.VERIFYING,))
                    + encode(notify_id, Packets.NotifyClusterInformation.code,
                             (ClusterStates.RUNNING,)))
        else:
            _neo_master(conn, msg_id, packet, args)
    peer = ScriptedPeer(master)
    admin, address = admin_behind(peer, tmp_path, "--allow-anonymous-ctl")
    try:
        peer.wait_for("AskClusterState")
        wait_until(lambda: _cluster_runs(address), 10, "the admin to know the cluster runs")
    finally:
        admin.kill()
        peer.close()


def test_admin_lists_nodes_when_a_neo_master_sends_entries_without_id(tmp_path):
    """NEO's master lists masters it knows only by address with no id;
    the admin keeps serving ``print node``."""
    def master(conn, msg_id, packet, args):
        _neo_master(conn, msg_id, packet, args)
        if packet is Packets.RequestIdentification:
            conn.notify(Packets.NotifyNodeInformation, 0.0, [
                (NodeTypes.ADMIN, (b"127.0.0.1", 1), make_nid(NodeTypes.ADMIN, 1),
                 NodeStates.RUNNING, 1.0),
                (NodeTypes.MASTER, (b"127.0.0.1", 2), make_nid(NodeTypes.MASTER, 1),
                 NodeStates.RUNNING, None),
                (NodeTypes.MASTER, (b"127.0.0.1", 3), None, NodeStates.DOWN, None),
                (NodeTypes.MASTER, (b"127.0.0.1", 4), None, NodeStates.DOWN, None)])
    peer = ScriptedPeer(master)
    admin, address = admin_behind(peer, tmp_path)
    try:

        def listed():
            out = run_neoctl(address, "-c", "neo", "print", "node", "MASTER")
            return out.returncode == 0 and out.stdout
        out = wait_until(listed, 30, "print node to list the master")
        assert out.split()[:5] == ["M1", "|", "MASTER", "|", "127.0.0.1:2"], out
        assert len(out.splitlines()) == 1
    finally:
        admin.kill()
        peer.close()


class _Recording:
    """Handler of a raw connection: what the peer sent, in order."""

    def __init__(self):
        self.received = []
        self.lost = threading.Event()

    def dispatch(self, conn, msg_id, packet, args):
        self.received.append((packet, args))

    def connection_lost(self, conn):
        self.lost.set()


def _neo_secondary(cluster, port):
    """Identify with the primary as NEO's secondary masters do: no
    features, no proposed id, at ``port``."""
    handler = _Recording()
    conn = ThreadedConnection(cluster.master_address, handler, "NEO-M")
    conn.connect()
    _, _, nid = conn.call(Packets.RequestIdentification, NodeTypes.MASTER, None,
                          (b"127.0.0.1", port), cluster.name.encode(), None, {}, timeout=10)
    return conn, handler, nid


class _WithOtherMaster(LocalCluster):
    """One master whose -m list also names ``other`` (a master is accepted
    only from an address of the list)."""

    other = ("127.0.0.1", 0)

    def master_argv(self, name, address):
        return super().master_argv(name, address) + ["-m", "%s:%d" % self.other]


def test_a_neo_secondary_is_sent_only_the_masters(tmp_path):
    """NEO's secondaries follow the list of masters and nothing else: any
    other message (storage entries, the partition table, invalidations)
    makes them drop their primary."""
    cluster = _WithOtherMaster(str(tmp_path / "c"), name="test", storages=2, replicas=1,
                               partitions=12)
    cluster.other = ("127.0.0.1", free_port())
    cluster.start_or_kill(wait=60)
    try:
        conn, handler, _ = _neo_secondary(cluster, cluster.other[1])
    except BaseException:
        cluster.kill()
        raise
    try:
        db = ZODB.DB(Storage(cluster.masters, cluster.name))
        with db.transaction() as c:
            c.root()["x"] = 1
        db.close()
        cluster.nodes["S2"].kill()  # a partition table change, a node change
        wait_until(lambda: "O" in cluster.cells()["S2"], 30, "S2's cells out of date")
        conn.call(Packets.Ping, timeout=10)  # a barrier: all sent before is received
        names = {p.name for p, _ in handler.received}
        assert names <= {"NotifyNodeInformation", "NotifyClusterInformation"}, names
        for packet, args in handler.received:
            if packet is Packets.NotifyNodeInformation:
                assert {e[0] for e in args[1]} == {NodeTypes.MASTER}, args
        assert not handler.lost.is_set()
    finally:
        conn.close()
        cluster.kill()


def test_a_master_restarted_at_the_same_address_gets_its_id_back(tmp_path):
    """NEO's masters propose no id when they restart: the master known at
    that address (here M1, DOWN since M2 took over from it) is the same
    one, not a second entry with one address (NEO's nodes match entries by
    address and would take one for the other)."""
    c = LocalCluster(str(tmp_path / "c"), name="test", storages=1, replicas=0, partitions=4,
                     masters=2)
    try:
        c.start(wait=60)
        m1 = c.master_addresses[0]
        c.nodes["M1"].kill()
        c.wait_primary(60, other_than="M1")
        handler = _Recording()
        conn = ThreadedConnection(c.master_addresses[1], handler, "NEO-M")
        conn.connect()
        try:
            _, _, nid = conn.call(Packets.RequestIdentification, NodeTypes.MASTER, None,
                                  (m1[0].encode(), m1[1]), c.name.encode(), None, {},
                                  timeout=10)
            assert nid_str(nid) == "M1"
            conn.call(Packets.Ping, timeout=10)
            full = handler.received[0][1][1]  # the node list sent after identification
            assert [nid_str(e[2]) for e in full if e[1] == (m1[0].encode(), m1[1])] == ["M1"]
        finally:
            conn.close()
    finally:
        c.kill()


def test_gc_pack_is_offered_to_clients_only_while_every_storage_has_it(cluster):
    """A storage without ``gc-pack`` (NEO's reads a GC order's oids as a
    partial history pack) joins the table: connected clients are told the
    cluster no longer offers it; new clients are not offered it."""
    storage = Storage(cluster.masters, cluster.name)
    try:
        assert b"gc-pack" in storage.app.get_master().peer_features
        neo = ThreadedConnection(cluster.master_address, _Recording(), "NEO-S")
        neo.connect()
        try:
            _, _, nid = neo.call(Packets.RequestIdentification, NodeTypes.STORAGE, None,
                                 (b"127.0.0.1", free_port()), cluster.name.encode(), None,
                                 {}, timeout=10)
            # pending, not in the table yet: nothing changes
            assert b"gc-pack" in storage.app.get_master().peer_features
            cluster.neoctl("add", nid_str(nid))
            assert b"gc-pack" in storage.app.get_master().peer_features  # no cell yet
            cluster.neoctl("tweak")
            wait_until(lambda: b"gc-pack" not in storage.app.get_master().peer_features, 30,
                       "the client to be told")
            other = Storage(cluster.masters, cluster.name)
            try:
                assert b"gc-pack" not in other.app.get_master().peer_features
            finally:
                other.close()
        finally:
            neo.close()
    finally:
        storage.close()
