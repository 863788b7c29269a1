"""neoctl against a real cluster: what operators see."""
from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import time

import pytest

from neozodb.cli.cluster import free_port, wait_until
from neozodb.cli.config import format_address

pytestmark = pytest.mark.timeout(120)


# A zone far from UTC, so that printing local time instead of UTC shows.
NOT_UTC = "XYZ-5:30"


def neoctl(cluster, *words, address=None, tz=NOT_UTC):
    return cluster.run_neoctl(*words, address=address, env=dict(os.environ, TZ=tz))


def utc(timestamp):
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).replace(tzinfo=None)


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
    # as NEO's master and neoctl before the first commit
    assert out.stdout.splitlines() == ["last_oid = 0x0", "last_tid = 0x0 (1900-01-01 00:00:00)",
                                       "last_ptid = 1"]
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    conn = db.open()
    conn.root()["a"] = 1
    before = time.time()
    transaction.commit()
    after = time.time()
    tid = db.lastTransaction()
    db.close()
    out = neoctl(cluster, "print", "ids")
    lines = out.stdout.splitlines()
    assert lines[0] == "last_oid = 0x0"
    m = re.fullmatch(r"last_tid = 0x%x \((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6})\)"
                     % int.from_bytes(tid, "big"), lines[1])
    assert m, lines[1]
    # The TID date is UTC whatever the local zone of neoctl (TZ is not UTC).
    when = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f")
    assert utc(before) - datetime.timedelta(seconds=1) <= when <= utc(after), (when, before)
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


@pytest.mark.parametrize("words", [["all"], ["s3"]])
def test_add_pending_storage(cluster, words):
    node = cluster.storage(3)
    node.start()
    out = wait_until(lambda: (lambda o: o if "S3 | STORAGE" in o.stdout else None)(
        neoctl(cluster, "print", "node", "STORAGE")), 30, "S3 to register")
    assert "| PENDING |" in out.stdout.splitlines()[-1]
    out = neoctl(cluster, "add", *words)  # node ids in any case
    assert (out.returncode, out.stdout) == (0, "Nodes added: S3\n")
    out = neoctl(cluster, "print", "node", "STORAGE")
    assert out.stdout.splitlines()[-1].split(" | ")[3] == "RUNNING"


def test_print_node_times_are_utc(cluster):
    out = neoctl(cluster, "print", "node")
    data = json.loads(neoctl(cluster, "--json", "print", "node").stdout)
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert len(lines) == len(data) == 4
    for line, node in zip(lines, data, strict=True):
        when = line.split(" | ")[-1]
        if node["id_timestamp"] is None:
            assert when == "None"
        else:
            # neoctl runs with TZ far from UTC: local time would differ by 5:30.
            assert when == utc(node["id_timestamp"]).strftime("%Y-%m-%d %H:%M:%S.%f"), line
    # and the same text whatever the zone
    assert neoctl(cluster, "print", "node", tz="UTC0").stdout == out.stdout


def test_print_pt_range_and_node(cluster):
    def grid(*args):
        out = neoctl(cluster, "print", "pt", *args)
        assert (out.returncode, out.stderr) == (0, ""), args
        lines = out.stdout.splitlines()
        assert lines[0] == "# ptid: 1, replicas: 1"
        return lines[1:]

    assert grid() == grid("0") == grid("0", "0") == ["S1 R " + "U" * 12, "S2 R " + "U" * 12]
    assert grid("3") == ["S1 R " + "U" * 9, "S2 R " + "U" * 9]  # MIN included
    assert grid("3", "5") == ["S1 R UU", "S2 R UU"]  # MAX excluded
    assert grid("11", "12") == ["S1 R U", "S2 R U"]
    assert grid("2", "0", "S2") == ["S2 R " + "U" * 10]
    assert grid("0", "0", "s1") == ["S1 R " + "U" * 12]  # node ids in any case
    data = json.loads(neoctl(cluster, "print", "pt", "4", "7", "S1", "--json").stdout)
    assert data["min_offset"] == 4 and data["nodes"] == {"S1": "RUNNING"}
    assert data["rows"] == [[["S1", "UP_TO_DATE"]]] * 3


@pytest.mark.parametrize("args, error", [
    (["x"], "invalid MIN 'x': expected a partition number (0, 1, ...)"),
    (["-1"], "invalid MIN '-1': expected a partition number (0, 1, ...)"),
    (["0", "1.5"], "invalid MAX '1.5': expected a partition number (0, 1, ...)"),
    (["5", "3"], "invalid partition range: MAX (3) must be greater than MIN (5), or 0 for the end"),
    (["5", "5"], "invalid partition range: MAX (5) must be greater than MIN (5), or 0 for the end"),
    (["0", "13"], "invalid partition range MIN=0 MAX=13: the table has 12 partitions"),
    (["12"], "invalid partition range MIN=12 MAX=0: the table has 12 partitions"),
    (["0", "0", "X1"], "invalid node id 'X1': expected an integer or e.g. 'S1', 'M1'"),
    (["0", "0", "M1"], "not a storage node: M1"),
    (["0", "0", "S9"], "unknown node: S9"),
    (["0", "0", "S1", "extra"], "usage: print pt [MIN [MAX [NODE]]]"),
])
def test_print_pt_bad_arguments(cluster, args, error):
    out = neoctl(cluster, "print", "pt", *args)
    assert (out.returncode, out.stdout, out.stderr) == (1, "", error + "\n")


def test_options_after_the_command(cluster):
    out = neoctl(cluster, "print", "pt", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["ptid"] == 1
    out = neoctl(cluster, "print", "--json", "cluster")
    assert json.loads(out.stdout) == {"cluster": "RUNNING"}
    # unknown options are errors wherever they are, never command words
    for words, option in ((["print", "pt", "--frobnicate"], "--frobnicate"),
                          (["print", "-x", "cluster"], "-x"),
                          (["--frobnicate", "print", "pt"], "--frobnicate")):
        out = neoctl(cluster, *words)
        assert (out.returncode, out.stdout) == (2, ""), words
        assert len(out.stderr.splitlines()) == 1, out.stderr
        assert out.stderr.startswith("neoctl: error: unrecognized arguments: " + option), words


def test_node_id_errors_are_one_line(cluster):
    out = neoctl(cluster, "add", "X1")
    assert (out.returncode, out.stderr) == (
        1, "invalid node id 'X1': expected an integer or e.g. 'S1', 'M1'\n")
    out = neoctl(cluster, "add", "s9")  # parsed (any case), then refused by the master
    assert (out.returncode, out.stderr) == (1, "unknown node\n")


def test_losing_the_master_forgets_the_partition_table(cluster):
    assert neoctl(cluster, "print", "pt").returncode == 0
    cluster.nodes["M1"].kill()
    # The admin notices the closed connection on its own: poll until it has.
    out = wait_until(lambda: (lambda o: o if o.returncode else None)(
        neoctl(cluster, "print", "pt")), 30, "the admin to drop its partition table")
    assert (out.returncode, out.stdout, out.stderr) == (
        1, "", "not connected to a primary master\n")
    # The cluster state is unknown rather than an error (docs/operations.md).
    out = neoctl(cluster, "print", "cluster")
    assert (out.returncode, out.stdout, out.stderr) == (0, "None\n", "")
    out = neoctl(cluster, "--json", "print", "cluster")
    assert json.loads(out.stdout) == {"cluster": "None"}


def test_admin_forgets_the_partition_table_with_its_master(cluster):
    """The admin's own copy, checked directly: after losing the master it
    must not keep a table that a reconnection could serve before the new
    master sends its own."""
    import asyncio
    import threading

    from neozodb.admin.app import AdminApp

    app = AdminApp(cluster.name, [cluster.master_address], ("127.0.0.1", 0))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(app.run(),), daemon=True)
    thread.start()
    try:
        wait_until(lambda: app.pt is not None and app.pt.ptid == 1, 30, "the admin's table")
        cluster.nodes["M1"].kill()
        wait_until(lambda: app.master_conn is None and app.pt is None, 30,
                   "the admin to forget the table")
    finally:
        loop.call_soon_threadsafe(app.exit)
        thread.join(10)
        loop.close()


# The commands neoctl supports, as its help must list them (with parameters).
COMMANDS = [
    "print cluster",
    "print ids",
    "print node [TYPE]",
    "print pt [MIN [MAX [NODE]]]",
    "print primary",
    "print summary",
    "print check",
    "print pack",
    "print import",
    "print pt_history",
    "start",
    "add NID... | add all",
    "set cluster STATE",
    "set replicas N",
    "tweak [-n] [NID...]",
    "check [PARTITION[:NID]...]",
    "kill NID",
    "drop NID",
    "truncate TID",
    "recover_pt PTID",
    "prune_orphan 0|1 NID...|all",
    "flush_log",
]


def test_no_command_lists_every_command(cluster):
    out = neoctl(cluster)
    assert (out.returncode, out.stderr) == (0, "")
    text = out.stdout.split("\ncommands:\n", 1)[1]
    listed = [line[2:32].rstrip() for line in text.splitlines() if re.match(r"  \S", line)]
    assert listed == COMMANDS
    # and every listed command exists: its command words are not refused as
    # an invalid command (parameters left out: a usage error, or a refusal
    # since the cluster is already RUNNING, at worst).
    for synopsis in listed:
        words = re.match(r"[a-z_ ]+?(?= [A-Z0-9\[]|$| \|)", synopsis).group().split()
        out = neoctl(cluster, *words)
        assert "invalid command" not in out.stderr, (words, out.stderr)
    out = neoctl(cluster, "print")
    assert out.stderr == "print what? (%s)\n" % ", ".join(
        c.split()[1] for c in COMMANDS if c.startswith("print "))


def test_start_lets_a_new_cluster_leave_recovering(tmp_path):
    from neozodb.cli.cluster import LocalCluster
    c = LocalCluster(str(tmp_path / "c"), name="manual", storages=2, replicas=1, partitions=6,
                     autostart=False)
    try:
        c.start(wait=0)
        wait_until(lambda: c.cluster_state() == "RECOVERING", 30, "the admin to report RECOVERING")
        # storages are there, pending, and nothing starts by itself
        out = wait_until(lambda: (lambda o: o if o.stdout.count("PENDING") == 2 else None)(
            neoctl(c, "print", "node", "STORAGE")), 30, "both storages pending")
        assert out.returncode == 0
        assert c.cluster_state() == "RECOVERING"
        out = neoctl(c, "start")
        assert (out.returncode, out.stdout, out.stderr) == (0, "", "")
        c.wait_state("RUNNING", 30)
        out = neoctl(c, "print", "pt")
        assert out.stdout.splitlines() == ["# ptid: 1, replicas: 1", "S1 R UUUUUU", "S2 R UUUUUU"]
    finally:
        c.kill()


def _storage_states(cluster) -> dict[str, str]:
    out = neoctl(cluster, "--json", "print", "node", "STORAGE")
    return {n["nid"]: n["state"] for n in json.loads(out.stdout)}


def test_kill_and_drop(cluster):
    import transaction
    import ZODB

    from neozodb.client import Storage
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    try:
        conn = db.open()
        conn.root()["x"] = 1
        transaction.commit()
        out = neoctl(cluster, "kill", "S2")
        assert (out.returncode, out.stderr) == (0, "")
        assert cluster.nodes["S2"].wait(30) == 0  # it exits by itself, cleanly
        wait_until(lambda: _storage_states(cluster).get("S2") == "DOWN", 30, "S2 down")
        assert neoctl(cluster, "print", "pt").stdout.splitlines()[1:] == [
            "S1 R " + "U" * 12, "S2 D " + "O" * 12]
        # S1 now holds the only readable copy of everything
        out = neoctl(cluster, "kill", "S1")
        assert out.returncode == 1 and "only readable copy" in out.stderr
        out = neoctl(cluster, "drop", "S1")
        assert out.returncode == 1 and "only readable copy" in out.stderr
        out = neoctl(cluster, "kill", "S2")
        assert (out.returncode, out.stderr) == (1, "S2 is not running\n")
        out = neoctl(cluster, "drop", "M1")
        assert out.returncode == 1 and len(out.stderr.splitlines()) == 1
        out = neoctl(cluster, "drop", "s2")
        assert (out.returncode, out.stderr) == (0, "")
        assert neoctl(cluster, "print", "pt").stdout.splitlines()[1:] == ["S1 R " + "U" * 12]
        assert "S2" not in _storage_states(cluster)
        assert cluster.cluster_state() == "RUNNING"
        conn.root()["x"] = 2  # the cluster keeps serving
        transaction.commit()
        out = neoctl(cluster, "drop", "S2")
        assert (out.returncode, out.stderr) == (1, "unknown node\n")
    finally:
        db.close()


def test_drop_running_storage_erases_it(cluster):
    import sqlite3
    out = neoctl(cluster, "drop", "S2")
    assert (out.returncode, out.stderr) == (0, "")
    assert cluster.nodes["S2"].wait(30) == 0  # told it is no longer part of the cluster
    assert neoctl(cluster, "print", "pt").stdout.splitlines()[1:] == ["S1 R " + "U" * 12]
    db = sqlite3.connect(os.path.join(cluster.directory, "storage2.sqlite"))
    try:
        assert db.execute("SELECT COUNT(*) FROM pt").fetchone() == (0,)  # erased
        assert db.execute("SELECT value FROM config WHERE name='nid'").fetchone() is None
    finally:
        db.close()


def _bare_neoctl(address, *words):
    """neoctl without -c: no identification, as NEO's neoctl."""
    return subprocess.run([sys.executable, "-m", "neozodb.ctl.neoctl", "-a", address, *words],
                          capture_output=True, text=True, timeout=60)


def test_admin_requires_the_cluster_name_unless_anonymous_ctl_is_allowed(cluster):
    address = format_address(cluster.admin_address)
    out = _bare_neoctl(address, "print", "cluster")
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("identify first"), out.stderr
    out = _bare_neoctl(address, "-c", "other", "print", "cluster")
    assert (out.returncode, out.stdout, out.stderr) == (1, "", "wrong cluster name\n")
    out = _bare_neoctl(address, "-c", "", "print", "cluster")
    assert (out.returncode, out.stderr) == (1, "wrong cluster name\n")
    # an admin that serves neoctl without identification (NEO's neoctl)
    admin = cluster._node("A2", [sys.executable, "-m", "neozodb.cli.admin", "-c", cluster.name,
                                 "-m", cluster.masters, "-b", "127.0.0.1:0",
                                 "--allow-anonymous-ctl"])
    admin.start()
    anonymous = format_address(cluster._bound(admin, ("127.0.0.1", 0)))
    out = wait_until(lambda: (lambda o: o if o.stdout == "RUNNING\n" else None)(
        _bare_neoctl(anonymous, "print", "cluster")), 30, "A2 to follow the master")
    assert out.returncode == 0
    # identifying still works there, with the right name only
    assert cluster.run_neoctl("print", "cluster", address=anonymous).stdout == "RUNNING\n"
    out = _bare_neoctl(anonymous, "-c", "other", "print", "cluster")
    assert (out.returncode, out.stderr) == (1, "wrong cluster name\n")
