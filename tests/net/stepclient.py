"""A history workload client driven step by step from stdin, for faults
timed inside a commit (tests/net): the same transactions and history
records as tests/history/workload.py, so the checker reads its history
with the others.

    stepclient.py MASTERS CLUSTER KEEPALIVE CLIENT OUT SEED

Commands, one a line, each answered with one line:

- ``run N``: transactions until N committed (at most ATTEMPTS x N, the
  others conflicting under the load of other clients); answers
  ``done {"ok": .., ...}`` (outcomes);
- ``hold``: one transaction that stops between its vote and its
  tpc_finish (others before it if they fail before, conflicting),
  printing ``voted SEQ OID,OID... NID`` (the oids it stored, in hex, and
  the client's node id) and waiting for a ``finish`` line; then answers ``done RECORD``
  (the history record, JSON) and ``after SECONDS`` (from the ``finish``
  line to the outcome) on the same line;
- ``quit``.

After an "error" or "unknown" outcome the client is closed and the next
transaction opens a new one, as the workload does."""
from __future__ import annotations

import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "history"))
import workload  # noqa: E402

CONNECT_TIMEOUT = 30.0
ATTEMPTS = 20


def holding(base: type) -> type:
    """``base`` that remembers the oids stored and, when ``hold`` is set,
    waits for a line on stdin before tpc_finish."""

    class Holding(base):
        hold = False
        released_at = 0.0

        def tpc_begin(self, txn, *args, **kw):
            self.stored: list[bytes] = []
            return super().tpc_begin(txn, *args, **kw)

        def store(self, oid, serial, data, version, txn):
            self.stored.append(oid)
            return super().store(oid, serial, data, version, txn)

        def tpc_finish(self, txn, *args, **kw):
            if self.hold:
                self.hold = False
                print("voted %d %s %d" % (self.seq, ",".join(o.hex() for o in self.stored),
                                          self.app.nid), flush=True)
                line = sys.stdin.readline().strip()
                if line != "finish":
                    raise RuntimeError("expected finish, got %r" % line)
                self.released_at = time.monotonic()
            return super().tpc_finish(txn, *args, **kw)

    return Holding


class Client:
    def __init__(self, masters: str, cluster: str, keepalive: float, name: str, out: str,
                 seed: int) -> None:
        from neozodb.client import Storage
        self.cls = holding(workload.phase_storage(Storage))
        self.args = (masters, cluster)
        self.kw = {"keepalive": keepalive, "connect_timeout": CONNECT_TIMEOUT}
        self.name = name
        self.rng = random.Random(seed)
        self.names = workload.keys()
        self.history = workload.History(out, fsync=False)
        self.seq = workload.last_seq(out)
        self.db = self.conn = self.tm = None
        self.released_at = 0.0

    def _open(self) -> None:
        import transaction
        import ZODB
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while self.db is None:
            try:
                self.db = ZODB.DB(self.cls(*self.args, **self.kw))
                workload.create_keys(self.db, self.names, time.monotonic() + CONNECT_TIMEOUT)
            except Exception as e:
                print("cannot open the database: %s: %s" % (type(e).__name__, e),
                      file=sys.stderr, flush=True)
                if self.db is not None:
                    self.db.close()
                self.db = None
                if time.monotonic() > deadline:
                    raise
        self.tm = transaction.TransactionManager(explicit=True)
        self.conn = self.db.open(self.tm)

    def transaction(self, hold: bool = False) -> dict:
        if self.db is None:
            self._open()
        self.seq += 1
        storage = self.db.storage
        storage.seq, storage.hold, storage.released_at = self.seq, hold, 0.0
        # a held transaction appends to lists only: whether it committed
        # shows in the final state
        names = [k for k in self.names if k.startswith("lst")] if hold else self.names
        record = workload.transaction_once(self.conn, self.tm, storage, self.rng, names,
                                           self.name, self.seq, self.history, read_current=True)
        self.released_at = storage.released_at
        if record["outcome"] in ("error", "unknown"):
            print("%d %s: %s" % (self.seq, record["outcome"], record["error"]),
                  file=sys.stderr, flush=True)
            workload._close(self.conn, self.db)
            self.db = self.conn = None
        return record

    def close(self) -> None:
        workload._close(self.conn, self.db)
        self.history.close()


def main(argv: list[str]) -> int:
    masters, cluster, keepalive, name, out, seed = argv
    client = Client(masters, cluster, float(keepalive), name, out, int(seed))
    try:
        for line in sys.stdin:
            words = line.split()
            if words[:1] == ["run"]:
                tally: dict[str, int] = {}
                wanted = int(words[1])
                for _ in range(ATTEMPTS * wanted):
                    outcome = client.transaction()["outcome"]
                    tally[outcome] = tally.get(outcome, 0) + 1
                    if tally.get("ok", 0) >= wanted:
                        break
                print("done", json.dumps(tally), flush=True)
            elif words == ["hold"]:
                # until one gets past its vote (the others conflicted)
                record = client.transaction(hold=True)
                while not client.released_at:
                    record = client.transaction(hold=True)
                after = record["end"] - client.released_at
                print("done", json.dumps(record), "after %.2f" % after, flush=True)
            elif words == ["quit"]:
                return 0
            else:
                print("unknown command %r" % line, flush=True)
        return 0
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
