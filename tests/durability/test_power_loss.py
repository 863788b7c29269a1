"""Power loss: storages keep their SQLite databases on powerfs, a FUSE layer
that loses every write not fsynced when the power is cut.  Writers commit,
every node is SIGKILLed at a random moment, the power is cut, and every
acknowledged commit must be on disk on every replica, then readable through
a client once the cluster runs again.  SIGKILL alone proves nothing about
fsync (the kernel keeps what was written); the cut does, and
``test_unsafe_storage_loses_acknowledged_commits`` shows the check sees
what a storage that does not fsync loses.

The random moments come from a seed, printed; NEOZODB_POWER_SEED=<seed>
replays a failure.  A longer run: ``python -m tests.durability.soak``."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap

import pytest
from power import Disk, NoFuse, PowerRun, fuse_unavailable

from seeds import replay_seed

pytestmark = pytest.mark.timeout(150)


def seeded() -> random.Random:
    return random.Random(replay_seed("NEOZODB_POWER_SEED", "power-loss"))


@pytest.fixture(scope="session")
def fuse_mounts(tmp_path_factory) -> str | None:
    """Why this machine cannot mount FUSE at all (checked once, by a
    mount), None if it can; an unexpected failure of powerfs fails."""
    reason = fuse_unavailable()
    if reason is None:
        disk = Disk(str(tmp_path_factory.mktemp("probe")))
        try:
            disk.mount()
        except NoFuse as e:
            reason = "FUSE cannot mount here: %s" % e
        finally:
            disk.unmount()
    return reason


@pytest.fixture
def fuse_ok(fuse_mounts) -> None:
    if fuse_mounts is not None:
        pytest.skip(fuse_mounts)


@pytest.mark.parametrize("storages, replicas, rounds", [(2, 1, 6), (1, 0, 3), (2, 0, 3)])
def test_acknowledged_commits_survive_power_loss(fuse_ok, tmp_path, storages, replicas, rounds):
    rng = seeded()
    with PowerRun(str(tmp_path), storages, replicas, rng) as run:
        acked = 0
        for r in range(rounds):
            result = run.round()
            acked += result.acked
            print("round %d: %d commits acknowledged, %d bytes not fsynced lost at the cut"
                  % (r, result.acked, result.lost_bytes))
            assert result.acked > 0
            assert result.lost_bytes > 0  # the cut did undo something
            assert not result.problems, "round %d:\n%s" % (r, "\n".join(result.problems))
        problems = run.final_check()
        assert not problems, "\n".join(problems)
        print("%d rounds, %d commits acknowledged, none lost" % (rounds, acked))


def test_unsafe_storage_loses_acknowledged_commits(fuse_ok, tmp_path):
    """The same round with storages that never fsync (synchronous=OFF,
    through unsafe_storage.py): the acknowledged commits of that round
    are all missing after the cut, those of a safe round before are not.
    Without this, the test above could pass by checking nothing."""
    rng = seeded()
    with PowerRun(str(tmp_path), 2, 1, rng) as run:
        result = run.round()
        assert result.acked and not result.problems, result.problems
        safe = run.acked()
        run.cluster.stop()
        run.unsafe_storages()
        run.cluster.restart()
        acked_now, report = run.crash()
        assert acked_now > 0
        acked = run.acked()
        from checks import check_disk
        problems = check_disk(run.databases(), run.writers, acked)
        missing = {(w, n) for w, commits in acked.items() for n in commits
                   if any(p.startswith("%s %d " % (w, n)) for p in problems)}
        unsafe = {(w, n) for w, commits in acked.items() for n in commits if n not in safe[w]}
        assert missing == unsafe, (sorted(missing), sorted(unsafe))
        # and the checker itself finds nothing wrong with the safe round
        assert not check_disk(run.databases(), run.writers, safe)


# A SQLite program committing in WAL mode at the given synchronous level,
# printing each commit once COMMIT returned; after the given number of
# commits (if any), it waits to be killed.
SQLITE_WRITER = textwrap.dedent("""
    import sqlite3, sys
    db = sqlite3.connect(sys.argv[1], isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=" + sys.argv[2])
    db.execute("CREATE TABLE IF NOT EXISTS t (i INTEGER PRIMARY KEY, v BLOB)")
    i = 0
    while i != int(sys.argv[3]):
        i += 1
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t (i, v) VALUES (?, ?)", (i, b"x" * 3000))
        db.execute("COMMIT")
        print(i, flush=True)
    sys.stdin.read()
""")


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL", "OFF"])
def test_sqlite_alone(fuse_ok, tmp_path, synchronous):
    """The layer on its own, with a plain SQLite program killed and cut
    after 500 commits: at synchronous=FULL (what storages run) every
    acknowledged commit is there; at NORMAL (the WAL is fsynced only at
    checkpoints: the first one comes after about 330 of these commits) and
    OFF, the last ones are not."""
    from neozodb.cli.cluster import wait_until
    disk = Disk(str(tmp_path))
    out = tmp_path / "out"
    try:
        disk.mount()
        db = os.path.join(disk.mountpoint, "t.sqlite")
        with open(out, "w") as f:
            proc = subprocess.Popen([sys.executable, "-c", SQLITE_WRITER, db, synchronous, "500"],
                                    stdout=f, stdin=subprocess.PIPE)
        try:
            wait_until(lambda: len(out.read_text().split()) >= 500, 60, "500 commits")
        finally:
            proc.kill()
            proc.wait(10)
        acked = len(out.read_text().split())
        disk.cut()
        disk.mount()
        import sqlite3
        conn = sqlite3.connect(db)
        try:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
            have = conn.execute("SELECT COUNT(*) FROM t").fetchone()[0] if "t" in tables else 0
        finally:
            conn.close()
    finally:
        disk.unmount()
    print(synchronous, "acknowledged", acked, "after the cut", have)
    assert acked == 500
    if synchronous == "FULL":
        assert have == acked
    else:
        assert have < acked


@pytest.mark.parametrize("naive", [True, False])
def test_wal_index_mapping(fuse_ok, tmp_path, naive):
    """Why powerfs writes through: a layer that reports the durable size of
    a file (``powerfs --naive``, as one keeping unsynced writes in memory
    would) kills SQLite with SIGBUS in WAL mode as soon as anyone stats
    the never-fsynced ``-shm`` while SQLite has it mapped: the kernel
    shrinks the mapping to the size reported.  powerfs itself survives the
    same stats."""
    import signal
    disk = Disk(str(tmp_path), naive=naive)
    out = tmp_path / "out"
    try:
        disk.mount()
        db = os.path.join(disk.mountpoint, "t.sqlite")
        with open(out, "w") as f:
            proc = subprocess.Popen([sys.executable, "-c", SQLITE_WRITER, db, "FULL", "1000"],
                                    stdout=f, stdin=subprocess.PIPE)
        try:
            # stat the directory while SQLite commits, until it has made
            # 1000 commits or died (each listing refreshes the attributes)
            for _ in range(100000):
                if proc.poll() is not None or len(out.read_text().split()) >= 1000:
                    break
                for name in os.listdir(disk.mountpoint):
                    try:
                        os.stat(os.path.join(disk.mountpoint, name))
                    except FileNotFoundError:
                        pass  # SQLite's journal, gone since (before WAL mode)
        finally:
            if proc.poll() is None:
                proc.kill()
            status = proc.wait(10)
    finally:
        disk.unmount()
    if naive:
        assert status == -signal.SIGBUS, (status, len(out.read_text().split()))
    else:
        assert status == -signal.SIGKILL and len(out.read_text().split()) >= 1000
