"""Measure master failover (see bench/README.md, "Master failover").

A client commits one small change after another.  The primary master is
SIGKILLed; the failover time is from the kill to the end of the first
commit that began after it and succeeded.  Each trial then restarts the
killed master (it comes back as a secondary) before the next one.

Compared in the same run, for the same client loop:
- neozodb, 3 masters, 2 storages, replicas 1: the primary is killed and a
  secondary takes over (nothing restarts);
- neozodb, 1 master: the master is killed and restarted at once (what a
  supervisor would do);
- ZEO: the server is killed and restarted at once (ZEO has no spare).

Every process started here is stopped and the temporary directory removed
on exit, error or Ctrl-C.

Usage: .venv/bin/python bench/failover.py [--trials N] [--keep] [--json FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import threading
import time

import transaction
import ZODB
from bench import ZEOBackend, format_table  # bench/bench.py, next to this script
from common import say, temporary_directory  # bench/common.py
from persistent.mapping import PersistentMapping

TIMEOUT = 60.0  # bound on one failover


class Committer(threading.Thread):
    """Commits root["x"]["n"] += 1 in a loop; records (start, end) of every
    successful commit, retrying failed ones."""

    def __init__(self, db: ZODB.DB) -> None:
        super().__init__(daemon=True)
        self.db = db
        self.done: list[tuple[float, float]] = []
        self.failures = 0
        self.last_error = None
        self.stop = threading.Event()
        self.changed = threading.Condition()

    def run(self) -> None:
        tm = transaction.TransactionManager()
        conn = self.db.open(tm)
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                conn.root()["x"]["n"] += 1
                tm.commit()
            except Exception as e:
                tm.abort()
                self.failures += 1
                self.last_error = "%s: %s" % (type(e).__name__, e)
                time.sleep(0.01)  # retry pacing, not synchronisation
                continue
            with self.changed:
                self.done.append((start, time.monotonic()))
                self.changed.notify_all()
        conn.close()

    def first_commit_after(self, t: float, timeout: float) -> float:
        """End time of the first successful commit that began after t."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                ends = [end for start, end in self.done if start > t]
                if ends:
                    return min(ends)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("no commit within %g s of the kill (last error: %s)"
                                       % (timeout, self.last_error))
                self.changed.wait(remaining)


def trials(cleanup, db: ZODB.DB, kill_and_recover, n: int, label: str) -> list[float]:
    """``n`` times: with a client committing, ``kill_and_recover()`` (it
    returns when it killed) then wait for the first commit begun after."""
    cleanup.callback(db.close)
    with db.transaction() as conn:
        conn.root()["x"] = PersistentMapping(n=0)
    committer = Committer(db)
    committer.start()
    times = []
    try:
        for i in range(n):
            committer.first_commit_after(time.monotonic(), TIMEOUT)  # steady state first
            t = kill_and_recover()
            elapsed = committer.first_commit_after(t, TIMEOUT) - t
            times.append(elapsed)
            say("  %s trial %d: %.3f s" % (label, i + 1, elapsed))
    finally:
        committer.stop.set()
        committer.join(10)
    return times


def log_text(node) -> str:
    with open(node.logfile, "rb") as f:
        f.seek(node.log_offset)
        return f.read().decode("utf-8", "replace")


def measure_neo(cleanup, workdir: str, masters: int, n: int) -> list[float]:
    from neozodb.cli.cluster import LocalCluster, wait_until
    from neozodb.client import Storage
    cluster = LocalCluster(os.path.join(workdir, "m%d" % masters), name="bench-failover",
                           storages=2, replicas=1, partitions=12, masters=masters,
                           loglevel="INFO")
    cleanup.callback(cluster.kill)
    cluster.start(wait=60)
    def kill_primary() -> float:
        name = cluster.primary()
        node = cluster.nodes[name]
        t = time.monotonic()
        node.kill()
        if masters == 1:
            node.start()  # a supervisor's restart: the only way back
        else:
            # back as a secondary once the new primary runs, for the next trial
            new = cluster.wait_primary(TIMEOUT, other_than=name)
            node.start()
            wait_until(lambda: "secondary of %s" % new in log_text(node), TIMEOUT,
                       "%s to follow %s" % (name, new))
        return t

    label = "neozodb %d masters" % masters if masters > 1 else "neozodb 1 master, restarted"
    return trials(cleanup, ZODB.DB(Storage(cluster.masters, cluster.name)), kill_primary, n,
                  label)


def measure_zeo(cleanup, workdir: str, n: int) -> list[float]:
    zeo = ZEOBackend()
    zeo.start(workdir)
    cleanup.callback(zeo.stop)
    from ZEO.ClientStorage import ClientStorage
    def kill_server() -> float:
        t = time.monotonic()
        zeo.proc.kill()
        zeo.proc.wait(10)
        zeo.proc = None
        zeo.serve()  # the same server again, on its address and file
        return t

    # reconnection polled every 50 ms at first (the default starts at 1 s)
    db = ZODB.DB(ClientStorage(zeo.address, wait=True, wait_timeout=30, min_disconnect_poll=0.05,
                               max_disconnect_poll=1))
    return trials(cleanup, db, kill_server, n, "ZEO, restarted")


def summary(times: list[float]) -> dict:
    return {"median": statistics.median(times), "worst": max(times), "best": min(times),
            "trials": times}


def report(results: dict) -> str:
    rows = []
    zeo = results.get("zeo")
    for key, label in (("neo3", "neozodb, 3 masters: secondary takes over"),
                       ("neo1", "neozodb, 1 master: restarted"),
                       ("zeo", "ZEO: server restarted")):
        r = results.get(key)
        if r is None:
            continue
        ratio = "%.2fx" % (r["median"] / zeo["median"]) if zeo else "-"
        rows.append([label, "%.3f s" % r["median"], "%.3f s" % r["worst"], ratio])
    return format_table(["primary killed -> first commit", "median", "worst",
                         "median / ZEO"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="kills per setup (10)")
    parser.add_argument("--keep", action="store_true", help="keep logs and databases")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    opts = parser.parse_args(argv)
    if opts.trials < 1:
        parser.error("--trials must be positive")
    # the client's expected errors (a commit cut by the kill) stay quiet:
    # they are counted as failures
    logging.basicConfig(level=logging.CRITICAL + 1)
    say("failover benchmark: %d trials, %d CPUs, Python %s" % (
        opts.trials, os.cpu_count() or 0, platform.python_version()))
    results: dict = {}
    with temporary_directory("failover", opts.keep) as (_, workdir):
        for key, measure in (("neo3", lambda s: measure_neo(s, workdir, 3, opts.trials)),
                             ("neo1", lambda s: measure_neo(s, workdir, 1, opts.trials)),
                             ("zeo", lambda s: measure_zeo(s, workdir, opts.trials))):
            with contextlib.ExitStack() as setup:
                results[key] = summary(measure(setup))
    say("")
    say(report(results))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"date": datetime.datetime.now().isoformat(), "results": results}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
