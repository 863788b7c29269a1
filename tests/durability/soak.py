"""The power-loss test for longer: many rounds of commit, SIGKILL of every
node, power cut, checks (see test_power_loss.py), on a new cluster every
``--per-cluster`` rounds (in turn: 2 storages and replicas 1, 2 storages
and replicas 0, 2 and 1 again, 1 storage and replicas 0).  From the repository root, as root::

    .venv/bin/python -m tests.durability.soak --rounds 50
    .venv/bin/python -m tests.durability.soak --minutes 10 --seed 1234

Prints each round, then the rounds, the commits acknowledged and the
commits lost (0, or it exits with status 1 and keeps its directory)."""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from power import PowerRun, fuse_unavailable  # noqa: E402


class Totals:
    rounds = acked = lost = wal_cuts = 0


def soak_cluster(directory: str, storages: int, replicas: int, seed: int, rounds: int,
                 totals: Totals, more: Callable[[], bool]) -> bool:
    """Up to ``rounds`` rounds on a new cluster, while ``more()``; False
    when a commit was lost or the cluster failed."""
    with PowerRun(directory, storages, replicas, random.Random(seed)) as run:
        for _ in range(rounds):
            if not more():
                break
            result = run.round()
            totals.rounds += 1
            totals.acked += result.acked
            # a cut that undid more than the never-synced wal-index
            totals.wal_cuts += any(not f.endswith("-shm") for f in result.undone)
            missing = {p.split(" (")[0] for p in result.problems if " (tid " in p}
            totals.lost += len(missing)
            print("round %d: %d acknowledged, cut undid %d bytes in %s, %d lost" % (
                totals.rounds, result.acked, result.lost_bytes,
                ", ".join(os.path.basename(f) for f in result.undone) or "nothing",
                len(missing)), flush=True)
            if result.problems:
                print("\n".join(result.problems), flush=True)
                return False
        problems = run.final_check()
        if problems:
            print("after the clean stop:\n" + "\n".join(problems), flush=True)
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50, help="rounds in all (default 50)")
    parser.add_argument("--minutes", type=float, default=0,
                        help="stop after this long instead (the round under way ends)")
    parser.add_argument("--per-cluster", type=int, default=10,
                        help="rounds before a new cluster (default 10)")
    parser.add_argument("--seed", type=int, help="replay the random moments of a soak")
    parser.add_argument("--directory", help="where clusters and disks go (default: a tmp dir)")
    args = parser.parse_args(argv)
    reason = fuse_unavailable()
    if reason:
        print("soak: cannot run:", reason, file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    print("soak seed %d" % seed, flush=True)
    rng = random.Random(seed)
    top = args.directory or tempfile.mkdtemp(prefix="neozodb-soak-")
    start = time.monotonic()
    deadline = start + args.minutes * 60 if args.minutes else None
    totals = Totals()

    def more() -> bool:
        if deadline is None:
            return totals.rounds < args.rounds
        return time.monotonic() < deadline

    ok = True
    cluster = 0
    while ok and more():
        storages, replicas = ((2, 1), (2, 0), (2, 1), (1, 0))[cluster % 4]
        cluster_seed = rng.randrange(1 << 32)
        directory = os.path.join(top, "cluster%d" % cluster)
        os.makedirs(directory)
        print("cluster %d: %d storage(s), replicas %d, seed %d" % (
            cluster, storages, replicas, cluster_seed), flush=True)
        try:
            ok = soak_cluster(directory, storages, replicas, cluster_seed, args.per_cluster,
                              totals, more)
        except Exception:  # not a loss, but the soak cannot go on
            traceback.print_exc()
            print("cluster %d: error (see above); logs in %s" % (cluster, directory))
            ok = False
        if ok:
            shutil.rmtree(directory)
        cluster += 1
    print("rounds %d, commits acknowledged %d, commits lost %d, cuts that undid WAL or"
          " database writes %d, %.0f s" % (totals.rounds, totals.acked, totals.lost,
                                           totals.wal_cuts, time.monotonic() - start))
    if not ok:
        print("FAILED: soak seed %d, evidence kept in %s" % (seed, top))
        return 1
    if not args.directory:
        shutil.rmtree(top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
