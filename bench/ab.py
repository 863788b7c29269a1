"""A/B of the nodes' code (see bench/README.md, "A/B of the nodes' code").

Two clusters run side by side: the nodes of A run revision REV (a git
revision of this repository, exported to a temporary directory, or a
directory holding a ``neozodb`` package), those of B the work tree.  This
process, the client of both, runs the work tree's code.  One-object
commits through ZODB alternate between the two clusters, --block at a
time, the order of each pair of blocks swapped every time, so that the
machine's drift (on a shared 2-core VM a run moves by 20% within minutes,
more than most changes are worth) hits both alike.  What is compared, per
block: the median commit time, and the CPU the cluster's processes used
per commit (from /proc).  Only the nodes differ: use it for changes to the
master, storage or admin code, not to the client's.

Usage: .venv/bin/python bench/ab.py REV [--storages S] [--replicas R]
       [--blocks N] [--block B] [--keep]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import transaction
import ZODB
from common import NeoBackend, open_spec, temporary_directory
from persistent.mapping import PersistentMapping

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OBJECTS = 24  # committed in turn: each commit changes one


def say(text: str) -> None:
    print(text, flush=True)


def export(rev: str, workdir: str) -> str:
    """A directory whose ``neozodb`` is REV's: REV itself if it is one."""
    if os.path.isdir(os.path.join(rev, "neozodb")):
        return os.path.abspath(rev)
    out = os.path.join(workdir, "a")
    os.makedirs(out)
    archive = subprocess.run(["git", "-C", REPO, "archive", rev, "src"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", out], input=archive, check=True)
    return os.path.join(out, "src")


def cpu_seconds(pids) -> float:
    total = 0.0
    for pid in pids:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


class Side:
    def __init__(self, label: str, backend: NeoBackend) -> None:
        self.label = label
        self.backend = backend
        self.db = ZODB.DB(open_spec(backend.spec()))
        self.tm = transaction.TransactionManager()
        root = self.db.open(self.tm).root()
        self.objs = root["ab"] = [PersistentMapping(v=0) for _ in range(OBJECTS)]
        self.tm.commit()
        self.pids = list(backend.pids().values())
        self.medians: list[float] = []
        self.cpu = 0.0  # seconds, over the blocks kept
        self.commits = 0  # in the blocks kept
        self.n = 0

    def block(self, commits: int, keep: bool = True) -> None:
        times = []
        cpu = cpu_seconds(self.pids)
        for _ in range(commits):
            self.n += 1
            self.objs[self.n % OBJECTS]["v"] = self.n
            t0 = time.perf_counter()
            self.tm.commit()
            times.append(time.perf_counter() - t0)
        if keep:
            # summed, not per block: a block's CPU is a few clock ticks
            self.cpu += cpu_seconds(self.pids) - cpu
            self.commits += commits
            self.medians.append(statistics.median(times))

    def cpu_per_commit(self) -> float:
        return self.cpu / self.commits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="git revision (or source directory) of side A's nodes")
    parser.add_argument("--storages", type=int, default=1)
    parser.add_argument("--replicas", type=int, default=0)
    parser.add_argument("--blocks", type=int, default=40, help="blocks per side (40)")
    parser.add_argument("--block", type=int, default=50, help="commits per block (50)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    opts = parser.parse_args(argv)
    with temporary_directory("ab", opts.keep) as (cleanup, workdir):
        src = export(opts.rev, workdir)
        sides = []
        saved = os.environ.get("PYTHONPATH")
        for label, path in (("A", src), ("B", None)):
            # the node processes inherit it: A's import REV's package
            if path is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = path
            backend = NeoBackend(opts.storages, opts.replicas)
            os.makedirs(os.path.join(workdir, label))
            cleanup.callback(backend.stop)
            backend.start(os.path.join(workdir, label))
            sides.append(Side(label, backend))
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
        for side in sides:
            cleanup.callback(side.db.close)
            side.block(opts.block * 2, keep=False)  # warm-up
        for i in range(opts.blocks):
            for side in (sides if i % 2 else sides[::-1]):
                side.block(opts.block)
        a, b = sides
        diffs = [y - x for x, y in zip(a.medians, b.medians, strict=True)]
        say("A/B of the nodes' code, %dS r%d, %d blocks of %d one-object commits per side"
            % (opts.storages, opts.replicas, opts.blocks, opts.block))
        say("  A (%s): median %.0f us, nodes' CPU %.0f us per commit"
            % (opts.rev, statistics.median(a.medians) * 1e6, a.cpu_per_commit() * 1e6))
        say("  B (work tree): median %.0f us, nodes' CPU %.0f us per commit"
            % (statistics.median(b.medians) * 1e6, b.cpu_per_commit() * 1e6))
        say("  B - A, median over the pairs of blocks: %+.0f us (%+.1f%%); B faster in %d of %d"
            % (statistics.median(diffs) * 1e6,
               statistics.median(diffs) / statistics.median(a.medians) * 100,
               sum(d < 0 for d in diffs), len(diffs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
