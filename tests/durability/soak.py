"""The power-loss test for longer: many rounds of commit, SIGKILL of every
node, power cut, checks (see test_power_loss.py), on a new cluster every
``--per-cluster`` rounds (one in four with 1 storage and replicas 0, the
others 2 storages and replicas 1).  From the repository root, as root::

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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from power import PowerRun, fuse_unavailable  # noqa: E402


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
    deadline = time.monotonic() + args.minutes * 60 if args.minutes else None
    rounds = acked = lost = wal_cuts = 0
    failed = False
    start = time.monotonic()
    cluster = 0
    while not failed and (rounds < args.rounds if deadline is None
                          else time.monotonic() < deadline):
        storages, replicas = (1, 0) if cluster % 4 == 3 else (2, 1)
        cluster_seed = rng.randrange(1 << 32)
        directory = os.path.join(top, "cluster%d" % cluster)
        os.makedirs(directory)
        print("cluster %d: %d storage(s), replicas %d, seed %d" % (
            cluster, storages, replicas, cluster_seed), flush=True)
        with PowerRun(directory, storages, replicas, random.Random(cluster_seed)) as run:
            for _ in range(args.per_cluster):
                if (rounds >= args.rounds if deadline is None
                        else time.monotonic() >= deadline):
                    break
                result = run.round()
                rounds += 1
                acked += result.acked
                # a cut that undid more than the never-synced wal-index
                durable_files = [f for f in result.undone if not f.endswith("-shm")]
                wal_cuts += bool(durable_files)
                missing = {p.split(" (")[0] for p in result.problems if " (tid " in p}
                lost += len(missing)
                print("round %d: %d acknowledged, cut undid %d bytes in %s, %d lost" % (
                    rounds, result.acked, result.lost_bytes,
                    ", ".join(os.path.basename(f) for f in result.undone) or "nothing",
                    len(missing)), flush=True)
                if result.problems:
                    print("\n".join(result.problems), flush=True)
                    failed = True
                    break
            if not failed:
                problems = run.final_check()
                if problems:
                    print("after the clean stop:\n" + "\n".join(problems), flush=True)
                    failed = True
        if not failed:
            shutil.rmtree(directory)
        cluster += 1
    print("rounds %d, commits acknowledged %d, commits lost %d, cuts that undid WAL or"
          " database writes %d, %.0f s" % (rounds, acked, lost, wal_cuts,
                                           time.monotonic() - start))
    if failed:
        print("FAILED: soak seed %d, evidence kept in %s" % (seed, top))
        return 1
    if not args.directory:
        shutil.rmtree(top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
