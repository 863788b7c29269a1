"""The power-loss harness shared by test_power_loss.py and soak.py: a powerfs
mount (``Disk``), a LocalCluster whose storages keep their databases on it,
writer processes that record what was acknowledged, and the checks, on the
raw SQLite files and through a ZODB client."""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass

from neozodb.cli.cluster import LocalCluster, wait_until

HERE = os.path.dirname(os.path.abspath(__file__))
POWERFS = os.path.join(HERE, "powerfs.py")
UNSAFE_STORAGE = os.path.join(HERE, "unsafe_storage.py")
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # tests/, for soak.py run alone
from checks import check_disk, check_through_client  # noqa: E402
from powerfs import control  # noqa: E402

from writers import LoggingWriter, create_writer_objects, wait_acknowledged  # noqa: E402

OBJECTS = 3  # objects a writer's transaction sets, besides its counter
WRITERS = ("w0", "w1")
# what a mount failure says when FUSE cannot work here at all
_NO_FUSE = ("fuse: device not found", "Permission denied", "Operation not permitted",
            "Unable to find libfuse", "fusermount: command not found")


def fuse_unavailable() -> str | None:
    """Why FUSE cannot mount on this machine, None if it may."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse: FUSE is not available here"
    if shutil.which("fusermount") is None:
        return "no fusermount (Debian package fuse): make test installs it as root"
    try:
        import fuse  # noqa: F401
    except (ImportError, OSError) as e:
        return "fusepy or libfuse2 missing: %s" % e
    return None


def mounted(path: str) -> bool:
    path = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


class NoFuse(Exception):
    """FUSE refused to mount for a reason of this machine, not of powerfs."""


class Disk:
    """A powerfs mount over ``directory/backing`` at ``directory/mnt``."""

    def __init__(self, directory: str, naive: bool = False) -> None:
        self.naive = naive  # powerfs --naive: the layer that SIGBUSes SQLite
        self.backing = os.path.join(directory, "backing")
        self.mountpoint = os.path.join(directory, "mnt")
        self.socket = os.path.join(directory, "powerfs.sock")
        self.log = os.path.join(directory, "powerfs.log")
        self.proc: subprocess.Popen | None = None
        os.makedirs(self.backing, exist_ok=True)
        os.makedirs(self.mountpoint, exist_ok=True)

    def mount(self, timeout: float = 30) -> None:
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, POWERFS, self.backing, self.mountpoint, "--control", self.socket,
                 *(["--naive"] if self.naive else [])],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def up() -> bool:
            if self.proc.poll() is not None:
                with open(self.log) as f:
                    text = f.read()
                if any(reason in text for reason in _NO_FUSE):
                    raise NoFuse(text.strip().splitlines()[-1])
                raise RuntimeError("powerfs exited %s: %s" % (self.proc.returncode, text))
            return mounted(self.mountpoint) and os.path.exists(self.socket)
        wait_until(up, timeout, "powerfs to mount " + self.mountpoint)

    def cut(self) -> dict:
        """The power cut: every write not fsynced is undone; then unmount.
        Every process using the mount must be dead already."""
        report = control(self.socket, "cut")
        self.unmount()
        return report

    def stats(self) -> dict:
        return control(self.socket, "stats")

    def unmount(self) -> None:
        """Unmount and stop powerfs, whatever state they are in (also after
        a failure: a lazy unmount if the mount is busy)."""
        if mounted(self.mountpoint):
            if subprocess.run(["fusermount", "-u", self.mountpoint],
                              capture_output=True).returncode:
                subprocess.run(["fusermount", "-u", "-z", self.mountpoint], capture_output=True)
        if self.proc is not None:
            try:
                self.proc.wait(10)  # unmounted: fuse_main returns
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None
        if mounted(self.mountpoint):  # powerfs died without unmounting
            subprocess.run(["fusermount", "-u", "-z", self.mountpoint], capture_output=True)


class PowerCluster(LocalCluster):
    """A LocalCluster whose storage databases are on ``disk`` (logs are
    not).  ``unsafe``: storages run with synchronous=OFF (no fsync at all),
    through unsafe_storage.py; for the test that shows losses are seen."""

    def __init__(self, directory: str, disk: Disk, unsafe: bool = False, **kw) -> None:
        super().__init__(directory, name="power", **kw)
        self.disk = disk
        self.unsafe = unsafe

    def database(self, i: int) -> str:
        return os.path.join(self.disk.mountpoint, "storage%d.sqlite" % i)

    def storage_argv(self, i: int) -> list[str]:
        argv = super().storage_argv(i)
        if self.unsafe:
            assert argv[1:3] == ["-m", "neozodb.cli.storage"], argv
            argv[1:3] = [UNSAFE_STORAGE]
        return argv

    def kill_all(self, rng: random.Random) -> None:
        """SIGKILL every node, then reap them.  In most rounds masters
        first and without a pause (nothing commits with a part of the
        storages gone); in one of three, in a random order, a few
        milliseconds apart in some: the master may see a storage die
        and commit without it, or outdate its cells, before it dies too."""
        nodes = sorted(self.nodes.values(), key=lambda n: (n.name[0] != "M", n.name))
        gap = 0.0
        if rng.random() < 1 / 3:
            rng.shuffle(nodes)
            gap = rng.choice((0, 0.002, 0.01))
        for node in nodes:
            node.signal(signal.SIGKILL)
            if gap:
                pause(gap)
        self.kill()

    def restart(self, timeout: float = 60) -> None:
        for node in self.nodes.values():
            node.start()
        self.wait_state("RUNNING", timeout)


class Writer(LoggingWriter):
    """A writer process (tests/writers.py's LOGGING_WRITER, running until
    killed; its log is on a file system that is never cut) with the oids
    of its counter and objects, counter first."""

    def __init__(self, name: str, log: str, oids: list[int]) -> None:
        super().__init__(name, log, OBJECTS)
        self.oids = oids

    def acked(self) -> dict[int, int]:
        """{n: tid} of the acknowledged commits, tids as integers."""
        return {n: int.from_bytes(tid, "big") for n, tid in super().acked().items()}


def setup_writers(cluster: LocalCluster, directory: str) -> list[Writer]:
    """Create each writer's objects; the writers, with their oids."""
    oids = create_writer_objects(cluster, WRITERS, OBJECTS)
    return [Writer(w, os.path.join(directory, w + ".log"), oids[w]) for w in WRITERS]


def pause(seconds: float) -> None:
    """A deliberate delay: the random moment of the cut is the point, it
    waits for no condition."""
    threading.Event().wait(seconds)


def crash_moment(writers: list[Writer], rng: random.Random, timeout: float = 60) -> None:
    """Return at a random moment once each writer acknowledged a few more
    commits in this round."""
    wait_acknowledged(writers, [rng.randint(1, 6) for _ in writers], timeout,
                      "commits before the cut")
    pause(rng.uniform(0, 0.05))


@dataclass
class Round:
    """What one round did: commits acknowledged during it, and what the
    cut lost on disk (bytes not fsynced: proof the cut happened)."""
    acked: int
    lost_bytes: int
    undone: list[str]  # files the cut changed
    problems: list[str]


class PowerRun:
    """A cluster on a powerfs disk and its writers, cut round after round.
    Use as a context manager: whatever happens, processes are killed and
    the disk unmounted at exit."""

    def __init__(self, directory: str, storages: int, replicas: int, rng: random.Random,
                 partitions: int = 6) -> None:
        self.directory = directory
        self.rng = rng
        self.disk = Disk(os.path.join(directory, "disk"))
        self.cluster = PowerCluster(os.path.join(directory, "cluster"), self.disk,
                                    storages=storages, replicas=replicas, partitions=partitions)
        self.writers: list[Writer] = []

    def __enter__(self) -> PowerRun:
        try:
            self.disk.mount()
            self.cluster.start(wait=60)
            self.writers = setup_writers(self.cluster, self.directory)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for writer in self.writers:
            writer.kill()
        self.cluster.kill()
        self.disk.unmount()

    def acked(self) -> dict[str, dict[int, int]]:
        return {w.name: w.acked() for w in self.writers}

    def databases(self) -> list[str]:
        return [os.path.join(self.disk.backing, "storage%d.sqlite" % i)
                for i in range(1, self.cluster.num_storages + 1)]

    def unsafe_storages(self) -> None:
        """From the next start on, storages never fsync (unsafe_storage.py)."""
        self.cluster.unsafe = True
        for i in range(1, self.cluster.num_storages + 1):
            self.cluster.nodes["S%d" % i].argv = self.cluster.storage_argv(i)

    def crash(self) -> tuple[int, dict]:
        """Writers commit; at a random moment every node is SIGKILLed, the
        writers too, then the power is cut.  Returns (commits acknowledged
        in this round, the cut's report)."""
        before = sum(map(len, self.acked().values()))
        for writer in self.writers:
            writer.start(self.cluster)
        try:
            crash_moment(self.writers, self.rng)
            self.cluster.kill_all(self.rng)
        finally:
            for writer in self.writers:
                writer.kill()
        report = self.disk.cut()
        return sum(map(len, self.acked().values())) - before, report

    def round(self) -> Round:
        """crash(), then the checks: raw on disk as the power comes back,
        then through a client once the cluster runs again."""
        acked_now, report = self.crash()
        acked = self.acked()
        problems = check_disk(self.databases(), self.writers, acked)
        self.disk.mount()
        self.cluster.restart()
        wait_until(self.cluster.all_up_to_date, 60, "every cell up to date")
        problems += check_through_client(self.cluster, self.writers, acked)
        return Round(acked_now, report["bytes"], report["files"], problems)

    def final_check(self) -> list[str]:
        """Stop the cluster cleanly; then the acknowledged commits are
        committed, identical on every replica."""
        self.cluster.stop()
        return check_disk(self.databases(), self.writers, self.acked(), complete=True)
