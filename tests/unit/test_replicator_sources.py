"""A replication source that answers nonsense (of the right wire types) is
a transient error: the replication with it is abandoned, its connection
closed, retried later; never a node exit or an endless loop."""
from __future__ import annotations

import asyncio

import pytest

from neozodb.protocol import CellStates, NodeStates, p64
from neozodb.storage.replicator import BadSource, Replicator

pytestmark = pytest.mark.timeout(30)


class Backend:
    blobs = False  # keeps no contents: nothing to fetch

    def __init__(self):
        self.point = (0, 0, 0)
        self.deleted: list = []

    def get_replication(self, partition):
        return self.point

    def set_replication(self, partition, point, durable=True):
        self.point = point
        self.durable = durable

    def add_transactions(self, records):
        pass

    def add_objects(self, partition, records):
        pass

    def fetch_tids(self, partition, length, low, high):
        return [4]

    def fetch_object_keys(self, partition, length, tid, high, oid):
        return [(4, 8)]

    def delete_transactions(self, partition, tids):
        self.deleted += tids

    def delete_objects(self, partition, keys):
        self.deleted += keys


class Conn:
    def __init__(self, answers):
        self.answers = list(answers)
        self.closed = None

    def ask(self, packet, *args):
        if not self.answers or len(self.answers) > 100:
            raise AssertionError("asked again: %s" % packet.name)
        future = asyncio.get_running_loop().create_future()
        name, answer = self.answers.pop(0)
        assert packet.name == name
        future.set_result(answer)
        return future

    def close(self, reason=""):
        self.closed = reason


class Node:
    state = NodeStates.RUNNING
    address = ("127.0.0.1", 1)


class PT:
    def readable_nids(self, partition):
        return [2]


class App:
    label = "S1"
    nid = 1

    def __init__(self, conn):
        self.backend = Backend()
        self.pt = PT()
        self.conn = conn
        self.exited = None

    class nm:
        @staticmethod
        def get(nid):
            return Node()

    def cell_state(self, partition):
        return CellStates.OUT_OF_DATE.value

    async def peer_connection(self, nid):
        return self.conn

    def exit(self, status=0):
        self.exited = status

    def pending_written(self):
        pass


def _replicate(answers):
    conn = Conn(answers)
    app = App(conn)

    async def main():
        rep = Replicator(app)
        rep.targets[0] = 10
        return await rep._replicate(0)
    return app, conn, main


FT, FO = "AskFetchTransactions", "AskFetchObjects"


@pytest.mark.parametrize("answers, why", [
    ([(FT, (p64(0), [], None))], "transaction position does not advance"),
    ([(FT, (None, [p64(3)], None))], "deletion of transactions we did not list"),
    ([(FT, (None, [], None)), (FO, (p64(5), None, {}))], "object position does not advance"),
    ([(FT, (None, [], None)), (FO, (p64(0), p64(0), {}))], "object position does not advance"),
    ([(FT, (None, [], None)), (FO, (None, None, {p64(4): [p64(9)]}))],
     "deletion of objects we did not list"),
])
def test_nonsense_from_a_source_abandons_it(answers, why):
    app, conn, main = _replicate(answers)
    with pytest.raises(BadSource, match=why):
        asyncio.run(main())
    assert conn.closed == "bad replication answer: " + why
    assert app.backend.deleted == []  # nothing applied from the bad answer


def test_sensible_answers_replicate():
    app, conn, main = _replicate([
        (FT, (p64(5), [p64(4)], None)), (FT, (None, [], None)),
        (FO, (None, None, {p64(4): [p64(8)]}))])
    assert asyncio.run(main()) is True
    assert conn.closed is None and app.backend.deleted == [4, (4, 8)]
    assert app.backend.point == (11, 11, 0)


def test_bad_source_is_retried_not_fatal():
    """The replication loop logs BadSource and tries again later."""
    app = App(None)
    steps = []

    async def main():
        rep = Replicator(app)
        again = asyncio.Event()

        async def step():
            steps.append(1)
            if len(steps) == 1:
                raise BadSource("partition 0 from S2: object position does not advance")
            again.set()
            return False
        rep._step = step
        task = asyncio.ensure_future(rep._run())
        await asyncio.wait_for(again.wait(), 10)
        task.cancel()
    asyncio.run(main())
    assert app.exited is None and len(steps) == 2


def test_only_write_failures_stop_the_storage():
    """A database error stops the node; one caused by a bad value (the
    statement undone, the database intact) only fails that request."""
    import sqlite3

    from neozodb.storage.app import StorageApp
    from neozodb.storage.backends.sqlite import SQLiteBackend

    class Fake:
        backend = SQLiteBackend(":memory:")
        label = "S1"
        client_conns = source_conns = ()
        peer_conns: dict = {}
        master_conn = None
        status = None

        class _exit:
            @staticmethod
            def is_set():
                return False

        def exit(self, status=0):
            self.status = status

        _stop_unsafe = StorageApp._stop_unsafe

    fake = Fake()
    assert not StorageApp.fatal_error(fake, sqlite3.IntegrityError("UNIQUE"), "AddObject from S2")
    assert not StorageApp.fatal_error(fake, ValueError("x"), "AddObject from S2")
    assert fake.status is None
    assert StorageApp.fatal_error(fake, sqlite3.OperationalError("disk I/O error"), "x")
    assert fake.status == 1
