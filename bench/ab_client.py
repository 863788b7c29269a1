"""A/B of the client's begin (see bench/README.md, "Begin ahead").

One cluster, one client process: one-object commits through ZODB
alternate between the work tree's client as it is (B) and a variant of it
(A), --block commits at a time, the order of each pair of blocks swapped
every time, so that the machine's drift hits both alike (bench/ab.py does
the same for the nodes' code).  Variants:

- ``no-block``: the client takes no TTID block the master reserved (feature
  begin-ahead): every commit sends its begin at the first store and waits
  for the answer before storing (what the client did before where
  partitions are spread; elsewhere it sent the begin at ``tpc_begin``);
- ``begin-at-store``: the reserved begin leaves at the first store rather
  than with the vote.

Usage: .venv/bin/python bench/ab_client.py no-block|begin-at-store
       [--storages S] [--replicas R] [--blocks N] [--block B]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import transaction
import ZODB
from common import NeoBackend, start_backends, temporary_directory
from persistent.mapping import PersistentMapping

from neozodb.client.begin import Begin, Reserved

OBJECTS = 24  # committed in turn: each commit changes one


class Variant:
    """The client's code patched, while ``on``, as the variant says."""

    def __init__(self, name: str) -> None:
        self.on = False
        send_begin, take = Begin._send_begin, Reserved.take
        variant = self

        def patched_send_begin(commit, oid, reserved=True):
            send_begin(commit, oid, reserved)
            if variant.on and name == "begin-at-store" and commit.reserved:
                commit.master.flush()

        def patched_take(blocks, conn):
            if variant.on and name == "no-block":
                return None
            return take(blocks, conn)
        Begin._send_begin = patched_send_begin
        Reserved.take = patched_take


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=("no-block", "begin-at-store"))
    parser.add_argument("--storages", type=int, default=1)
    parser.add_argument("--replicas", type=int, default=0)
    parser.add_argument("--blocks", type=int, default=30, help="blocks per side (30)")
    parser.add_argument("--block", type=int, default=200, help="commits per block (200)")
    opts = parser.parse_args(argv)
    variant = Variant(opts.variant)
    backend = NeoBackend(opts.storages, opts.replicas)
    with temporary_directory("ab_client") as (cleanup, workdir):
        start_backends(cleanup, [backend], workdir, {})
        db = ZODB.DB(backend.open_storage())
        cleanup.callback(db.close)
        tm = transaction.TransactionManager()
        root = db.open(tm).root()
        objs = root["objs"] = [PersistentMapping() for _ in range(OBJECTS)]
        tm.commit()
        n = 0

        def block() -> float:
            nonlocal n
            times = []
            for _ in range(opts.block):
                objs[n % OBJECTS]["x"] = n
                n += 1
                t0 = time.perf_counter()
                tm.commit()
                times.append(time.perf_counter() - t0)
            return statistics.median(times) * 1e6
        block()  # warm-up
        medians: dict[bool, list[float]] = {True: [], False: []}
        for i in range(opts.blocks):
            for on in ((True, False) if i % 2 else (False, True)):
                variant.on = on
                medians[on].append(block())
        a, b = medians[True], medians[False]
        faster = sum(mb < ma for ma, mb in zip(a, b, strict=True))
        print(f"{backend.label}, median of the blocks' median commit: A ({opts.variant})"
              f" {statistics.median(a):.0f} us, B (as it is) {statistics.median(b):.0f} us;"
              f" B faster in {faster} of {len(a)} blocks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
