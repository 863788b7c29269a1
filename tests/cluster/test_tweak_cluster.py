"""neoctl tweak and set replicas against a real cluster."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections import Counter

import pytest

from neozodb.cli.cluster import wait_until
from neozodb.ctl.neoctl import CtlError
from neozodb.protocol import Packets

pytestmark = pytest.mark.timeout(120)


def neoctl(cluster, *words, address=None):
    return cluster.run_neoctl(*words, address=address)


def ok(cluster, *words):
    out = neoctl(cluster, *words)
    assert (out.returncode, out.stderr) == (0, ""), (words, out.stderr)
    return out.stdout


def refused(cluster, *words):
    out = neoctl(cluster, *words)
    assert (out.returncode, out.stdout) == (1, ""), (words, out.stdout, out.stderr)
    assert len(out.stderr.splitlines()) == 1, out.stderr
    return out.stderr.rstrip("\n")


def print_pt(cluster):
    return json.loads(ok(cluster, "--json", "print", "pt"))


def add_third_storage(cluster):
    cluster.storage(3).start()
    wait_until(lambda: _storage(cluster, "S3").get("state") == "PENDING", 30, "S3 to be pending")
    assert ok(cluster, "add", "S3") == "Nodes added: S3\n"


def _storage(cluster, nid):
    nodes = json.loads(ok(cluster, "--json", "print", "node", "STORAGE"))
    return next((n for n in nodes if n["nid"] == nid), {})


def non_feeding(rows):
    return [[nid for nid, state in row if state != "FEEDING"] for row in rows]


def test_tweak_spreads_cells_to_a_new_storage(cluster):
    add_third_storage(cluster)
    before = ok(cluster, "print", "pt")
    assert before.splitlines()[0] == "# ptid: 1, replicas: 1"

    # dry run: the would-be table, the table itself unchanged
    grid = ok(cluster, "tweak", "-n").splitlines()
    assert [line[:5] for line in grid] == ["S1 R ", "S2 R ", "S3 R "]
    assert all(len(line) == 5 + 12 for line in grid)
    assert set(grid[2][5:]) == {"O", "."} and grid[2].count("O") == 8
    assert ok(cluster, "print", "pt") == before
    data = json.loads(ok(cluster, "--json", "tweak", "-n"))
    assert data["changed"] is True and data["dry_run"] is True
    assert data["nodes"] == {"S1": "RUNNING", "S2": "RUNNING", "S3": "RUNNING"}
    assert ok(cluster, "-n", "tweak") == "\n".join(grid) + "\n"  # -n anywhere
    assert ok(cluster, "print", "pt") == before

    # applied: the answer is the table it made, with OUT_OF_DATE cells on S3
    assert ok(cluster, "tweak").splitlines() == grid
    pt = print_pt(cluster)
    # Replication starts at once: it may already have made some of S3's
    # cells UP_TO_DATE (each bumping the ptid) and discarded the FEEDING
    # cells they replace.  Whatever its progress, the layout is the same.
    assert pt["ptid"] >= 2 and pt["replicas"] == 1
    s3 = [state for row in pt["rows"] for nid, state in row if nid == "S3"]
    assert len(s3) == 8 and set(s3) <= {"OUT_OF_DATE", "UP_TO_DATE"}
    for row in pt["rows"]:
        nids = [nid for nid, _ in row]
        assert len(nids) == len(set(nids)), row
    rows = non_feeding(pt["rows"])
    assert all(len(row) == 2 for row in rows), rows
    counts = Counter(nid for row in rows for nid in row)
    assert sorted(counts) == ["S1", "S2", "S3"] and max(counts.values()) - min(counts.values()) <= 1
    # every partition keeps a readable copy on the old storages
    for row in pt["rows"]:
        assert any(state in ("UP_TO_DATE", "FEEDING") for nid, state in row if nid != "S3"), row
    assert cluster.cluster_state() == "RUNNING"

    # a second tweak changes nothing
    again = json.loads(ok(cluster, "--json", "tweak"))
    assert again["changed"] is False and again["dry_run"] is False
    assert non_feeding(again["rows"]) == rows


def test_tweak_refusals(cluster):
    assert refused(cluster, "tweak", "S99") == "unknown node: S99"
    assert refused(cluster, "tweak", "-n", "s99") == "unknown node: S99"
    assert refused(cluster, "tweak", "M1") == "M1 is not a storage node"
    assert refused(cluster, "tweak", "X1") == (
        "invalid node id 'X1': expected an integer or e.g. 'S1', 'M1'")
    # nothing to rebalance: no change
    assert json.loads(ok(cluster, "--json", "tweak"))["changed"] is False
    # draining both would leave no storage
    assert "no storage node left" in refused(cluster, "tweak", "S1", "S2")

    # a down storage holding cells must be listed explicitly
    assert ok(cluster, "kill", "S2") == ""
    assert cluster.nodes["S2"].wait(30) == 0
    wait_until(lambda: _storage(cluster, "S2").get("state") == "DOWN", 30, "S2 down")
    assert refused(cluster, "tweak") == (
        "S2 (DOWN) is not running but holds cells: list it to drain it")
    assert refused(cluster, "tweak", "-n") == (
        "S2 (DOWN) is not running but holds cells: list it to drain it")
    assert ok(cluster, "tweak", "-n", "S2").splitlines() == ["S1 R " + "U" * 12,
                                                            "S2 D " + "." * 12]
    assert print_pt(cluster)["ptid"] == 2  # 1, then S2's cells outdated
    assert ok(cluster, "tweak", "S2").splitlines() == ["S1 R " + "U" * 12, "S2 D " + "." * 12]
    assert ok(cluster, "print", "pt").splitlines() == [
        "# ptid: 3, replicas: 1", "S1 R " + "U" * 12, "S2 D " + "." * 12]

    # not RUNNING: refused
    cluster.nodes["S1"].kill()
    wait_until(lambda: cluster.cluster_state() == "RECOVERING", 30, "the cluster to stop")
    assert refused(cluster, "tweak") == "cluster is RECOVERING, not RUNNING"
    assert refused(cluster, "tweak", "-n") == "cluster is RECOVERING, not RUNNING"
    assert refused(cluster, "set", "replicas", "2") == "cluster is RECOVERING, not RUNNING"


def _persisted_replicas(cluster, i):
    db = sqlite3.connect(os.path.join(cluster.directory, "storage%d.sqlite" % i), timeout=10)
    try:
        row = db.execute("SELECT value FROM config WHERE name='replicas'").fetchone()
    finally:
        db.close()
    return row and row[0]


def test_set_replicas(cluster):
    add_third_storage(cluster)
    assert ok(cluster, "set", "replicas", "2") == ""
    lines = ok(cluster, "print", "pt").splitlines()
    assert lines == ["# ptid: 2, replicas: 2", "S1 R " + "U" * 12, "S2 R " + "U" * 12,
                     "S3 R " + "." * 12]  # no cell moved
    # every storage, the new one included, persists the new count
    for i in (1, 2, 3):
        wait_until(lambda i=i: _persisted_replicas(cluster, i) == "2", 30,
                   "S%d to persist replicas 2" % i)
    assert ok(cluster, "print", "ids").splitlines()[2] == "last_ptid = 2"
    # the same count again: nothing to broadcast
    assert json.loads(ok(cluster, "--json", "set", "replicas", "2")) == {"ok": True, "replicas": 2}
    assert print_pt(cluster)["ptid"] == 2

    # tweak now puts a cell of every partition on each of the 3 storages
    data = json.loads(ok(cluster, "--json", "tweak", "-n"))
    assert data["changed"] is True
    assert all(sorted(row) == [["S1", "UP_TO_DATE"], ["S2", "UP_TO_DATE"], ["S3", "OUT_OF_DATE"]]
               for row in data["rows"]), data["rows"]
    assert print_pt(cluster)["ptid"] == 2


def test_set_replicas_bad_arguments(cluster):
    for words, error in [
        (["replicas", "x"], "invalid number of replicas 'x': expected 0, 1, 2, ..."),
        (["replicas", "-1"], "invalid number of replicas '-1': expected 0, 1, 2, ..."),
        (["replicas", "1.5"], "invalid number of replicas '1.5': expected 0, 1, 2, ..."),
        (["replicas", "9" * 30], "invalid number of replicas '%s': too large" % ("9" * 30)),
        (["replicas"], "usage: set cluster STATE | set replicas N"),
        (["replicas", "1", "2"], "usage: set cluster STATE | set replicas N"),
    ]:
        assert refused(cluster, "set", *words) == error, words
    # the master checks too (neoctl is not the only possible client)
    ctl = cluster.ctl()
    try:
        with pytest.raises(CtlError, match=r"^invalid number of replicas: -1 \(must be 0 or more\)$"):
            ctl.call(Packets.SetNumReplicas, -1)
        (changed, rows) = ctl.call(Packets.TweakPartitionTable, True, [])
        assert changed is False and len(rows) == 12
    finally:
        ctl.close()
    assert print_pt(cluster)["replicas"] == 1


def test_dry_run_option_only_with_tweak():
    # refused before connecting (no cluster at all)
    out = subprocess.run([sys.executable, "-m", "neozodb.ctl.neoctl", "-a", "127.0.0.1:1", "-n",
                          "print", "pt"], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr == "neoctl: error: -n/--dry-run is only valid with tweak\n"
