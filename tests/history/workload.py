"""A history workload: one client process running read-modify-write
transactions through real ZODB on a fixed set of keys, recording what each
transaction read, wrote and was told, for ``checker.py`` (the method of
Jepsen's Elle: unique list appends make the order of the writes visible).

The keys live in the root, created idempotently by whichever client gets
there first (the others conflict, retry and find them): counters
``ctr0``... (a PersistentMapping ``{"v": int}``) and lists ``lst0``...
(``{"v": tuple}``).  A transaction reads 1 to 3 random keys and writes 1
or 2 of them (each written key is read first): +1 to a counter, or one
unique element ``<client>-<seq>`` appended to a list, sometimes two (the
second ``<client>-<seq>.1``, for intermediate reads).  ZODB alone gives
snapshot isolation: what is only read is not checked at commit, and write
skew is allowed (check with ``isolation="snapshot"``).  With
``read_current`` (``--read-current``) the keys only read get
``Connection.readCurrent``, which makes transactions serializable.

History: one JSON object per line, flushed (``--fsync``: fsynced) before
the commit (``outcome`` "pending") and after it (the outcome); the last
line of a transaction wins (``checker.load``), a pending one is unknown::

    {"client": "c1", "seq": 17, "start": <monotonic>, "end": <monotonic>,
     "wall": <time.time() at start>, "reads": {"ctr2": 41, "lst0": ["c2-3"]},
     "writes": {"ctr2": 1, "lst0": ["c1-17"]}, "outcome": "ok",
     "tid": "03f2...", "error": null}

``outcome``: "ok" (commit returned; ``tid`` of the transaction),
"conflict" (ConflictError before tpc_finish: not committed), "error"
(another exception before the storage's tpc_finish was called: not
committed), "unknown" (an exception in or after tpc_finish: perhaps
committed; the client says which in ``error``, but the history does not
take its word), "pending" (the process died during the commit).

Run as ``python -m tests.history.workload run --masters H:P --cluster NAME
--client c1 --out c1.jsonl --seed 1 --duration 10`` from the repository
root, or ``python tests/history/workload.py ...``; ``workload_argv()``
builds that command line.  ``... final --out final.json`` writes the
state a fresh client reads (``read_final``), what ``checker.py`` compares
the histories with.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import random
import signal
import sys
import threading
import time

COUNTERS = 4
LISTS = 6
RECONNECT_PAUSE = 0.2  # a deliberate pause before opening a client again


def keys(counters: int = COUNTERS, lists: int = LISTS) -> list[str]:
    return ["ctr%d" % i for i in range(counters)] + ["lst%d" % i for i in range(lists)]


def workload_argv(masters: str, cluster: str, client: str, out: str, seed: int, *,
                  duration: float | None = None, count: int | None = None,
                  stop_file: str | None = None, think: float = 0.0, fsync: bool = False,
                  read_current: bool = False, counters: int = COUNTERS,
                  lists: int = LISTS, tls: tuple[str, str, str] | None = None,
                  keepalive: float | None = None) -> list[str]:
    """The command line of one workload process (run it with the
    environment's PYTHONPATH, which must find neozodb).  ``tls``: the
    (ca, cert, key) files of the client, e.g. ``cluster.credentials(...)``;
    ``keepalive``: the client's (seconds; None: the client's default)."""
    argv = [sys.executable, os.path.abspath(__file__), "run", "--masters", masters,
            "--cluster", cluster, "--client", client, "--out", out, "--seed", str(seed),
            "--think", str(think), "--counters", str(counters), "--lists", str(lists)]
    if duration is not None:
        argv += ["--duration", str(duration)]
    if count is not None:
        argv += ["--count", str(count)]
    if stop_file is not None:
        argv += ["--stop-file", stop_file]
    if fsync:
        argv.append("--fsync")
    if read_current:
        argv.append("--read-current")
    if tls:
        argv += ["--ca", tls[0], "--cert", tls[1], "--key", tls[2]]
    if keepalive is not None:
        argv += ["--keepalive", "%g" % keepalive]
    return argv


def phase_storage(base: type) -> type:
    """``base`` (a ZODB storage class) telling whether tpc_finish was
    called (then an exception leaves the outcome unknown) and what it
    returned."""

    class PhaseStorage(base):
        finishing = False
        tid: bytes | None = None

        def tpc_begin(self, txn, *args, **kw):
            self.finishing = False
            self.tid = None
            return super().tpc_begin(txn, *args, **kw)

        def tpc_finish(self, txn, *args, **kw):
            self.finishing = True
            self.tid = super().tpc_finish(txn, *args, **kw)
            return self.tid

    return PhaseStorage


def open_db(masters: str, cluster: str, **kw):
    import ZODB

    from neozodb.client import Storage
    storage = phase_storage(Storage)(masters, cluster, **kw)
    try:
        return ZODB.DB(storage)
    except BaseException:
        storage.close()
        raise


def create_keys(db, names: list[str], deadline: float) -> None:
    """Make every key exist, tolerating other clients doing the same."""
    import transaction
    from persistent.mapping import PersistentMapping
    from ZODB.POSException import ConflictError
    tm = transaction.TransactionManager(explicit=True)
    conn = db.open(tm)
    try:
        while True:
            tm.begin()
            try:
                root = conn.root()
                missing = [k for k in names if k not in root]
                if not missing:
                    tm.abort()
                    return
                for k in missing:
                    root[k] = PersistentMapping(v=0 if k.startswith("ctr") else ())
                tm.commit()
                return
            except Exception as e:
                tm.abort()
                if not isinstance(e, ConflictError) or time.monotonic() > deadline:
                    raise
    finally:
        conn.close()


def last_seq(path: str) -> int:
    """The last sequence number in a history file, 0 if none."""
    seq = 0
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    seq = max(seq, json.loads(line)["seq"])
                except (ValueError, KeyError, TypeError):
                    pass  # a line cut short when the process died
    return seq


class History:
    """The output file: one JSON line per record, flushed (and fsynced)."""

    def __init__(self, path: str, fsync: bool) -> None:
        self.file = open(path, "a", encoding="utf-8")
        self.fsync = fsync

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.file.flush()
        if self.fsync:
            os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def transaction_once(conn, tm, storage, rng: random.Random, names: list[str], client: str,
                     seq: int, history: History, read_current: bool = False) -> dict:
    """One read-modify-write transaction; returns its record."""
    from ZODB.POSException import ConflictError
    record = {"client": client, "seq": seq, "start": time.monotonic(), "end": None,
              "wall": time.time(), "reads": {}, "writes": {}, "outcome": None, "tid": None,
              "error": None}
    reads, writes = record["reads"], record["writes"]
    storage.finishing = False
    storage.tid = None
    committing = False
    try:
        tm.begin()  # a new snapshot: the connection syncs its invalidations
        touched = rng.sample(names, rng.randint(1, min(3, len(names))))
        written = set(rng.sample(touched, rng.randint(1, min(2, len(touched)))))
        root = conn.root()
        for key in touched:
            obj = root[key]
            value = obj["v"]
            reads[key] = list(value) if isinstance(value, tuple) else value
            if key not in written:
                if read_current:
                    conn.readCurrent(obj)
            elif isinstance(value, tuple):
                elements = ["%s-%d" % (client, seq)]
                if rng.random() < 0.1:
                    elements.append("%s-%d.1" % (client, seq))
                obj["v"] = value + tuple(elements)
                writes[key] = elements
            else:
                obj["v"] = value + 1
                writes[key] = 1
        record["outcome"] = "pending"
        history.write(record)
        committing = True
        tm.commit()
        record["outcome"] = "ok"
        record["tid"] = storage.tid.hex()
    except ConflictError as e:
        # ConflictError (ReadConflictError too) comes from a vote or a load,
        # before tpc_finish: nothing was committed
        record["outcome"] = "unknown" if storage.finishing else "conflict"
        record["error"] = "%s: %s" % (type(e).__name__, e)
    except Exception as e:
        # before tpc_finish nothing can have been committed; in it (or
        # after it returned, in ZODB's bookkeeping) the outcome is unknown
        record["outcome"] = "unknown" if committing and storage.finishing else "error"
        record["error"] = "%s: %s" % (type(e).__name__, e)
        if storage.tid is not None:
            record["tid"] = storage.tid.hex()
    finally:
        record["end"] = time.monotonic()
    if record["outcome"] != "ok":
        try:
            tm.abort()
        except Exception as e:
            record["error"] += "; then abort failed: %s: %s" % (type(e).__name__, e)
    history.write(record)
    return record


def run(masters: str, cluster: str, client: str, out: str, seed: int,
        duration: float | None = None, count: int | None = None,
        stop_file: str | None = None, think: float = 0.0, fsync: bool = False,
        read_current: bool = False, counters: int = COUNTERS, lists: int = LISTS,
        connect_timeout: float = 30.0,
        storage_kw: dict | None = None) -> dict[str, int]:
    """Run transactions until ``duration`` seconds passed, ``count`` were
    run or ``stop_file`` exists; returns the count of each outcome."""
    import transaction
    rng = random.Random(seed)
    names = keys(counters, lists)
    end = time.monotonic() + duration if duration is not None else None
    pause = threading.Event()  # never set: wait() is a named, interruptible pause
    tally: dict[str, int] = {}
    history = History(out, fsync)
    kw = dict(storage_kw or {}, connect_timeout=connect_timeout)

    def more() -> bool:
        return ((end is None or time.monotonic() < end)
                and (count is None or sum(tally.values()) < count)
                and not (stop_file and os.path.exists(stop_file)))

    db = conn = tm = None
    seq = last_seq(out)  # a client restarted with its history goes on after it
    try:
        while more():
            if db is None:
                try:
                    db = open_db(masters, cluster, **kw)
                    create_keys(db, names, time.monotonic() + connect_timeout)
                    tm = transaction.TransactionManager(explicit=True)
                    conn = db.open(tm)
                except Exception as e:
                    print("%s: cannot open the database: %s: %s" % (client, type(e).__name__, e),
                          file=sys.stderr, flush=True)
                    if db is not None:
                        db.close()
                    db = None
                    pause.wait(RECONNECT_PAUSE)
                    continue
            seq += 1
            record = transaction_once(conn, tm, db.storage, rng, names, client, seq, history,
                                      read_current)
            outcome = record["outcome"]
            tally[outcome] = tally.get(outcome, 0) + 1
            if outcome in ("error", "unknown"):
                # whatever broke, start again from a new client
                print("%s: %d %s: %s" % (client, seq, outcome, record["error"]),
                      file=sys.stderr, flush=True)
                _close(conn, db)
                db = conn = None
            if think:
                pause.wait(rng.uniform(0, 2 * think))  # deliberate think time
    finally:
        _close(conn, db)
        history.close()
    return tally


def _close(conn, db) -> None:
    for thing in (conn, db):
        if thing is not None:
            try:
                thing.close()
            except Exception as e:
                print("close failed: %s: %s" % (type(e).__name__, e), file=sys.stderr)


def read_final(master_nodes: str, name: str, names: list[str] | None = None,
               **storage_kw) -> tuple[dict, dict[str, bytes]]:
    """What a fresh client reads: ({key: int or list}, {key: oid}) for the
    workload's keys present in the root (or ``names``).  The arguments are
    Storage's: ``read_final(**cluster.client_kwargs())``."""
    import transaction
    import ZODB

    from neozodb.client import Storage
    db = ZODB.DB(Storage(master_nodes, name, **storage_kw))
    try:
        tm = transaction.TransactionManager(explicit=True)
        conn = db.open(tm)
        tm.begin()
        root = conn.root()
        state, oids = {}, {}
        for key in names if names is not None else [k for k in root if k[:3] in ("ctr", "lst")]:
            if key in root:
                value = root[key]["v"]
                state[key] = list(value) if isinstance(value, tuple) else value
                oids[key] = root[key]._p_oid
        tm.abort()
        conn.close()
        return state, oids
    finally:
        db.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workload", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "final"):
        p = sub.add_parser(name)
        p.add_argument("--masters", required=True, help="master addresses, host:port,...")
        p.add_argument("--cluster", required=True, help="cluster name")
        p.add_argument("--out", required=True,
                       help="history file (appended to) / final state file (JSON)")
        for option in ("ca", "cert", "key"):
            p.add_argument("--" + option, help="TLS: the client's %s file" % option)
        p.add_argument("--keepalive", type=float,
                       help="the client's keep-alive, seconds (default: the client's)")
    run_p = sub.choices["run"]
    run_p.add_argument("--client", required=True, help="client id, unique in the run")
    run_p.add_argument("--seed", type=int, required=True)
    run_p.add_argument("--duration", type=float, help="seconds to run")
    run_p.add_argument("--count", type=int, help="transactions to run")
    run_p.add_argument("--stop-file", help="stop once this file exists")
    run_p.add_argument("--think", type=float, default=0.0,
                       help="mean pause between transactions, seconds (default 0)")
    run_p.add_argument("--fsync", action="store_true", help="fsync each history line")
    run_p.add_argument("--read-current", action="store_true",
                       help="readCurrent on the keys only read: serializable")
    run_p.add_argument("--counters", type=int, default=COUNTERS)
    run_p.add_argument("--lists", type=int, default=LISTS)
    args = parser.parse_args(argv)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1: where it is stuck
    storage_kw = {k: getattr(args, k) for k in ("ca", "cert", "key") if getattr(args, k)}
    if args.keepalive is not None:
        storage_kw["keepalive"] = args.keepalive
    if args.command == "final":
        state, _ = read_final(args.masters, args.cluster, **storage_kw)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(state, f)
        return 0
    if args.duration is None and args.count is None and args.stop_file is None:
        parser.error("give --duration, --count or --stop-file")
    print("workload %s seed %d" % (args.client, args.seed), flush=True)
    tally = run(args.masters, args.cluster, args.client, args.out, args.seed,
                duration=args.duration, count=args.count, stop_file=args.stop_file,
                think=args.think, fsync=args.fsync, read_current=args.read_current,
                counters=args.counters, lists=args.lists, storage_kw=storage_kw)
    print(json.dumps({"client": args.client, "outcomes": tally}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
