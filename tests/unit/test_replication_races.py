"""Replication races that left a cell OUT_OF_DATE for good (found by
tests/net/test_storage_cutoff.py: a storage cut off from the clients is
dropped and rejoins at every failed vote, with little to fetch).

A replication that caught up while the packer had not yet asked the
master for its pack orders (just after the storage became operational
again) reports its cell once the packer has them, even with no pack to
do: the packer's refresh wakes the replicator.  Before, the replicator
waited for a wake-up that only packing one of our partitions gave, and a
storage that rejoined with little to fetch stayed OUT_OF_DATE.

The list of unfinished transactions the master answers is recorded before
the notification read after it (NotifyTransactionFinished) is handled.

A transaction of that list that is aborted ends the wait too: NEO's master
tells it with AbortTransaction alone (no NotifyTransactionFinished), and
the cell stayed OUT_OF_DATE for good (tests/interop/test_mixed_clusters.py
test_sigkill_under_load with NEO's master, once in a while)."""
from __future__ import annotations

import asyncio

import pytest

from neozodb.protocol import CellStates, Packets, p64
from neozodb.storage.handlers import MasterHandler
from neozodb.storage.pack import Packer
from neozodb.storage.replicator import Replicator

pytestmark = pytest.mark.timeout(30)

PARTITION, TARGET = 3, 100


class Backend:
    def get_replication(self, partition):
        return (TARGET + 1, TARGET + 1, 0)  # everything up to the target is here

    def get_pack_progress(self, partition):
        return None


class MasterConn:
    closed = False

    def __init__(self):
        self.notified: list = []

    def ask(self, packet, *args):
        assert packet is Packets.AskPackOrders
        future = asyncio.get_running_loop().create_future()
        future.set_result(([],))  # no pack order
        return future

    def notify(self, packet, *args):
        self.notified.append((packet, args))


class App:
    label = "S1"

    def __init__(self):
        self.backend = Backend()
        self.master_conn = MasterConn()
        self.replicator = Replicator(self)
        self.packer = Packer(self)

    def lockless_pending(self, partition):
        return False

    def assigned_partitions(self):
        return [PARTITION]

    def readable(self, partition):
        return False

    def cell_state(self, partition):
        return CellStates.OUT_OF_DATE.value


def test_replication_done_after_the_packers_refresh():
    async def scenario():
        app = App()
        replicator, packer = app.replicator, app.packer
        replicator.targets[PARTITION] = TARGET
        replicator.unfinished[PARTITION] = set()
        assert packer.stale  # as after start(): orders not asked yet
        replicator._maybe_done(PARTITION)
        assert not app.master_conn.notified  # waits for the packer
        replicator._wake.clear()
        assert await packer._step() is False  # refreshed; nothing to pack
        assert not packer.stale
        assert replicator._wake.is_set(), "the replicator was not woken"
        replicator._maybe_done(PARTITION)
        done = [args for packet, args in app.master_conn.notified
                if packet is Packets.NotifyReplicationDone]
        assert done == [(PARTITION, p64(TARGET))]
    asyncio.run(scenario())


class AskingConn:
    """A master connection whose answer to AskUnfinishedTransactions is
    dispatched, by ``deliver``, together with the notification that
    follows it in the same read, as the connection's protocol does."""

    closed = False

    def __init__(self):
        self.pending = None

    def ask(self, packet, *args, callback=None):
        assert packet is Packets.AskUnfinishedTransactions
        if callback is None:
            self.pending = asyncio.get_running_loop().create_future()
            return self.pending
        self.pending = callback
        return None

    def deliver(self, answer, then) -> None:
        if callable(self.pending):
            self.pending(self, answer, None)
        else:
            self.pending.set_result(answer)
        then()  # the next message of the same chunk: before any task resumes


def test_transaction_finished_right_after_the_unfinished_list():
    """NotifyTransactionFinished read in the same chunk as the answer
    listing that transaction as unfinished: the replication does not wait
    for it (it waited forever: the list was recorded when the replicator's
    task resumed, after the notification)."""
    async def scenario():
        app = App()
        app.master_conn = conn = AskingConn()
        replicator = app.replicator
        ttid, tid = p64(7), p64(TARGET + 5)
        task = asyncio.ensure_future(replicator._ask_unfinished([PARTITION]))
        await asyncio.sleep(0)  # the request is sent
        conn.deliver((p64(TARGET), [ttid]),
                     lambda: replicator.transaction_finished(ttid, tid))
        await task
        assert replicator.unfinished[PARTITION] == set()
        assert replicator.targets[PARTITION] == TARGET + 5
    asyncio.run(scenario())


def _done(app) -> list:
    return [args for packet, args in app.master_conn.notified
            if packet is Packets.NotifyReplicationDone]


def test_unfinished_transaction_aborted_by_the_master():
    """The master aborts a transaction the replication waits for and says
    so with AbortTransaction only, as NEO's does: the cell is reported at
    the target (the aborted transaction wrote nothing, no tid to reach)."""
    async def scenario():
        app = App()
        aborted = []
        app.abort = aborted.append
        replicator = app.replicator
        app.packer.stale = False  # orders known: only the wait holds it back
        ttid = p64(7)
        replicator.targets[PARTITION] = TARGET
        replicator.unfinished[PARTITION] = {ttid}
        replicator._maybe_done(PARTITION)
        assert not _done(app)  # waits for the transaction
        replicator._wake.clear()
        MasterHandler(app).AbortTransaction(app.master_conn, 0, ttid, [])
        assert aborted == [ttid]  # its locks here go as before
        assert replicator._wake.is_set(), "the replicator was not woken"
        assert replicator.caught_up(PARTITION)
        replicator._maybe_done(PARTITION)
        assert _done(app) == [(PARTITION, p64(TARGET))]
    asyncio.run(scenario())


def test_committed_and_aborted_transactions_end_the_wait():
    """Of two transactions waited for, one commits (the target moves up to
    its tid), the other is aborted (the target stays): the cell is done
    only after both, at the committed one's tid."""
    async def scenario():
        app = App()
        app.abort = lambda ttid: None
        app.packer.stale = False
        replicator = app.replicator
        committed, aborted = p64(7), p64(8)
        replicator.targets[PARTITION] = TARGET - 10
        replicator.unfinished[PARTITION] = {committed, aborted}
        replicator.transaction_finished(committed, p64(TARGET))
        assert not replicator.caught_up(PARTITION)
        MasterHandler(app).AbortTransaction(app.master_conn, 0, aborted, [])
        assert replicator.targets[PARTITION] == TARGET
        replicator._maybe_done(PARTITION)
        assert _done(app) == [(PARTITION, p64(TARGET))]
    asyncio.run(scenario())
