"""Writer processes for cluster tests: real clients committing while nodes
die, each printing or logging what was acknowledged."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import transaction
import ZODB
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping

from neozodb.cli.cluster import wait_until
from neozodb.client import Storage
from neozodb.protocol import u64

# The writer scripts' commit loop: commits tree[i] = "v<i>" for i = 0, 1,
# ... into the OOBTree root[key], one transaction each, printing i once
# acknowledged, until the stop file exists.  With retry, a failed commit (it
# was not committed: the client never both raises and commits) is retried
# with the same i, after ``db, tm, conn = after_failure(db, tm, conn)``
# (which aborts); without, the writer dies of it.  The set-up before it
# reads the arguments masters, name, key, stop, retry and opens db, tm
# (a transaction manager) and conn.
_WRITER_LOOP = """
i = 0
while not os.path.exists(stop):
    try:
        conn.root()[key][i] = "v%d" % i
        tm.commit()
    except Exception as e:
        if retry != "retry":
            raise
        print("retry", i, type(e).__name__, e, file=sys.stderr, flush=True)
        db, tm, conn = after_failure(db, tm, conn)
        continue
    print(i, flush=True)
    i += 1
db.close()
"""


def writer_script(setup: str) -> str:
    """A writer process's code: ``setup``, then the commit loop (see
    _WRITER_LOOP)."""
    return textwrap.dedent(setup) + _WRITER_LOOP


# The writer through neozodb's client.
WRITER = writer_script("""
    import os, sys, transaction, ZODB
    from neozodb.client import Storage
    masters, name, key, stop, retry = sys.argv[1:]
    db = ZODB.DB(Storage(masters, name))
    tm = transaction.manager
    conn = db.open(tm)

    def after_failure(db, tm, conn):
        tm.abort()
        return db, tm, conn
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


# A client process logging each commit, for the crash and power-loss tests:
# transaction n of writer w sets each of its objects root["w.0"],
# root["w.1"]... to (w, n) and its counter root["w.n"] to n, described
# "w n".  Its log (fsynced line by line) gets "B n" before the commit,
# "A n <tid>" once transaction.commit() returned, and "E n <error>" when it
# failed (then it aborts and goes on).  Restarted, it goes on after the last
# n it ever began.  Given a stop file, it stops after the commit that
# follows the file's creation; given "", it runs until it is killed.
LOGGING_WRITER = textwrap.dedent("""
    import os, sys, transaction, ZODB
    from neozodb.client import Storage

    masters, name, w, path, count, stop = sys.argv[1:]
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def note(*words):
        os.write(fd, (" ".join(map(str, words)) + "\\n").encode())
        os.fsync(fd)

    with open(path) as f:
        n = max([int(l.split()[1]) for l in f if l.startswith("B ")], default=0)
    db = ZODB.DB(Storage(masters, name))
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    while not (stop and os.path.exists(stop)):
        n += 1
        try:
            root = conn.root()
            objects = [root["%s.%d" % (w, k)] for k in range(int(count))]
            counter = root[w + ".n"]
            for obj in objects:
                obj["v"] = (w, n)
            counter["n"] = n
            tm.get().note("%s %d" % (w, n))
            note("B", n)
            tm.commit()
        except Exception as e:
            note("E", n, type(e).__name__)
            tm.abort()
            continue
        note("A", n, counter._p_serial.hex())
    db.close()
""")


def create_writer_objects(cluster, names, count: int) -> dict[str, list[int]]:
    """The counter and ``count`` objects of each LOGGING_WRITER of
    ``names``, at n = 0, in one transaction: {name: their oids, counter
    first}."""
    db = ZODB.DB(Storage(cluster.masters, cluster.name))
    try:
        conn = db.open()
        root = conn.root()
        for w in names:
            root[w + ".n"] = PersistentMapping(n=0)
            for k in range(count):
                root["%s.%d" % (w, k)] = PersistentMapping(v=(w, 0))
        conn.transaction_manager.commit()
        return {w: [u64(root[w + ".n"]._p_oid)]
                + [u64(root["%s.%d" % (w, k)]._p_oid) for k in range(count)]
                for w in names}
    finally:
        db.close()


class LoggingWriter:
    """A LOGGING_WRITER process for writer ``name``, setting ``count``
    objects, logging to ``log`` (its stderr to ``log + ".err"``); started
    again after ``kill``, it goes on."""

    def __init__(self, name: str, log: str, count: int, stop_file: str = "") -> None:
        self.name = name
        self.log = log
        self.stderr = log + ".err"
        self.count = count
        self.stop_file = stop_file
        self.proc: subprocess.Popen | None = None

    def start(self, cluster) -> None:
        with open(self.stderr, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", LOGGING_WRITER, cluster.masters, cluster.name, self.name,
                 self.log, str(self.count), self.stop_file],
                stdout=subprocess.DEVNULL, stderr=err)

    def read(self) -> tuple[int, dict[int, bytes], int]:
        """(last n begun, {acknowledged n: tid}, commits that failed)"""
        began, acked, errors = 0, {}, 0
        if os.path.exists(self.log):
            with open(self.log) as f:
                for line in f:
                    words = line.split()
                    if words[0] == "B":
                        began = max(began, int(words[1]))
                    elif words[0] == "A":
                        acked[int(words[1])] = bytes.fromhex(words[2])
                    elif words[0] == "E":
                        errors += 1
        return began, acked, errors

    def acked(self) -> dict[int, bytes]:
        """{n: tid} of the acknowledged commits; fails if the process ended
        without being killed."""
        if self.proc is not None and self.proc.poll() is not None:
            with open(self.stderr) as f:
                raise AssertionError("writer %s exited: %s" % (self.name, f.read()[-2000:]))
        return self.read()[1]

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
            self.proc = None


def wait_acknowledged(writers, more: list[int], timeout: float, what: str) -> None:
    """Each of ``writers`` acknowledges its number in ``more`` more commits."""
    targets = [len(w.acked()) + m for w, m in zip(writers, more, strict=True)]
    wait_until(lambda: all(len(w.acked()) >= t for w, t in zip(writers, targets, strict=True)),
               timeout, what)
