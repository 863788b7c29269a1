"""One-object commits at the storage API level, step by step, for tests
that stop or kill nodes between the steps."""
from __future__ import annotations

import sqlite3
import threading

from ZODB.Connection import TransactionMetaData
from ZODB.POSException import StorageTransactionError
from ZODB.utils import u64


def voted(storage, oid: bytes, data: bytes, serial: bytes):
    txn = TransactionMetaData()
    storage.tpc_begin(txn)
    storage.store(oid, serial, data, "", txn)
    storage.tpc_vote(txn)
    return txn


def commit(storage, oid: bytes, data: bytes, serial: bytes) -> bytes:
    return storage.tpc_finish(voted(storage, oid, data, serial))


def finish_in_thread(storage, txn):
    """tpc_finish in a thread: (the thread, {"tid": ...} or {"error": ...})."""
    outcome = {}

    def finish():
        try:
            outcome["tid"] = storage.tpc_finish(txn)
        except StorageTransactionError as e:
            outcome["error"] = e
    thread = threading.Thread(target=finish)
    thread.start()
    return thread, outcome


def locked_in(path: str, after: bytes) -> bool:
    """Whether a transaction after ``after`` is locked in that SQLite
    database (the unlock of an earlier one may not be committed yet: it
    waits for the next durable point, and a lazy vote is none)."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT 1 FROM ttrans WHERE tid > ?",
                            (u64(after),)).fetchone() is not None
    finally:
        conn.close()
