"""Micro-benchmark of record compression (neozodb/deflate.py): Python's
zlib at level 6 (NEO's default, and ours without the isal package) against
ISA-L (``isal``, the default when installed), on ZODB-like pickles.

    .venv/bin/python bench/compression.py

For each kind and size of record: the mean CPU time to compress one
(process time, best of 3 passes over 300 records), the stored size as a
share of the pickle's, and the time to decompress one with zlib (what
NEO's clients do) and with ISA-L.  Every ISA-L stream is checked to
decompress with zlib to the same bytes."""
from __future__ import annotations

import os
import pickle
import random
import sys
import time
import zlib

from BTrees.IOBTree import IOBucket
from BTrees.OOBTree import OOBucket
from common import format_table  # bench/common.py, next to this script

try:
    from isal import isal_zlib
except ImportError:
    sys.exit("bench/compression.py: the isal package is not installed (pip install isal)")

RECORDS = 300


def kinds(rnd: random.Random):
    words = ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing"]

    def oobucket(n):
        return OOBucket({"key-%08d" % rnd.randrange(10 ** 8): "value %d" % i
                         for i in range(n)}).__getstate__()

    def iobucket(n):
        return IOBucket({rnd.randrange(10 ** 6): None for _ in range(n)}).__getstate__()

    def text(n):
        return {"title": "Document %d" % n, "n": list(range(20)),
                "body": " ".join(rnd.choice(words) for _ in range(n))}

    def base64_text(n):  # bench.py's payload: hardly compressible
        import base64
        return {"data": base64.b64encode(os.urandom(n * 3 // 4)).decode()}

    yield "PersistentMapping, base64 text", base64_text, (300, 1000, 4000)
    yield "OOBucket", oobucket, (10, 30, 60)
    yield "IOBucket", iobucket, (30, 120)
    yield "PersistentMapping, words", text, (30, 200, 2000)


def cpu_per_call(function, items) -> float:
    best = float("inf")
    for _ in range(3):
        t = time.process_time()
        for item in items:
            function(item)
        best = min(best, time.process_time() - t)
    return best / len(items)


def main() -> int:
    rnd = random.Random(1)
    rows = []
    for label, make, sizes in kinds(rnd):
        for n in sizes:
            records = [pickle.dumps(make(n), 3) for _ in range(RECORDS)]
            size = sum(map(len, records))
            zipped = [zlib.compress(r, 6) for r in records]
            isal = [isal_zlib.compress(r, isal_zlib.ISAL_DEFAULT_COMPRESSION) for r in records]
            assert [zlib.decompress(p) for p in isal] == records
            zlib_us = cpu_per_call(lambda r: zlib.compress(r, 6), records) * 1e6
            isal_us = cpu_per_call(
                lambda r: isal_zlib.compress(r, isal_zlib.ISAL_DEFAULT_COMPRESSION), records) * 1e6
            rows.append([
                "%s (%d)" % (label, n), "%d" % (size // RECORDS),
                "%.1f" % zlib_us, "%.1f" % isal_us, "%.1f" % (zlib_us / isal_us),
                "%.0f%%" % (100 * sum(map(len, zipped)) / size),
                "%.0f%%" % (100 * sum(map(len, isal)) / size),
                "%.1f" % (cpu_per_call(zlib.decompress, isal) * 1e6),
                "%.1f" % (cpu_per_call(isal_zlib.decompress, isal) * 1e6)])
    print(format_table(["record", "bytes", "zlib 6 us", "isal us", "x", "zlib 6 size",
                        "isal size", "inflate zlib us", "inflate isal us"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
