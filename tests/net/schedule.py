"""A rolling schedule of network and process faults under history
workloads, then the checker's verdict: the soak of tests/net.

From the repository root, as root (network namespaces), with neozodb
importable (PYTHONPATH=src, or the project's venv)::

    .venv/bin/python -m tests.net.soak --minutes 10 --seed 1234

A NetCluster (3 masters, 3 storages, replicas 1, 12 partitions, an admin,
keep-alive 6 s) and a history workload (tests/history, readCurrent:
serializable) in each of the client hosts c1 and c2.  Then, until the time
is up, one fault at a time, held 2 to 12 s, then undone, then 1 to 5 s
of calm, each drawn from the seed:

- a partition: 1 to 3 hosts (any, clients and admin included) cut from
  all the others, both ways;
- a one-way cut: the packets of one host to 1 to 3 others dropped;
- a freeze: a master or storage SIGSTOPped, then SIGCONTed;
- a kill: a master or storage SIGKILLed, then started again.

Then the network heals, every node runs, every cell must become
UP_TO_DATE, the workloads stop, and the histories and the final state go
through the checker (no lost acknowledged commit, failed transactions
without effect, unknown outcomes all-or-nothing, serializable), the
cluster stops and its replicas are compared row by row.  Printed: each
fault, then transactions attempted, acknowledged, lost (must be 0),
unknown, and the unavailability windows (periods of 1 s or more with no
successful commit: how many, the longest, their total).  Exit status 0
when no problem was found, 1 otherwise (the directory is kept: logs and
histories).  ``tests/net/test_soak.py`` runs the same schedule for 60 s
in ``make test``; ``soak.py`` is the command line."""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (HERE, os.path.dirname(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from histnet import NetWorkloads, commit_times, net_cluster, verdict, windows  # noqa: E402
from netns import unavailable  # noqa: E402

from neozodb.cli.cluster import wait_until  # noqa: E402

CLIENTS = ["c1", "c2"]
HOLD = (2.0, 12.0)  # seconds a fault lasts
CALM = (1.0, 5.0)  # seconds between faults
THINK = 0.01  # mean pause between a workload's transactions, seconds


class Schedule:
    """Faults one at a time on a NetCluster, drawn from ``rng``."""

    def __init__(self, cluster, rng: random.Random, say) -> None:
        self.cluster = cluster
        self.net = cluster.net
        self.rng = rng
        self.say = say
        self.start = time.monotonic()
        self.kinds: Counter = Counter()
        self.servers = [n for n in cluster.nodes if n[0] in "MS"]

    def _hosts(self, k: int, among: list[str] | None = None) -> list[str]:
        among = among or list(self.net.hosts)
        return self.rng.sample(among, min(k, len(among)))

    def step(self) -> None:
        """One fault: applied, held, undone; then calm."""
        rng = self.rng
        kind = rng.choice(["partition", "one-way", "freeze", "kill"])
        hold = rng.uniform(*HOLD)
        undo = self.net.heal
        if kind == "partition":
            side = self._hosts(rng.randint(1, 3))
            what = "%s cut from the others" % ",".join(side)
            self.net.partition(side, [h for h in self.net.hosts if h not in side])
        elif kind == "one-way":
            (src,) = self._hosts(1)
            dsts = self._hosts(rng.randint(1, 3), [h for h in self.net.hosts if h != src])
            what = "packets of %s to %s dropped" % (src, ",".join(dsts))
            for dst in dsts:
                self.net.cut(src, dst)
        elif kind == "freeze":
            name = rng.choice(self.servers)
            what = "%s frozen" % name
            self.net.freeze(self.cluster.nodes[name])
        else:
            name = rng.choice(self.servers)
            what = "%s killed" % name
            node = self.cluster.nodes[name]
            node.kill()
            undo = node.start
        self.kinds[kind] += 1
        self.say("%6.1fs %s for %.1fs" % (time.monotonic() - self.start, what, hold))
        self.pause(hold)  # the fault lasts this long: it is what is tested
        undo()
        self.pause(rng.uniform(*CALM))

    @staticmethod
    def pause(seconds: float) -> None:
        time.sleep(seconds)  # a deliberate part of the schedule

    def end(self) -> None:
        """Heal the network; every node running again."""
        self.net.heal()
        for name in self.servers:
            node = self.cluster.nodes[name]
            if not node.running:
                node.start()


def run_soak(directory: str, seconds: float, seed: int, say=print) -> dict:
    """The soak for ``seconds`` in ``directory``; its numbers and the
    problems found (``problems``: [] if none)."""
    rng = random.Random(seed)
    with net_cluster(directory, CLIENTS) as cluster:
        load = NetWorkloads(cluster, directory, CLIENTS, seed, think=THINK)
        problems: list[str] = []
        try:
            wait_until(load.more(3), 60, "the workloads' first commits")
            schedule = Schedule(cluster, rng, say)
            deadline = schedule.start + seconds
            while time.monotonic() < deadline:
                schedule.step()
            schedule.end()
            healed = time.monotonic()
            say("%6.1fs healed, every node running" % (healed - schedule.start))
            try:
                result = verdict(cluster, load, up_to_date=180, strict=False)
            except TimeoutError as e:
                return {"problems": ["after the heal: %s" % e], "kinds": schedule.kinds}
            problems = result.problems
        finally:
            load.kill()
    times = commit_times(result.records)
    gaps = windows(times, schedule.start, healed)
    # where the longest ones were, against the printed schedule
    marks = [schedule.start] + [t for t in times if schedule.start < t < healed] + [healed]
    spans = sorted(((b - a, a - schedule.start) for a, b in zip(marks, marks[1:], strict=False)
                    if b - a >= 1.0), reverse=True)[:3]
    return {
        "problems": problems, "kinds": schedule.kinds, "seconds": healed - schedule.start,
        "attempted": result.attempted, "acknowledged": result.acknowledged,
        "lost": sum(p.startswith("lost commit") for p in problems),
        "unknown": result.unknown, "tally": result.tally,
        "compared": result.transactions_compared,
        "windows": len(gaps), "longest": max(gaps, default=0.0), "unavailable": sum(gaps),
        "spans": spans}


def report(numbers: dict, say=print) -> None:
    say("faults: %s" % ", ".join("%d %s" % (n, k) for k, n in sorted(numbers["kinds"].items())))
    if "attempted" in numbers:
        say("transactions: %(attempted)d attempted, %(acknowledged)d acknowledged, %(lost)d lost,"
            " %(unknown)d unknown" % numbers)
        say("outcomes per client: %s" % numbers["tally"])
        say("unavailability (no commit for 1 s or more): %(windows)d windows, longest"
            " %(longest).1fs, total %(unavailable).1fs of %(seconds).0fs" % numbers)
        say("longest windows: %s" % ", ".join("%.1fs from %.1fs" % span
                                              for span in numbers["spans"]))
        say("replicas identical: %d transactions compared" % numbers["compared"]
            if numbers["compared"] else "replicas not compared")
    say("verdict: %s" % ("no problem found" if not numbers["problems"] else
                         "%d problems:\n%s" % (len(numbers["problems"]),
                                               "\n".join(numbers["problems"]))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.net.soak",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="length of the fault schedule (default 10)")
    parser.add_argument("--seed", type=int, help="seed of the schedule and the workloads")
    parser.add_argument("--dir", help="directory for the cluster, logs and histories"
                        " (default: a temporary one, removed when no problem was found)")
    args = parser.parse_args(argv)
    reason = unavailable()
    if reason:
        print("soak: %s" % reason, file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    directory = args.dir or tempfile.mkdtemp(prefix="neozodb-soak-")
    os.makedirs(directory, exist_ok=True)
    print("soak: %g minutes, seed %d (--seed %d replays the schedule), in %s" % (
        args.minutes, seed, seed, directory), flush=True)
    numbers = run_soak(directory, args.minutes * 60, seed,
                       say=lambda line: print(line, flush=True))
    report(numbers)
    if numbers["problems"]:
        print("kept %s" % directory)
        return 1
    if not args.dir:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
