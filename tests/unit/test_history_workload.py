"""The history workload (tests/history/workload.py) classifies outcomes
honestly: a failure before the storage's tpc_finish is an error or a
conflict, one in or after it is unknown.  On a MappingStorage whose
vote or finish fails on demand."""
from __future__ import annotations

import json
import random
import time

import pytest
import transaction
import ZODB
from ZODB.MappingStorage import MappingStorage
from ZODB.POSException import ConflictError, StorageTransactionError

from history.checker import check, load
from history.workload import History, create_keys, keys, phase_storage, transaction_once

pytestmark = pytest.mark.timeout(30)


class Failing(MappingStorage):
    """Fails in its vote or in its tpc_finish, before committing."""
    fail: str | None = None  # the failure of the next commit

    def tpc_vote(self, txn):
        if self.fail == "vote":
            raise StorageTransactionError("vote failed")
        if self.fail == "vote conflict":
            raise ConflictError("conflict at the vote")
        return super().tpc_vote(txn)

    def tpc_finish(self, txn, *args, **kw):
        if self.fail == "finish":
            raise StorageTransactionError("master lost: committed or not")
        return super().tpc_finish(txn, *args, **kw)


class FailingAfter(phase_storage(Failing)):
    """Fails too once the storage's tpc_finish returned (in ZODB's
    bookkeeping, say): committed."""

    def tpc_finish(self, txn, *args, **kw):
        tid = super().tpc_finish(txn, *args, **kw)
        if self.fail == "after finish":
            raise StorageTransactionError("failed after the commit")
        return tid


@pytest.mark.parametrize("fail, outcome, committed", [
    (None, "ok", True),
    ("vote", "error", False),
    ("vote conflict", "conflict", False),
    ("finish", "unknown", False),
    ("after finish", "unknown", True),
])
def test_outcomes(tmp_path, fail, outcome, committed):
    storage = FailingAfter()
    db = ZODB.DB(storage)
    names = keys(0, 1)  # one list: every transaction appends to it
    create_keys(db, names, time.monotonic() + 10)
    tm = transaction.TransactionManager(explicit=True)
    conn = db.open(tm)
    path = str(tmp_path / "c1.jsonl")
    history = History(path, fsync=False)
    rng = random.Random(1)
    try:
        assert transaction_once(conn, tm, storage, rng, names, "c1", 1, history)["outcome"] == "ok"
        storage.fail = fail
        record = transaction_once(conn, tm, storage, rng, names, "c1", 2, history)
        storage.fail = None
        after = transaction_once(conn, tm, storage, rng, names, "c1", 3, history)
    finally:
        history.close()
    assert record["outcome"] == outcome, record
    assert after["outcome"] == "ok"  # it goes on after a failure
    assert (record["tid"] is not None) == committed
    with open(path) as f:
        lines = [json.loads(line) for line in f]
    # each transaction is announced before its commit, then its outcome
    assert [(r["seq"], r["outcome"]) for r in lines] == [
        (1, "pending"), (1, "ok"), (2, "pending"), (2, outcome), (3, "pending"), (3, "ok")]
    records, _ = load([path])
    tm.begin()
    final = {}
    for key in names:
        value = conn.root()[key]["v"]
        final[key] = list(value) if isinstance(value, tuple) else value
    tm.abort()
    conn.close()
    db.close()
    assert check(records, final) == []
    assert all((e in final["lst0"]) == committed for e in record["writes"]["lst0"])
