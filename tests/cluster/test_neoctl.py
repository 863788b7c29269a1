"""neoctl against a real cluster: what operators see."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from neozodb.cli.cluster import free_port, wait_until
from neozodb.cli.config import format_address

pytestmark = pytest.mark.timeout(120)


def neoctl(cluster, *words, address=None):
    addr = address or format_address(cluster.admin_address)
    return subprocess.run([sys.executable, "-m", "neozodb.ctl.neoctl", "-a", addr, *words],
                          capture_output=True, text=True, timeout=60)


def test_print_commands(cluster):
    out = neoctl(cluster, "print", "cluster")
    assert (out.returncode, out.stdout) == (0, "RUNNING\n")
    out = neoctl(cluster, "print", "pt")
    assert out.returncode == 0
    assert out.stdout.splitlines() == ["# ptid: 1, replicas: 1", "S1 R " + "U" * 12,
                                       "S2 R " + "U" * 12]
    out = neoctl(cluster, "print", "node")
    lines = out.stdout.splitlines()
    assert [line.split(" | ")[:2] for line in lines] == [
        ["A1", "ADMIN  "], ["M1", "MASTER "], ["S1", "STORAGE"], ["S2", "STORAGE"]]
    assert lines[1].endswith("| RUNNING | None")
    out = neoctl(cluster, "print", "node", "STORAGE")
    assert [line[:2] for line in out.stdout.splitlines()] == ["S1", "S2"]
    out = neoctl(cluster, "print", "primary")
    assert out.stdout == "M1\n"


def test_print_ids_follows_commits(cluster):
    import transaction
    import ZODB

    from neozodb.client import Storage
    out = neoctl(cluster, "print", "ids")
    assert out.stdout.splitlines() == ["last_oid = 0x0", "last_tid = None", "last_ptid = 1"]
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    conn = db.open()
    conn.root()["a"] = 1
    transaction.commit()
    tid = db.lastTransaction()
    db.close()
    out = neoctl(cluster, "print", "ids")
    lines = out.stdout.splitlines()
    assert lines[0] == "last_oid = 0x0"
    assert re.fullmatch(r"last_tid = 0x%x \(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}\)"
                        % int.from_bytes(tid, "big"), lines[1])
    data = json.loads(neoctl(cluster, "--json", "print", "ids").stdout)
    assert data["last_tid"] == int.from_bytes(tid, "big")


def test_json_output(cluster):
    out = neoctl(cluster, "--json", "print", "pt")
    data = json.loads(out.stdout)
    assert data["ptid"] == 1 and data["replicas"] == 1 and len(data["rows"]) == 12
    assert all(sorted(cell[0] for cell in row) == ["S1", "S2"] for row in data["rows"])
    nodes = json.loads(neoctl(cluster, "--json", "print", "node").stdout)
    assert {n["nid"]: n["type"] for n in nodes} == {
        "A1": "ADMIN", "M1": "MASTER", "S1": "STORAGE", "S2": "STORAGE"}


def test_errors_are_one_line_nonzero(cluster):
    out = neoctl(cluster, "frobnicate")
    assert (out.returncode, out.stderr) == (1, "invalid command: frobnicate\n")
    out = neoctl(cluster, "set", "cluster", "FOO")
    assert (out.returncode, out.stderr) == (1, "invalid cluster state: FOO\n")
    out = neoctl(cluster, "set", "cluster", "BACKINGUP")
    assert out.returncode == 1 and len(out.stderr.splitlines()) == 1
    out = neoctl(cluster, "start")  # already running: refused
    assert out.returncode == 1 and "RECOVERING" in out.stderr
    out = neoctl(cluster, "add", "S9")
    assert (out.returncode, out.stderr) == (1, "unknown node\n")
    out = neoctl(cluster, "print", "cluster", address="127.0.0.1:%d" % free_port())
    assert out.returncode == 1 and out.stderr.startswith("cannot connect to admin at ")


def test_stopping_stops_every_node(cluster):
    out = neoctl(cluster, "set", "cluster", "STOPPING")
    assert out.returncode == 0
    for name in ("M1", "S1", "S2"):
        assert cluster.nodes[name].wait(30) == 0, name


def test_add_pending_storage(cluster):
    node = cluster.storage(3)
    node.start()
    out = wait_until(lambda: (lambda o: o if "S3 | STORAGE" in o.stdout else None)(
        neoctl(cluster, "print", "node", "STORAGE")), 30, "S3 to register")
    assert "| PENDING |" in out.stdout.splitlines()[-1]
    out = neoctl(cluster, "add", "all")
    assert out.stdout == "Nodes added: S3\n"
    out = neoctl(cluster, "print", "node", "STORAGE")
    assert out.stdout.splitlines()[-1].split(" | ")[3] == "RUNNING"
