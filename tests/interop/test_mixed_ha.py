"""High availability across implementations: masters of both kinds taking
over from one another under load (two or three masters, writers using
either client), and the admin node of either kind SIGKILLed and restarted
under load.  Every acknowledged commit must be there afterwards.

Bounds are generous: on a loaded two-core machine an election, a
recovery and the clients' reconnection can take most of a minute, and a
neoctl request made while the admin is between two primaries is made again
(``MixedCluster.through_ctl``)."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from neopeer import mixed_cluster, neo_env, neo_writer_script

from neozodb.cli.cluster import wait_until
from neozodb.cli.config import format_address
from neozodb.protocol import NodeStates
from writers import WRITER, Writers

pytestmark = pytest.mark.timeout(600)

#: Any wait for the cluster to get over a crash.
PATIENCE = 120


def _writers(c, tmp_path, client: str) -> Writers:
    if client == "NEO":
        return Writers(c, tmp_path, retry=True, script=neo_writer_script(), env=neo_env())
    return Writers(c, tmp_path, retry=True, script=WRITER)


def _master_entries(c) -> dict:
    """Master entries of the admin's node list by address."""
    from neozodb.nodes import address_from_wire
    from neozodb.protocol import NodeTypes
    nodes = c.through_ctl(lambda ctl: ctl.nodes(NodeTypes.MASTER), "the master list")
    return {address_from_wire(n[1]): n for n in nodes}


def _primary_process(c, name: str) -> str:
    """The harness name (M<place in -m>) of the master that the cluster
    calls ``name``: NEO's primary names masters itself, in its own order."""
    from neozodb.protocol import nid_str
    for address, entry in _master_entries(c).items():
        if nid_str(entry[2]) == name:
            return c.master_names[c.master_addresses.index(address)]
    raise LookupError(name)


def _running_primary_process(c) -> str | None:
    """The harness name of the primary once the cluster runs; None while
    the admin's lists are between two primaries (a name it gives may not
    be in the node list it gives next)."""
    try:
        return _primary_process(c, c.wait_primary(PATIENCE))
    except LookupError:
        return None


def _master_running(c, process: str) -> bool:
    entry = _master_entries(c).get(c.master_addresses[c.master_names.index(process)])
    return entry is not None and entry[3] is NodeStates.RUNNING


def _kill_primaries(c, writers: Writers, rounds: int) -> list[str]:
    """``rounds`` times: SIGKILL the primary while the writers commit, wait
    for another master to take over and commits to resume, restart the
    killed master and wait until it is back as a secondary.  Returns the
    harness names of the killed primaries."""
    killed = []
    for _ in range(rounds):
        wait_until(writers.more(10), PATIENCE, "writers to commit")
        process = wait_until(lambda: _running_primary_process(c), PATIENCE, "a primary")
        killed.append(process)
        c.nodes[process].signal(signal.SIGKILL)
        c.nodes[process].wait(10)
        wait_until(lambda p=process: _running_primary_process(c) not in (None, p), PATIENCE,
                   "another primary than %s" % process)
        wait_until(writers.more(10), PATIENCE, "commits under the new primary")
        c.nodes[process].start()
        wait_until(lambda p=process: _master_running(c, p), PATIENCE,
                   "%s back as a secondary" % process)
    return killed


@pytest.mark.parametrize("client", ["neozodb", "NEO"])
@pytest.mark.parametrize("neo_master", ["M1", "M2"])
def test_master_takeover_across(tmp_path, neo_master, client):
    """Two masters, one of each kind, writers using either client: kill the
    primary under load, the other takes over; restart it, kill the new
    primary: the first takes over again.  Commits resume each time and none
    is lost."""
    c = mixed_cluster(tmp_path, ("S2", neo_master), masters=2)
    try:
        writers = _writers(c, tmp_path, client)
        try:
            killed = _kill_primaries(c, writers, 2)
        finally:
            writers.stop()
        writers.check()
        # each kind took over from the other
        assert sorted(c.kind(p) for p in killed) == ["NEO", "neozodb"]
    finally:
        c.kill()


THREE = {"NEO-ours-NEO": ("M1", "M3"), "ours-NEO-ours": ("M2",)}


@pytest.mark.parametrize("masters", list(THREE))
def test_three_masters_mixed(tmp_path, masters):
    """Three masters of mixed kinds (S2 is NEO's, S1 ours): one is elected
    and the two others serve as its secondaries; killing the primary under
    load three times, each time another takes over and commits resume.
    Which survivor takes over is the masters' business; if one kind never
    did, the others are all killed and it must (if it is ours, those but
    the primary are then restarted: ours need a majority of the masters).
    No acknowledged commit is lost."""
    c = mixed_cluster(tmp_path, ("S2",) + THREE[masters], masters=3)
    try:
        primary = wait_until(lambda: _running_primary_process(c), PATIENCE, "an election")
        # one primary, and both others known to it as running secondaries
        wait_until(lambda: all(_master_running(c, m) for m in c.master_names), PATIENCE,
                   "every master running")
        assert len(_master_entries(c)) == 3
        writers = Writers(c, tmp_path, retry=True)
        try:
            killed = _kill_primaries(c, writers, 3)
            assert killed[0] == primary
            current = wait_until(lambda: _running_primary_process(c), PATIENCE, "a primary")
            took_over = {c.kind(p) for p in killed[1:] + [current]}
            if took_over != {"NEO", "neozodb"}:
                last = next(m for m in c.master_names if c.kind(m) not in took_over)
                others = sorted(set(c.master_names) - {last, current})
                for m in others + [current]:
                    c.nodes[m].signal(signal.SIGKILL)  # secondaries first
                    c.nodes[m].wait(10)
                if c.kind(last) == "neozodb":
                    # alone, ours is not a majority of three: the others but
                    # the last primary come back, with later claims
                    for m in others:
                        c.nodes[m].start()
                wait_until(lambda: _running_primary_process(c) == last, PATIENCE,
                           "%s, the last master, to take over" % last)
                wait_until(writers.more(10), PATIENCE, "commits under %s" % last)
        finally:
            writers.stop()
        writers.check()
    finally:
        c.kill()


def _neoctl(c, kind: str, *words: str) -> subprocess.CompletedProcess:
    if kind == "NEO":
        return c.neo_neoctl(*words)
    argv = [sys.executable, "-m", "neozodb.ctl.neoctl", "-a", format_address(c.admin_address)]
    if c.ctl_cluster:
        argv += ["-c", c.ctl_cluster]
    return subprocess.run(argv + list(words), capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("admin", ["neozodb", "NEO"])
@pytest.mark.parametrize("master", ["neozodb", "NEO"])
def test_admin_sigkill_under_load(tmp_path, master, admin):
    """The admin node, of either kind, is SIGKILLed and restarted while two
    writers commit (S2 is NEO's, S1 ours): commits go on without it, both
    neoctls work with the restarted admin, and every acknowledged commit is
    there."""
    neo = ("S2",) + (("M1",) if master == "NEO" else ()) + (("A1",) if admin == "NEO" else ())
    c = mixed_cluster(tmp_path, neo)
    try:
        writers = Writers(c, tmp_path, retry=True)
        try:
            wait_until(writers.more(20), PATIENCE, "writers to commit")
            c.nodes["A1"].signal(signal.SIGKILL)
            c.nodes["A1"].wait(10)
            wait_until(writers.more(20), PATIENCE, "commits without the admin")
            c.nodes["A1"].start()
            c.wait_state("RUNNING", PATIENCE)
            wait_until(writers.more(20), PATIENCE, "commits after the admin's restart")
            for words in (["print", "cluster"], ["print", "pt"], ["print", "node"]):
                outs = [_neoctl(c, kind, *words) for kind in ("NEO", "neozodb")]
                assert [o.returncode for o in outs] == [0, 0], [o.stderr for o in outs]
                assert outs[0].stdout == outs[1].stdout, words
            assert _neoctl(c, "NEO", "print", "cluster").stdout == "RUNNING\n"
            nodes = _neoctl(c, "NEO", "print", "node").stdout.splitlines()
            # the restarted admin is A1 again for NEO's master, which reuses
            # the smallest free id, A2 for ours, which never reuses one
            entries = [(n.split(" | ")[0], n.split(" | ")[3]) for n in nodes
                       if not n.startswith("C")]
            assert entries[1:] == [("M1", "RUNNING"), ("S1", "RUNNING"), ("S2", "RUNNING")]
            assert entries[0] == ("A1" if master == "NEO" else "A2", "RUNNING"), entries
            assert _neoctl(c, "NEO", "print", "pt").stdout.splitlines()[1:] == [
                "S1 R UUUUUU", "S2 R UUUUUU"]
        finally:
            writers.stop()
        writers.check()
    finally:
        c.kill()
