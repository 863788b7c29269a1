"""The client's ``server_sync`` option: what ZODB's ``sync()`` at each
``transaction.begin()`` costs.  True (the default): a round trip to the
master, after which every commit completed before is seen.  False (ZEO's
default): no round trip; what the master already sent is read and
processed, so a commit whose invalidation has arrived is seen."""
from __future__ import annotations

import select
import signal
import threading

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping

from neozodb.client import Storage
from neozodb.protocol import Packets

pytestmark = pytest.mark.timeout(120)


def _sync_in_thread(storage: Storage) -> threading.Thread:
    thread = threading.Thread(target=storage.sync, daemon=True)
    thread.start()
    return thread


def test_sync_asks_the_master_only_with_server_sync(one_storage):
    cluster = one_storage
    master = cluster.nodes["M1"]
    barrier = Storage(**cluster.client_kwargs())  # server_sync true: the default
    local = Storage(server_sync=False, **cluster.client_kwargs())
    try:
        master.signal(signal.SIGSTOP)
        try:
            waiting = _sync_in_thread(barrier)
            reading = _sync_in_thread(local)
            reading.join(20)
            assert not reading.is_alive(), "sync() without server_sync waited for the master"
            waiting.join(0.5)
            assert waiting.is_alive(), "sync() with server_sync did not ask the stopped master"
        finally:
            master.signal(signal.SIGCONT)
        waiting.join(30)
        assert not waiting.is_alive()
    finally:
        barrier.close()
        local.close()


def test_without_server_sync_a_transaction_sees_what_arrived(one_storage):
    """The invalidation waits in the socket, which no other thread reads:
    the next ``transaction.begin()`` reads it, and sees the commit."""
    cluster = one_storage
    writer_db = ZODB.DB(Storage(**cluster.client_kwargs()))
    reader_storage = Storage(server_sync=False, **cluster.client_kwargs())
    reader_db = ZODB.DB(reader_storage)
    try:
        wtm = transaction.TransactionManager()
        wroot = writer_db.open(wtm).root()
        wroot["counter"] = counter = PersistentMapping(value=1)
        wtm.commit()
        # that commit may not have reached the reader yet: without a
        # barrier it would see the root as it was
        reader_storage.app.sync()

        rtm = transaction.TransactionManager()
        rconn = reader_db.open(rtm)
        rtm.begin()
        assert rconn.root()["counter"]["value"] == 1

        master = reader_storage.app.get_master()
        # keep its reader thread out of the socket: only sync() can read
        # what comes, as after a commit this thread waited for itself
        master.direct_grace = 60.0
        master.call(Packets.AskLastTransaction, timeout=30)
        counter["value"] = 2
        wtm.commit()
        raw = getattr(master.sock, "sock", master.sock)
        readable, _, _ = select.select([raw], [], [], 30)
        assert readable, "no invalidation within 30 s"

        rtm.begin()  # ZODB calls sync(): no round trip, the socket read
        assert rconn.root()["counter"]["value"] == 2
        rtm.abort()
    finally:
        writer_db.close()
        reader_db.close()
