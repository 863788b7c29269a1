"""neoctl across implementations: NEO's and ours, each against NEO's admin
and ours, each in front of NEO's master and ours; and ``check`` with the
copies of a partition on NEO's storage and ours, a copy damaged by editing
its SQLite database while its node is stopped."""
from __future__ import annotations

import itertools
import os
import re
import sqlite3
import subprocess
import sys

import pytest
import transaction
import ZODB
from neopeer import MixedCluster
from persistent.mapping import PersistentMapping

from neozodb.cli.cluster import wait_until
from neozodb.cli.config import format_address
from neozodb.client import Storage

pytestmark = pytest.mark.timeout(300)

KINDS = ("NEO", "neozodb")
ADMIN_MASTER = list(itertools.product(KINDS, repeat=2))
NODE_LINE = re.compile(r"[AMS]\d+ \| (ADMIN  |MASTER |STORAGE) \| (127\.0\.0\.1:\d+)? *\| "
                       r"[A-Z]+ \| (None|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6})")


def cluster_of(tmp_path, admin: str, master: str, neo=(), **kw) -> MixedCluster:
    names = [n for n, kind in (("A1", admin), ("M1", master)) if kind == "NEO"]
    kw.setdefault("partitions", 4)
    kw.setdefault("replicas", 1)
    return MixedCluster(str(tmp_path / "c"), neo=names + list(neo), name="ctl", **kw)


def neoctl(cluster: MixedCluster, kind: str, *words: str, identify: bool = True,
           timeout: float = 90.0) -> subprocess.CompletedProcess:
    """``kind``'s neoctl; ours names the cluster (``-c``) to our admin
    unless ``identify`` is false, never to NEO's (which takes an identifying
    admin for a backup cluster's)."""
    if kind == "NEO":
        return cluster.neo_neoctl(*words, timeout=timeout)
    argv = [sys.executable, "-m", "neozodb.ctl.neoctl", "-a", format_address(cluster.admin_address)]
    if identify and cluster.ctl_cluster:
        argv += ["-c", cluster.ctl_cluster]
    return subprocess.run(argv + list(words), capture_output=True, text=True, timeout=timeout)


def ok(cluster, kind, *words, **kw) -> str:
    out = neoctl(cluster, kind, *words, **kw)
    assert out.returncode == 0 and "Traceback" not in out.stderr, (kind, words, out.stderr)
    return out.stdout


def refused(cluster, kind, *words) -> str:
    out = neoctl(cluster, kind, *words)
    assert (out.returncode, out.stdout) == (1, ""), (kind, words, out.stdout, out.stderr)
    assert len(out.stderr.splitlines()) == 1, out.stderr
    return out.stderr.rstrip("\n")


def commit(cluster, first: int, count: int) -> bytes:
    """Commit ``count`` transactions, each a new object (keys first..) and
    the root: revisions in every partition; the last TID."""
    db = ZODB.DB(Storage(format_address(cluster.master_address), cluster.name))
    try:
        root = db.open().root()
        for i in range(first, first + count):
            root[i] = PersistentMapping(value=i)
            transaction.commit()
        return db.lastTransaction()
    finally:
        db.close()


def pt_grid(cluster) -> list[str]:
    return ok(cluster, "neozodb", "print", "pt").splitlines()[1:]


def storage_states(cluster) -> dict[str, str]:
    lines = ok(cluster, "neozodb", "print", "node", "STORAGE").splitlines()
    return {line.split(" | ")[0]: line.split(" | ")[3] for line in lines}


def settled(cluster) -> bool:
    """Every cell up to date (no OUT_OF_DATE, FEEDING, CORRUPTED)."""
    return all(set(line.split()[2]) <= {"U", "."} for line in pt_grid(cluster))


# -- reading -----------------------------------------------------------------------------

@pytest.mark.parametrize("admin,master", ADMIN_MASTER)
def test_print_commands_agree(tmp_path, admin, master):
    """Both neoctls print the same text for every print command NEO's has,
    in the formats of the reference."""
    c = cluster_of(tmp_path, admin, master, storages=2)
    try:
        c.start(wait=60)
        for words in (["print", "ids"], ["print", "summary"]):  # before any commit
            assert ok(c, "NEO", *words) == ok(c, "neozodb", *words), words
        assert ok(c, "neozodb", "print", "ids").splitlines()[1] == \
            "last_tid = 0x0 (1900-01-01 00:00:00)"
        tid = commit(c, 0, 3)
        for words in (["print", "cluster"], ["print", "node"], ["print", "node", "STORAGE"],
                      ["print", "pt"], ["print", "ids"], ["print", "primary"],
                      ["print", "summary"]):
            neo = ok(c, "NEO", *words)
            assert neo == ok(c, "neozodb", *words), words
            if admin == "neozodb":
                assert neo == ok(c, "neozodb", *words, identify=False), words
        assert ok(c, "NEO", "print", "cluster") == "RUNNING\n"
        assert ok(c, "NEO", "print", "primary") == "M1\n"
        assert ok(c, "NEO", "print", "pt") == "# ptid: 1, replicas: 1\nS1 R UUUU\nS2 R UUUU\n"
        nodes = ok(c, "NEO", "print", "node").splitlines()
        assert [n[:2] for n in nodes] == ["A1", "M1", "S1", "S2"]
        assert all(NODE_LINE.fullmatch(n) for n in nodes), nodes
        ids = ok(c, "NEO", "print", "ids").splitlines()
        assert re.fullmatch(r"last_oid = 0x[1-9a-f][0-9a-f]*", ids[0]) and ids[2] == "last_ptid = 1"
        assert re.fullmatch(r"last_tid = %#x \(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{6})?\)"
                            % int.from_bytes(tid, "big"), ids[1]), ids
        summary = ok(c, "NEO", "print", "summary").splitlines()
        assert summary[0] == "# {}"
        assert summary[1].startswith("RUNNING; UP_TO_DATE=8; ltid=%s (" % tid.hex())
        # what only a neozodb master and admin report: one line, no traceback
        for what in ("check", "pack", "import"):
            out = neoctl(c, "neozodb", "print", what)
            if admin == master == "neozodb":
                assert out.returncode == 0, (what, out.stderr)
            else:
                assert (out.returncode, out.stdout) == (1, ""), (what, out.stdout)
                assert re.fullmatch(r"the (master|admin) does not report [^\n]*\n", out.stderr)
        assert ok(c, "NEO", "print", "cluster") == "RUNNING\n"  # nobody was dropped
    finally:
        c.kill()


# -- changing ----------------------------------------------------------------------------

def _add(c, kind, i, words):
    c.storage(i).start()
    wait_until(lambda: storage_states(c).get("S%d" % i) == "PENDING", 30, "S%d pending" % i)
    assert ok(c, kind, "add", *words) == "Nodes added: S%d\n" % i


@pytest.mark.parametrize("admin,master", ADMIN_MASTER)
def test_state_changing_commands(tmp_path, admin, master):
    """add, tweak, set replicas, prune_orphan, flush_log, kill, drop,
    check, truncate, set cluster STOPPING: each from both neoctls."""
    c = cluster_of(tmp_path, admin, master, storages=4)
    c.num_storages = 2  # S3 and S4 join later
    try:
        c.start(wait=60)
        commit(c, 0, 5)
        _add(c, "NEO", 3, ["S3"])
        _add(c, "neozodb", 4, ["all"])
        for kind in KINDS:
            assert ok(c, kind, "add", "all") == "No node added\n"

        grid = ok(c, "NEO", "tweak", "-n").splitlines()
        assert ok(c, "neozodb", "tweak", "-n").splitlines() == grid
        assert [line[:4] for line in grid] == ["S1 R", "S2 R", "S3 R", "S4 R"]
        assert ok(c, "neozodb", "tweak").splitlines() == grid
        wait_until(lambda: settled(c), 60, "replication to the new storages")
        for kind in KINDS:
            assert ok(c, kind, "tweak") == "No change done.\n"
            assert ok(c, kind, "set", "replicas", "1") in ("", "\n")

        for kind in KINDS:
            ok(c, kind, "prune_orphan", "1", "all")
            ok(c, kind, "prune_orphan", "0", "S1", "S2")
            ok(c, kind, "flush_log")
        # a flush reached every node; none took it for a protocol error
        assert set(storage_states(c).values()) == {"RUNNING"}
        commit(c, 5, 1)

        assert ok(c, "NEO", "kill", "S4") == "state changed\n"
        wait_until(lambda: storage_states(c).get("S4") == "DOWN", 30, "S4 down")
        assert ok(c, "neozodb", "drop", "S4") == ""
        assert "S4" not in storage_states(c)
        ok(c, "NEO", "tweak")  # two copies of S4's partitions again
        wait_until(lambda: settled(c), 60, "replication of S4's partitions")
        assert ok(c, "neozodb", "kill", "S3") == ""
        wait_until(lambda: storage_states(c).get("S3") == "DOWN", 30, "S3 down")
        assert ok(c, "NEO", "drop", "S3") == "node permanently removed\n"
        ok(c, "neozodb", "tweak")
        wait_until(lambda: settled(c), 60, "replication of S3's partitions")
        assert pt_grid(c) == ["S1 R UUUU", "S2 R UUUU"]
        for kind in KINDS:
            assert refused(c, kind, "drop", "S9") == "unknown node"

        ok(c, "NEO", "check", "0:", "1:S1")
        ok(c, "neozodb", "check")

        first = commit(c, 10, 1)
        second = commit(c, 11, 1)
        commit(c, 12, 1)
        for kind, tid in (("NEO", second), ("neozodb", first)):
            ok(c, kind, "truncate", "tid:%#x" % int.from_bytes(tid, "big"))
            wait_until(lambda: ok(c, "neozodb", "print", "cluster") == "RUNNING\n", 60,
                       "the cluster back after the truncation")
            last = ok(c, "neozodb", "print", "ids").splitlines()[1]
            assert last.startswith("last_tid = %#x " % int.from_bytes(tid, "big")), last

        assert ok(c, "NEO" if master == "neozodb" else "neozodb",
                  "set", "cluster", "STOPPING") in ("", "Cluster state changed\n")
        for name in ("M1", "S1", "S2"):
            assert c.nodes[name].wait(30) is not None, name
    finally:
        c.kill()


@pytest.mark.parametrize("first", KINDS)
@pytest.mark.parametrize("admin,master", ADMIN_MASTER)
def test_start(tmp_path, admin, master, first):
    c = cluster_of(tmp_path, admin, master, storages=2, autostart=False)
    try:
        c.start(wait=0)
        wait_until(lambda: neoctl(c, "neozodb", "print", "cluster").stdout == "RECOVERING\n",
                   60, "the cluster to wait in RECOVERING")
        wait_until(lambda: set(storage_states(c).values()) == {"PENDING"}
                   and len(storage_states(c)) == 2, 30, "both storages")
        ok(c, first, "start")
        c.wait_state("RUNNING", 60)
        other = "NEO" if first == "neozodb" else "neozodb"
        assert refused(c, other, "start")  # already started: one line
    finally:
        c.kill()


# -- check across implementations ------------------------------------------------------------

def damage(c, i: int, partition: int) -> tuple[int, int]:
    """Stop S<i>, delete its oldest object revision of ``partition`` from
    its database (what NEO's digests see), restart it and wait until its
    cells are up to date again (replication resumes from where the copy
    was: the hole stays).  The (oid, tid) deleted."""
    name = "S%d" % i
    c.nodes[name].kill()
    wait_until(lambda: storage_states(c).get(name) == "DOWN", 30, name + " down")
    db = sqlite3.connect(c.database(i))
    try:
        with db:
            oid, tid = db.execute("SELECT oid, tid FROM obj WHERE partition=? ORDER BY tid"
                                  " LIMIT 1", (partition,)).fetchone()
            db.execute("DELETE FROM obj WHERE partition=? AND oid=? AND tid=?",
                       (partition, oid, tid))
    finally:
        db.close()
    c.storage(i).start()
    wait_until(lambda: storage_states(c).get(name) == "RUNNING" and settled(c), 60,
               name + " back up to date")
    assert not has_revision(c.database(i), (oid, tid)), "replication filled the hole"
    return oid, tid


def has_revision(path: str, key: tuple[int, int]) -> bool:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT 1 FROM obj WHERE oid=? AND tid=?", key).fetchone() is not None
    finally:
        db.close()


def logged(c, name: str, text: str) -> list[str]:
    with open(os.path.join(c.directory, name + ".log"), errors="replace") as f:
        return [line for line in f if text in line]


@pytest.mark.parametrize("neo_storage", ["S1", "S2"])
def test_check_mixed_copies_neozodb_master(tmp_path, neo_storage):
    """A neozodb storage checks every partition against NEO's copy (NEO's
    digests), the check ends, a damaged copy on either side is found and
    rebuilt from the reference."""
    c = cluster_of(tmp_path, "neozodb", "neozodb", neo=[neo_storage], storages=2)
    try:
        c.start(wait=60)
        commit(c, 0, 20)
        out = neoctl(c, "neozodb", "check", timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == ["partition %d: ok: S1 S2 agree" % p for p in range(4)] + [
            "4 partitions checked, 0 corrupted copies found, 0 repaired"]

        for bad, good, partition in ((1, 2, 1), (2, 1, 2)):
            key = damage(c, bad, partition)
            out = neoctl(c, "neozodb", "check", timeout=30)
            assert out.returncode == 0, out.stderr
            lines = out.stdout.splitlines()
            assert lines[partition] == ("partition %d: copies on S1 S2 differ and none is a"
                                        " majority: check again naming a reference" % partition)
            assert [n for n, line in enumerate(lines[:4]) if "ok: S1 S2 agree" not in line] == [
                partition]
            # NEO's syntax: PARTITION:REFERENCE
            out = neoctl(c, "neozodb", "check", "%d:S%d" % (partition, good), timeout=60)
            assert out.returncode == 0, out.stderr
            assert out.stdout.splitlines() == [
                "partition %d: S%d differed from S%d; S%d repaired" % (partition, bad, good, bad),
                "1 partitions checked, 1 corrupted copies found, 1 repaired"]
            assert has_revision(c.database(bad), key)
            out = neoctl(c, "neozodb", "check", timeout=30)
            assert out.stdout.splitlines()[-1] == \
                "4 partitions checked, 0 corrupted copies found, 0 repaired"
    finally:
        c.kill()


def test_check_partitions_on_neo_storages_only(tmp_path):
    """Partitions whose copies are all on NEO's storages are checked by one
    of them, which reports differences only: the check does not wait for
    it, acts on what it reports."""
    c = cluster_of(tmp_path, "neozodb", "neozodb", neo=["S1", "S2"], storages=3, partitions=6)
    try:
        c.start(wait=60)
        commit(c, 0, 30)
        grid = pt_grid(c)
        neo_only = [p for p in range(6) if grid[2].split()[2][p] == "."]
        assert neo_only  # S1 and S2 only
        out = neoctl(c, "neozodb", "check", timeout=30)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        for p in range(6):
            if p in neo_only:
                assert re.fullmatch(r"partition %d: checked by S[12], NEO's storage, which"
                                    r" reports differences only: none reported so far" % p,
                                    lines[p]), lines[p]
            else:
                assert re.fullmatch(r"partition %d: ok: S\d S\d agree" % p, lines[p]), lines[p]
        assert lines[-1] == ("%d partitions checked, 0 corrupted copies found, 0 repaired;"
                             " %d left to NEO's storages, which report differences only"
                             % (6 - len(neo_only), len(neo_only)))

        partition = neo_only[0]
        key = damage(c, 1, partition)
        out = neoctl(c, "neozodb", "check", "%d:S2" % partition, timeout=30)
        assert out.returncode == 0, out.stderr
        # S1, the non-reference copy, checks, finds its own copy odd: repaired
        wait_until(lambda: "S1 repaired" in ok(c, "neozodb", "print", "check"), 60,
                   "the master to repair S1's copy")
        assert ok(c, "neozodb", "print", "check").splitlines()[0] == (
            "partition %d: S1 differed from S2; S1 repaired" % partition)
        wait_until(lambda: settled(c), 60, "S1 up to date")
        assert has_revision(c.database(1), key)
    finally:
        c.kill()


@pytest.mark.parametrize("neo_storage", ["S1", "S2"])
def test_check_mixed_copies_neo_master(tmp_path, neo_storage):
    """NEO's master has the last storage of each row check it (S2 here):
    ours checking NEO's copy, or NEO's checking ours.  NEO's master only
    logs what it is told: a damaged partition, nothing when copies agree."""
    c = cluster_of(tmp_path, "neozodb", "NEO", neo=[neo_storage], storages=2)
    try:
        c.start(wait=60)
        commit(c, 0, 20)
        ours_checks = neo_storage == "S1"
        out = neoctl(c, "neozodb", "check", timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("check of 4 partitions started; the master does not report")
        if ours_checks:
            wait_until(lambda: len(logged(c, "S2", "checked on S1 S2: all copies agree")) == 4,
                       30, "S2 to check every partition")
        damage(c, 1, 1)
        out = neoctl(c, "NEO", "check", *["%d:S2" % p for p in range(4)], timeout=30)
        assert (out.returncode, out.stdout) == (0, ""), out.stderr
        wait_until(lambda: logged(c, "M1", "Partition 1 corrupted in: S1"), 30,
                   "NEO's master to be told")
        if ours_checks:  # S2 went on with the other partitions
            wait_until(lambda: all(len(logged(c, "S2", "partition %d checked on S1 S2: all"
                                                      " copies agree" % p)) == 2
                                   for p in (0, 2, 3)), 30, "S2 to check every partition")
        # NEO's checker stops at the first damage: partition 0 came before
        assert logged(c, "M1", "corrupted in") == logged(c, "M1", "Partition 1 corrupted in: S1")
        assert len(logged(c, "M1", "corrupted in")) == 1
    finally:
        c.kill()
