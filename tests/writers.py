"""Writer processes for cluster tests: real clients committing while nodes
die, each printing what was acknowledged."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import transaction
import ZODB
from BTrees.OOBTree import OOBTree

from neozodb.client import Storage

# Commits tree[i] = "v<i>" for i = 0, 1, ... into the OOBTree root[key], one
# transaction each, printing i once acknowledged, until the stop file
# exists.  With retry, a failed commit (it was not committed: the client
# never both raises and commits) is retried with the same i; without, the
# writer dies of it.
WRITER = textwrap.dedent("""
    import os, sys, transaction, ZODB
    from neozodb.client import Storage
    masters, name, key, stop, retry = sys.argv[1:]
    db = ZODB.DB(Storage(masters, name))
    conn = db.open()
    i = 0
    while not os.path.exists(stop):
        try:
            conn.root()[key][i] = "v%d" % i
            transaction.commit()
        except Exception as e:
            if retry != "retry":
                raise
            print("retry", i, type(e).__name__, e, file=sys.stderr, flush=True)
            transaction.abort()
            continue
        print(i, flush=True)
        i += 1
    db.close()
""")


class Writers:
    """One writer process per key, stopped and checked by ``stop()``."""

    def __init__(self, cluster, directory, keys=("w1", "w2"), retry: bool = False,
                 script: str = WRITER, env: dict | None = None) -> None:
        db = ZODB.DB(Storage(cluster.masters, cluster.name))
        root = db.open().root()
        for key in keys:
            root[key] = OOBTree()
        transaction.commit()
        db.close()
        self.cluster = cluster
        self.keys = keys
        self.stop_file = str(directory / "stop")
        self.outs = [str(directory / (key + ".out")) for key in keys]
        self.procs = [
            subprocess.Popen([sys.executable, "-c", script, cluster.masters, cluster.name, key,
                              self.stop_file, "retry" if retry else "strict"],
                             stdout=open(out, "w"), stderr=open(out + ".err", "w"), env=env)
            for key, out in zip(keys, self.outs, strict=True)]

    def counts(self) -> list[int]:
        """Commits acknowledged so far, per writer."""
        counts = []
        for out in self.outs:
            with open(out) as f:
                counts.append(len(f.read().split()))
        return counts

    def more(self, n: int) -> bool:
        """A condition for wait_until: every writer acknowledged n more
        commits than when this was called."""
        start = self.counts()
        return lambda: all(c >= s + n for c, s in zip(self.counts(), start, strict=True))

    def stop(self, timeout: float = 60) -> list[int]:
        """Stop the writers; they must exit cleanly.  Returns the counts."""
        open(self.stop_file, "w").close()
        for proc, out in zip(self.procs, self.outs, strict=True):
            status = proc.wait(timeout)
            with open(out + ".err") as f:
                assert status == 0, f.read()
        return self.counts()

    def check(self) -> None:
        """Every acknowledged commit is there, and nothing else."""
        counts = self.counts()
        db = ZODB.DB(Storage(self.cluster.masters, self.cluster.name))
        try:
            root = db.open().root()
            for key, count in zip(self.keys, counts, strict=True):
                tree = root[key]
                assert list(tree.keys()) == list(range(count))
                assert [tree[i] for i in range(count)] == ["v%d" % i for i in range(count)]
        finally:
            db.close()
