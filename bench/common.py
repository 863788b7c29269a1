"""What the benchmark scripts share: stopping cleanly on Ctrl-C or SIGTERM,
the temporary directory, the --json file and a few small helpers.

The scripts import it as ``from common import ...`` (this directory is the
first entry of sys.path when one of them runs).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import platform
import shutil
import signal
import sys
import tempfile
import time

INTERRUPTED: list[str] = []  # the signal that stopped the run, if any


def interrupt(signum, frame):
    INTERRUPTED.append(signal.Signals(signum).name)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def interruptible(fn, *args, stopped: str = "every process stopped"):
    """``fn(*args)`` with SIGINT and SIGTERM raising KeyboardInterrupt, so
    that its cleanup runs (see ``temporary_directory``); the previous
    handlers are restored after.  Once a signal came (also when some code
    swallowed the KeyboardInterrupt), says "interrupted by SIG...;
    ``stopped``" on stderr and returns None: the caller then exits with
    status 130 (``if INTERRUPTED: return 130``)."""
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = fn(*args)
    except BaseException:
        if not INTERRUPTED:  # node processes may die of the same Ctrl-C first: not a failure
            raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if INTERRUPTED:
        print("\ninterrupted by %s; %s" % (INTERRUPTED[0], stopped), file=sys.stderr)
        return None
    return result


def say(text: str) -> None:
    print(text, flush=True)


@contextlib.contextmanager
def temporary_directory(name: str, keep: bool = False, say=say,
                        kept: str = "  logs and databases kept in "):
    """``with temporary_directory("pack", opts.keep) as (cleanup, path):``
    a new temporary directory ``path``, removed on the way out unless
    ``keep`` (then ``say(kept + path)`` tells where it is), and the
    ExitStack ``cleanup`` for the callbacks that stop what the run starts.
    The way out (those callbacks, then the removal) runs with SIGINT and
    SIGTERM ignored, so that a second Ctrl-C cannot leave processes
    behind; they stay ignored until ``interruptible`` restores them."""
    with contextlib.ExitStack() as cleanup:
        path = tempfile.mkdtemp(prefix="neozodb-%s-" % name)
        if keep:
            say(kept + path)
        else:
            cleanup.callback(shutil.rmtree, path, ignore_errors=True)
        try:
            yield cleanup, path
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def options(opts) -> dict:
    """The command-line options, for ``write_json`` (sets as sorted lists)."""
    return {"options": {k: (sorted(v) if isinstance(v, set) else v)
                        for k, v in vars(opts).items()}}


def write_json(path: str, settings: dict, results, **extra) -> None:
    """Write the date, ``settings`` (what the run was asked), the machine,
    ``results`` and ``extra`` to ``path`` as JSON, and say so."""
    data = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        **settings,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "results": results,
        **extra,
    }
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    print("results written to", path)


def run_and_report(run, opts, report, title: str) -> int:
    """The rest of main() once the options are read, for the scripts that
    check the node logs: say ``title``, ``run(opts, anomalies)`` (see
    ``interruptible``), then print ``report(results)``, the anomalies and
    the total time, and write the --json file; returns the exit status."""
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    say(title)
    anomalies: list[str] = []
    results = interruptible(run, opts, anomalies)
    if INTERRUPTED:
        return 130
    print()
    print(report(results))
    if anomalies:
        print("\nwarnings and errors in the node logs, and checks that failed:")
        for line in anomalies:
            print("  " + line)
    print("\ntotal %.0fs" % (time.perf_counter() - started))
    if opts.json:
        write_json(opts.json, options(opts), results, anomalies=anomalies)
    return 0


def stop_cluster(cluster) -> None:
    """Stop a LocalCluster; safe to call twice, and after a failed start."""
    try:
        cluster.stop(timeout=10)
    finally:
        cluster.kill()  # no-op for nodes that already exited


def count(path: str) -> tuple[int, int]:
    """(transactions, records) of a FileStorage."""
    from ZODB.FileStorage import FileStorage
    fs = FileStorage(path, read_only=True)
    try:
        transactions = records = 0
        for txn in fs.iterator():
            transactions += 1
            records += sum(1 for _ in txn)
        return transactions, records
    finally:
        fs.close()
