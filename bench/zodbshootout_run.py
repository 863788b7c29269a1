"""``python -m zodbshootout`` for bench/shootout.py, with neozodb's client
cache where zodbshootout looks for one.

zodbshootout empties a storage's cache between the runs of its "cold"
benchmarks with ``db.storage._cache.clear()`` when the storage has a
``_cache`` (ZEO's ClientStorage and RelStorage do).  At concurrency 1 it
opens the database once for all runs, so without this a neozodb client's
cache (``storage.app.cache``) stays warm and its "cold" reads are served
from memory.  zodbshootout has pyperf start its worker processes with
``python -m zodbshootout``; they are started with this script instead, so
that they have it too.
"""
import os
import sys

from neozodb.client import Storage

if not hasattr(Storage, "_cache"):
    Storage._cache = property(lambda self: self.app.cache)

if __name__ == "__main__":
    import pyperf
    init = pyperf.Runner.__init__

    def runner_init(self, *args, **kw):
        if kw.get("program_args") == ("-m", "zodbshootout"):
            kw["program_args"] = (os.path.abspath(__file__),)
        init(self, *args, **kw)
    pyperf.Runner.__init__ = runner_init

    from zodbshootout.main import main
    sys.exit(main())
