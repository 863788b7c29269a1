"""Where a big commit's time goes (bench/README.md, "The end of a big
commit"): commits of --objects new objects, then updates of them, through
ZODB as bench.py does them (PersistentMappings in an OOBTree), with the
client's time split by storage call (``tpc_begin``, the stores, ``tpc_vote``,
``tpc_finish``; what is left is ZODB's own work, serialization mostly),
its CPU, and the CPU of each server process.

The stores' column is the time spent in the storage's ``store`` (ours:
compression and sending; the storage works meanwhile); ``tpc_vote`` is
what the client then waits for the last stores' answers and the vote,
``tpc_finish`` the master's relay, the storages' locks and the client's
bookkeeping (its cache takes the new revisions).  Medians over --rounds.

Usage: .venv/bin/python bench/bigcommit.py [--objects N] [--rounds R]
       [--backends neo1,neo2,neo2r1,zeo] [--keep]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import common
import transaction
import ZODB
from common import (
    NeoBackend,
    ZEOBackend,
    format_table,
    new_objects,
    payload,
    start_backends,
    temporary_directory,
)
from cpu import TICK, cpu_of

CALLS = ("tpc_begin", "store", "tpc_vote", "tpc_finish")
BACKENDS = {"neo1": lambda: NeoBackend(1, 0), "neo2": lambda: NeoBackend(2, 0),
            "neo2r1": lambda: NeoBackend(2, 1), "zeo": ZEOBackend}


class Timed:
    """Time spent in the calls of CALLS of a storage class, while on."""

    def __init__(self, cls: type) -> None:
        self.on = False
        self.spent = dict.fromkeys(CALLS, 0.0)
        self._saved = {}
        for name in CALLS:
            original = self._saved[name] = cls.__dict__.get(name) or getattr(cls, name)
            setattr(cls, name, self._wrap(name, original))
        self._cls = cls

    def _wrap(self, name, original):
        spent = self.spent

        def timed(storage, *args, **kw):
            if not self.on:
                return original(storage, *args, **kw)
            t0 = time.perf_counter()
            try:
                return original(storage, *args, **kw)
            finally:
                spent[name] += time.perf_counter() - t0
        return timed

    def restore(self) -> None:
        for name, original in self._saved.items():
            setattr(self._cls, name, original)


def measure(backend, objects: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    storage = backend.open_storage()
    timed = Timed(type(storage))
    pids = backend.pids() if hasattr(backend, "pids") else {}
    results: dict[str, dict[str, list[float]]] = {"new": {}, "update": {}}
    db = ZODB.DB(storage)
    try:
        tm = transaction.TransactionManager()
        root = db.open(tm).root()
        for r in range(rounds + 1):
            objs = new_objects(root, tm, "big%d" % r, objects)
            for what in ("new", "update"):
                if what == "update":
                    for obj in objs:
                        obj["data"] = payload()
                for name in CALLS:
                    timed.spent[name] = 0.0
                before = cpu_of(pids)
                timed.on = True
                t0 = time.perf_counter()
                tm.commit()
                wall = time.perf_counter() - t0
                timed.on = False
                after = cpu_of(pids)
                if r == 0:
                    continue  # warm-up
                row = results[what]
                row.setdefault("wall", []).append(wall)
                for name in CALLS:
                    row.setdefault(name, []).append(timed.spent[name])
                row.setdefault("ZODB", []).append(wall - sum(timed.spent.values()))
                for name in ("client", *pids):
                    row.setdefault(name, []).append(after[name] - before[name])
    finally:
        db.close()
        timed.restore()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--backends", default="neo1,neo2,neo2r1,zeo")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--payload", choices=common.PAYLOADS, default="random",
                        help="the objects' data: base64 of random bytes (default) or words")
    opts = parser.parse_args()
    common.payload_kind = opts.payload
    names = opts.backends.split(",")
    unknown = set(names) - set(BACKENDS)
    if unknown:
        parser.error("unknown backends: %s" % ", ".join(sorted(unknown)))
    rows = []
    with temporary_directory("bigcommit", opts.keep) as (cleanup, workdir):
        backends = [BACKENDS[name]() for name in names]
        start_backends(cleanup, backends, workdir, {})
        for backend in backends:
            for what, row in measure(backend, opts.objects, opts.rounds).items():
                cells = {k: statistics.median(v) * 1e3 for k, v in row.items()}
                servers = " ".join("%s %.1f" % (k, v) for k, v in cells.items()
                                   if k not in ("wall", "ZODB", "client", *CALLS))
                rows.append(["%s %d" % (what, opts.objects), backend.label]
                            + ["%.1f" % cells[k] for k in ("wall", *CALLS, "ZODB", "client")]
                            + [servers or "-"])
    print("ms per commit, medians of %d rounds (ticks of %.0f ms for the servers' CPU)"
          % (opts.rounds, 1000 / TICK))
    print(format_table(["commit", "backend", "wall", *CALLS, "ZODB", "client CPU",
                        "servers' CPU"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
