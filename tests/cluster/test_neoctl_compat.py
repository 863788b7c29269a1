"""What NEO's neoctl, admin and storages expect of our nodes, checked with
our nodes alone (tests/interop runs NEO itself): the master's status JSON
only for peers that announced ``status-json``, acknowledgements in NEO's
words, NEO's ``add all``, ``print summary``, ``flush_log``,
``prune_orphan``, and replica checks over a connection the peer opened."""
from __future__ import annotations

import json
import os

import pytest

from neozodb.cli.cluster import LocalCluster, wait_until
from neozodb.net.endpoint import RemoteError
from neozodb.net.threaded import ThreadedConnection
from neozodb.protocol import (
    ZERO_TID,
    CellStates,
    ClusterStates,
    ErrorCodes,
    NodeStates,
    NodeTypes,
    Packets,
    make_nid,
)
from neozodb.protocol.features import ANNOUNCEMENT
from scripted import ScriptedPeer, admin_behind, run_neoctl
from wire import Silent

pytestmark = pytest.mark.timeout(120)


def admin_connection(cluster, extra) -> ThreadedConnection:
    """A connection to the master identified as an admin node announcing
    ``extra`` (``{}``: as NEO's admin)."""
    conn = ThreadedConnection(cluster.master_address, Silent(), "admin")
    conn.connect(timeout=10)
    conn.call(Packets.RequestIdentification, NodeTypes.ADMIN, None, None, cluster.name.encode(),
              None, extra, timeout=10)
    return conn


def ok(cluster, *words) -> str:
    out = cluster.run_neoctl(*words)
    assert (out.returncode, out.stderr) == (0, ""), (words, out.stderr)
    return out.stdout


def logged(cluster, name: str, text: str) -> list[str]:
    with open(os.path.join(cluster.directory, name + ".log"), errors="replace") as f:
        return [line for line in f if text in line]


def test_status_json_only_for_admins_that_announce_it(cluster):
    """NEO's admin, and NEO's neoctl behind it, get NEO's empty
    acknowledgement of CheckReplicas and NEO's AnswerPackOrders; only an
    admin that announced status-json gets the JSON status."""
    neo_like = admin_connection(cluster, {})
    ours = admin_connection(cluster, ANNOUNCEMENT)
    try:
        assert neo_like.call(Packets.CheckReplicas, {}, ZERO_TID, None, timeout=10) == ("",)
        (text,) = ours.call(Packets.CheckReplicas, {}, ZERO_TID, None, timeout=10)
        assert json.loads(text)["done"] is True
        # a check started by NEO's admin: acknowledged as NEO's master does
        assert neo_like.call(Packets.CheckReplicas, {0: None}, ZERO_TID, None,
                             timeout=10) == ("",)
        assert neo_like.call(Packets.AskPackOrders, ZERO_TID, timeout=10) == ((),)
        with pytest.raises(RemoteError) as e:
            ours.call(Packets.AskPackOrders, ZERO_TID, timeout=10)
        assert e.value.code is ErrorCodes.ACK and json.loads(e.value.message)["orders"] == []
    finally:
        neo_like.close()
        ours.close()


def test_acknowledgements_in_neo_words(cluster):
    """NEO's neoctl prints what the master acknowledges with; NEO's ``add
    all`` lists every storage, running ones too."""
    cluster.storage(3).start()
    wait_until(lambda: cluster.storage_state("S3") is NodeStates.PENDING, 30, "S3 pending")
    ctl = cluster.ctl()
    try:
        assert ctl.call(Packets.AddPendingNodes, [1, 2, 3]) == ("Nodes added: S3",)
        assert ctl.call(Packets.AddPendingNodes, [1, 2, 3]) == ("No node added",)
        assert ctl.call(Packets.SetNodeState, 3, NodeStates.DOWN) == ("state changed",)
        wait_until(lambda: cluster.storage_state("S3") is NodeStates.DOWN, 30, "S3 down")
        assert ctl.call(Packets.SetNodeState, 3, NodeStates.UNKNOWN) == (
            "node permanently removed",)
        (last_tid, _, _) = ctl.call(Packets.AskLastIDs)
        assert last_tid == ZERO_TID  # not None: NEO's neoctl prints it as a TID
    finally:
        ctl.close()
    assert ok(cluster, "tweak") == "No change done.\n"
    assert cluster.run_neoctl("add", "S1").stderr == "S1 is not pending\n"  # named alone


def test_neo_only_commands(cluster):
    """print summary, flush_log and prune_orphan, which NEO's neoctl has:
    a FlushLog reaching every node is no protocol error for any."""
    lines = ok(cluster, "print", "summary").splitlines()
    assert lines[0] == "# {}"
    assert lines[1].startswith("RUNNING; UP_TO_DATE=24; ltid=0000000000000000 (1900-01-01")
    assert ok(cluster, "flush_log") == ""
    assert ok(cluster, "prune_orphan", "1", "all") == ""
    assert ok(cluster, "prune_orphan", "0", "S1", "S2") == ""
    wait_until(lambda: all(logged(cluster, s, "prune_orphan: 0 data rows deleted")
                           for s in ("S1", "S2")), 30, "the storages to prune")
    assert cluster.run_neoctl("prune_orphan", "0", "S9").stderr == "invalid storage node S9\n"
    assert cluster.run_neoctl("prune_orphan", "2", "all").returncode == 1
    for name in ("M1", "S1", "S2", "A1"):
        assert not logged(cluster, name, "protocol error"), name
        assert not logged(cluster, name, "lost the master"), name
    assert cluster.cluster_state() == "RUNNING"


def test_check_over_the_connection_the_peer_opened(tmp_path):
    """NEO's storage refuses a second connection between two storages and
    checks over the one it has, whichever side opened it: our checker
    does the same, and our side of a replication connection answers the
    digests."""
    c = LocalCluster(str(tmp_path / "c"), name="conn", storages=2, replicas=1, partitions=4)
    try:
        c.start(wait=60)
        c.nodes["S2"].kill()
        wait_until(lambda: c.storage_state("S2") is NodeStates.DOWN, 30, "S2 down")
        c.storage(2).start()
        # S2 catches up from S1: its connection to S1 is the only one
        wait_until(lambda: all(set(line.split()[2]) == {"U"} for line in c.pt_lines()[1:]),
                   30, "S2 up to date")
        out = c.run_neoctl("check", "0:S2", "1:S2")  # S1 checks, against S2
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == ["partition 0: ok: S1 S2 agree",
                                           "partition 1: ok: S1 S2 agree",
                                           "2 partitions checked, 0 corrupted copies found,"
                                           " 0 repaired"]
        for name in ("S1", "S2"):
            assert not logged(c, name, "protocol error"), name
    finally:
        c.kill()


def _neo_master(conn, msg_id, packet, args):
    """NEO's master as our admin sees it: no features, an empty
    acknowledgement of CheckReplicas (the check, if any, only logged)."""
    if packet is Packets.RequestIdentification:
        conn.send(msg_id, Packets.AcceptIdentification, NodeTypes.MASTER,
                  make_nid(NodeTypes.MASTER, 1), make_nid(NodeTypes.ADMIN, 1))
        rows = [[(1, CellStates.UP_TO_DATE), (2, CellStates.CORRUPTED)],
                [(1, CellStates.UP_TO_DATE), (2, CellStates.UP_TO_DATE)]]
        conn.notify(Packets.SendPartitionTable, 1, 1, rows)
    elif packet is Packets.AskClusterState:
        conn.send(msg_id, Packets.AnswerClusterState, ClusterStates.RUNNING)
    elif packet is Packets.CheckReplicas:
        conn.send(msg_id, Packets.Error, ErrorCodes.ACK.value, b"")


def test_neoctl_with_a_master_that_does_not_report(tmp_path):
    """Behind NEO's master, ``check`` starts the check and says it is not
    reported, ``print check`` / ``print import`` / ``print pack`` say so in
    one line (a JSON error traceback before), and the admin never sends NEO's
    master the AskPackOrders it would drop the admin for."""
    master = ScriptedPeer(_neo_master)
    admin, address = admin_behind(master, tmp_path)
    try:

        def neoctl(*words):
            return run_neoctl(address, "-c", "neo", *words)
        wait_until(lambda: neoctl("print", "cluster").stdout == "RUNNING\n", 30,
                   "the admin to follow the master")
        out = neoctl("check")
        assert (out.returncode, out.stderr) == (0, ""), out.stderr
        assert out.stdout.splitlines() == [
            "check of 2 partitions started; the master does not report the progress nor"
            " findings of checks (NEO's master, or NEO's admin in between); NEO's master logs"
            " the corrupted partitions it is told about",
            "partition 0: S2 CORRUPTED"]
        assert master.wait_for("CheckReplicas") == ({0: None, 1: None}, ZERO_TID, None)
        for what, said in (("check", "status of checks"), ("import", "progress of imports"),
                           ("pack", "pack status (NEO's master)")):
            out = neoctl("print", what)
            assert (out.returncode, out.stdout) == (1, ""), (what, out.stdout)
            assert len(out.stderr.splitlines()) == 1 and said in out.stderr, out.stderr
        assert neoctl("print", "cluster").stdout == "RUNNING\n"  # still connected
        assert "AskPackOrders" not in [name for name, _ in master.received]
    finally:
        admin.kill()
        master.close()
