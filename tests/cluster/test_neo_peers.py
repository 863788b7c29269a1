"""What NEO's nodes revealed, guarded without NEO: a scripted peer plays
the NEO node's part where it behaves unlike neozodb's (see
tests/interop/ for the same against NEO itself)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from neozodb.cli.cluster import NodeProcess, listening_address, wait_until
from neozodb.cli.config import format_address
from neozodb.protocol import ClusterStates, NodeTypes, Packets, make_nid
from neozodb.protocol.features import EXTRA_KEY
from scripted import ScriptedPeer

pytestmark = pytest.mark.timeout(60)


def _neo_master(conn, msg_id, packet, args):
    """A NEO master as an admin sees it: no NotifyFeatures, and the cluster
    state only on request (it pushes it only when it changes)."""
    if packet is Packets.RequestIdentification:
        conn.send(msg_id, Packets.AcceptIdentification, NodeTypes.MASTER,
                  make_nid(NodeTypes.MASTER, 1), make_nid(NodeTypes.ADMIN, 1))
    elif packet is Packets.AskClusterState:
        conn.send(msg_id, Packets.AnswerClusterState, ClusterStates.RUNNING)


def test_admin_asks_a_neo_master_for_the_cluster_state(tmp_path):
    master = ScriptedPeer(_neo_master)
    admin = NodeProcess("A1", [sys.executable, "-m", "neozodb.cli.admin", "-c", "neo",
                               "-m", format_address(master.address), "-b", "127.0.0.1:0",
                               "--allow-anonymous-ctl"], str(tmp_path / "A1.log"))
    admin.start()
    try:
        extra = master.wait_for("RequestIdentification")[5]
        assert EXTRA_KEY in extra  # announced; the peer answers nothing of it
        address = format_address(listening_address(admin))

        def state():
            out = subprocess.run([sys.executable, "-m", "neozodb.ctl.neoctl", "-a",
                                  address, "print", "cluster"],
                                 capture_output=True, text=True, timeout=30)
            return out.stdout.strip() == "RUNNING"
        wait_until(state, 30, "the admin to know the cluster runs")
    finally:
        admin.kill()
        master.close()
