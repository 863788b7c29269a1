"""tpc_begin does not wait for the master's answer (the TTID): the
application's work until the vote (serialization, stores) overlaps the round
trip.  The stores wait aside until the answer, and their cells are looked up
only then: the answer is also a barrier, every node and partition table
change the master made before it reaches the client before it."""
from __future__ import annotations

import select
import signal
import threading

import pytest
from ZODB.Connection import TransactionMetaData
from ZODB.POSException import StorageTransactionError
from ZODB.utils import z64

from neozodb.client import Storage
from neozodb.protocol import Packets

pytestmark = pytest.mark.timeout(120)


def _in_thread(work, timeout: float = 20.0) -> None:
    """Run ``work()`` and fail if it does not return within ``timeout``."""
    errors: list[BaseException] = []

    def run():
        try:
            work()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "blocked (waiting for the stopped master?)"
    if errors:
        raise errors[0]


def test_begin_and_stores_do_not_wait_for_the_master(one_storage):
    cluster = one_storage
    master = cluster.nodes["M1"]
    storage = Storage(**cluster.client_kwargs())
    looked_up = []  # the TTID known at each cell lookup
    try:
        oid = storage.new_oid()
        txn = TransactionMetaData()
        writable_cells = storage.app.writable_cells

        def recorded(oid_or_tid):
            looked_up.append(storage._commit(txn).ttid)
            return writable_cells(oid_or_tid)
        storage.app.writable_cells = recorded
        master.signal(signal.SIGSTOP)
        try:
            _in_thread(lambda: storage.tpc_begin(txn))
            _in_thread(lambda: storage.store(oid, z64, b"stored before the TTID", "", txn))
            commit = storage._commit(txn)
            assert commit.ttid is None and commit.deferred
        finally:
            master.signal(signal.SIGCONT)
        storage.tpc_vote(txn)
        tid = storage.tpc_finish(txn)
    finally:
        storage.close()
    assert looked_up and None not in looked_up
    reader = Storage(**cluster.client_kwargs())
    try:
        assert reader.load(oid) == (b"stored before the TTID", tid)
    finally:
        reader.close()


def test_a_begin_that_failed_is_reported_at_the_vote(one_storage):
    cluster = one_storage
    master = cluster.nodes["M1"]
    storage = Storage(**cluster.client_kwargs())
    try:
        oid = storage.new_oid()
        txn = TransactionMetaData()
        master.signal(signal.SIGSTOP)
        _in_thread(lambda: storage.tpc_begin(txn))
        _in_thread(lambda: storage.store(oid, z64, b"never committed", "", txn))
        master.kill()  # the connection closes with the begin unanswered
        with pytest.raises(StorageTransactionError, match="tpc_begin failed"):
            storage.tpc_vote(txn)
        _in_thread(lambda: storage.tpc_abort(txn))
        assert not storage._commits and not storage.app.transactions
    finally:
        storage.close()


def test_stores_leave_once_the_begin_is_answered(one_storage):
    """The answer is read by the store that finds it arrived (nobody else
    reads the master then): that store and the next ones leave at once,
    not all at the vote."""
    cluster = one_storage
    storage = Storage(**cluster.client_kwargs())
    try:
        oids = [storage.new_oid() for _ in range(3)]
        master = storage.app.get_master()
        # keep the master's reader thread out of its socket: only a store
        # that looks can read the answer
        master.direct_grace = 60.0
        master.call(Packets.AskLastTransaction, timeout=30)
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        raw = getattr(master.sock, "sock", master.sock)
        readable, _, _ = select.select([raw], [], [], 30)
        assert readable, "no answer to the begin within 30 s"
        commit = storage._commit(txn)
        assert commit.ttid is None  # arrived, not read
        for oid in oids:
            storage.store(oid, z64, b"sent at once", "", txn)
        assert commit.ttid is not None and not commit.deferred  # all sent
        storage.tpc_vote(txn)
        tid = storage.tpc_finish(txn)
    finally:
        storage.close()
    reader = Storage(**cluster.client_kwargs())
    try:
        assert [reader.load(oid) for oid in oids] == [(b"sent at once", tid)] * 3
    finally:
        reader.close()


def test_abort_after_a_refused_begin_sends_nothing(one_storage):
    """The begin refused (a read-only master), reported at a store or the
    vote: the abort that follows has no TTID to drop and sends nothing (an abort
    without one would be a protocol error that closes the connection)."""
    cluster = one_storage
    proc = cluster.nodes["M1"]
    proc.kill()
    proc.argv.append("--read-only")
    proc.start()
    cluster.wait_state("RUNNING", 60)
    storage = Storage(**cluster.client_kwargs())
    try:
        oid = bytes(7) + b"\x01"
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        with pytest.raises(StorageTransactionError, match="tpc_begin failed"):
            # a store that finds the answer there reports it already
            storage.store(oid, z64, b"refused", "", txn)
            storage.tpc_vote(txn)
        master = storage.app.master
        storage.tpc_abort(txn)
        assert not storage._commits
        master.call(Packets.AskLastTransaction, timeout=30)  # still open
        assert storage.app.master is master and not master.closed
    finally:
        storage.close()
