"""Replication a chunk at a time: a source streams object revisions as
``AddObjects`` batches to a destination with the "repl-batch" feature (one
``AddObject`` each otherwise: NEO), a destination checks and hands them to
its replicator, which asks for the next chunk before writing this one."""
from __future__ import annotations

import asyncio
import hashlib

import pytest

from neozodb.protocol import CellStates, NodeStates, Packets, ProtocolError, p64
from neozodb.protocol.features import REPL_BATCH
from neozodb.storage import peers
from neozodb.storage.backends.sqlite import SQLiteBackend
from neozodb.storage.replicator import Replicator

pytestmark = pytest.mark.timeout(30)
NP = 4


def h(data: bytes) -> bytes:
    return hashlib.sha1(data).digest()


class PT:
    num_partitions = NP

    def partition(self, oid_or_tid):
        return int.from_bytes(oid_or_tid, "big") % NP

    def readable_nids(self, partition):
        return [2]


class Locks:
    txns: dict = {}


class App:
    label = "S1"
    nid = 1

    def __init__(self, backend=None, state=CellStates.UP_TO_DATE.value):
        self.backend = backend
        self.pt = PT()
        self.locks = Locks()
        self.state = state
        self.last_request = 0
        self.replicator = None

    def cell_state(self, partition):
        return self.state

    def readable(self, partition):
        return self.state == CellStates.UP_TO_DATE.value

    def pending_written(self):
        pass


class Endpoint:
    def __init__(self):
        self.pending = {}


class Conn:
    label = "S2"

    def __init__(self, features=frozenset()):
        self.peer_features = features
        self.sent = []
        self.endpoint = Endpoint()

    def answer(self, msg_id, packet, *args):
        self.sent.append((packet, args))


@pytest.fixture
def source(tmp_path):
    """A SQLite backend whose partition 1 has 600 revisions (oid 1, 5, ...)."""
    db = SQLiteBackend(str(tmp_path / "source.sqlite"))
    db.open(reset=True)
    db.set_num_partitions(NP)
    records = [(1 + NP * i, 100 + i // 100, 0, h(b"%d" % i), b"%d" % i, None) for i in range(600)]
    db.add_objects(1, records)
    db.commit_pending()
    yield db, records
    db.close()


@pytest.mark.parametrize("features", [frozenset(), frozenset([REPL_BATCH])])
def test_source_batches_only_for_a_peer_with_the_feature(source, features):
    db, records = source
    conn = Conn(features)
    handler = peers.SourceHandler(App(db))
    handler.AskFetchObjects(conn, 7, 1, 1000, p64(0), p64(1000), p64(0), {})
    *streamed, answer = conn.sent
    assert answer == (Packets.AnswerFetchObjects, (None, None, {}))
    if features:
        assert {packet for packet, _ in streamed} == {Packets.AddObjects}
        assert [len(args[0]) for _, args in streamed] == [256, 256, 88]
        got = [record for _, (batch,) in streamed for record in batch]
    else:
        assert {packet for packet, _ in streamed} == {Packets.AddObject}
        got = [args for _, args in streamed]
    assert [(int.from_bytes(r[0], "big"), int.from_bytes(r[1], "big"), *r[2:5]) for r in got] \
        == sorted([r[:5] for r in records], key=lambda r: (r[1], r[0]))


def test_source_sends_only_what_the_destination_lacks(source):
    db, records = source
    conn = Conn(frozenset([REPL_BATCH]))
    theirs = {p64(100): [p64(oid) for oid, tid, *_ in records if tid == 100]}
    peers.SourceHandler(App(db)).AskFetchObjects(
        conn, 7, 1, 1000, p64(0), p64(1000), p64(0), theirs)
    *streamed, _ = conn.sent
    got = [r for _, (batch,) in streamed for r in batch]
    assert len(got) == 500 and all(int.from_bytes(r[1], "big") > 100 for r in got)


class Replicated:
    """What the destination's replicator is handed."""

    def __init__(self):
        self.batches = []

    def batch_received(self, fetch, partition, records):
        self.batches.append((fetch, partition, records))


def _destination(features=frozenset([REPL_BATCH])):
    app = App(state=CellStates.OUT_OF_DATE.value)
    app.replicator = Replicated()
    conn = Conn(features)
    conn.endpoint.pending[7] = (Packets.AskFetchObjects, "fetch")
    return app, conn, peers.DestinationHandler(app)


def _wire(oid, tid, data, checksum=None):
    return (p64(oid), p64(tid), 0, h(data) if checksum is None else checksum, data, None)


def test_destination_takes_a_batch():
    app, conn, handler = _destination()
    handler.AddObjects(conn, 7, [_wire(1, 100, b"a"), _wire(5, 100, b"b")])
    assert app.replicator.batches == [
        ("fetch", 1, [(1, 100, 0, h(b"a"), b"a", None), (5, 100, 0, h(b"b"), b"b", None)])]


@pytest.mark.parametrize("features, msg_id, records, why", [
    (frozenset(), 7, [_wire(1, 100, b"a")], "unexpected AddObjects"),
    (frozenset([REPL_BATCH]), 7, [], "unexpected AddObjects"),
    (frozenset([REPL_BATCH]), 8, [_wire(1, 100, b"a")], "answers no fetch"),
    (frozenset([REPL_BATCH]), 7, [_wire(1, 100, b"a"), _wire(2, 100, b"b")], "mixes partitions"),
    (frozenset([REPL_BATCH]), 7, [_wire(1, 100, b"a", h(b"b"))], "wrong checksum"),
])
def test_destination_refuses_bad_batches(features, msg_id, records, why):
    app, conn, handler = _destination(features)
    with pytest.raises(ProtocolError, match=why):
        handler.AddObjects(conn, msg_id, records)
    assert app.replicator.batches == []


# -- the replicator: next chunk asked before this one is written ----------------------------

class Recorder:
    """A backend that logs what the replicator does, in order."""

    blobs = False  # keeps no contents: nothing to fetch

    def __init__(self, log):
        self.log = log
        self.point = (0, 0, 0)

    def get_replication(self, partition):
        return self.point

    def set_replication(self, partition, point, durable=True):
        self.point = point
        self.log.append(("point", point, durable))

    def fetch_tids(self, partition, length, low, high):
        return []

    def fetch_object_keys(self, partition, length, tid, high, oid):
        return []

    def delete_transactions(self, partition, tids):
        pass

    def delete_objects(self, partition, keys):
        pass

    def add_transactions(self, records):
        pass

    def add_objects(self, partition, records):
        self.log.append(("write", [r[0] for r in records]))


class Node:
    state = NodeStates.RUNNING
    address = ("127.0.0.1", 1)


class Source:
    """Answers every fetch at once; the objects of chunk n are oids
    4n+1 and 4n+5, streamed before the answer, as a real source does."""

    def __init__(self, rep, log, chunks):
        self.rep, self.log, self.chunks = rep, log, chunks
        self.asked = 0

    def ask(self, packet, partition, length, *args):
        future = asyncio.get_running_loop().create_future()
        if packet is Packets.AskFetchTransactions:
            future.set_result((None, [], None))
            return future
        n = self.asked
        self.asked += 1
        self.log.append(("ask", n))

        def stream():
            self.rep.batch_received(future, 1, [(8 * n + 1, 10 + n, 0, b"", b"", None),
                                                (8 * n + 5, 10 + n, 0, b"", b"", None)])
            last = n + 1 == self.chunks
            future.set_result((None, None, {}) if last else (p64(11 + n), p64(0), {}))
        asyncio.get_running_loop().call_soon(stream)
        return future


def test_next_chunk_is_asked_before_this_one_is_written():
    log: list = []

    class RApp(App):
        nm = type("nm", (), {"get": staticmethod(lambda nid: Node())})

        async def peer_connection(self, nid):
            return self.source

    app = RApp(Recorder(log), state=CellStates.OUT_OF_DATE.value)

    async def main():
        rep = Replicator(app)
        app.source = Source(rep, log, 3)
        rep.targets[1] = 100
        assert await rep._replicate(1)
        assert rep._chunks == {}
    asyncio.run(main())
    objects = [entry for entry in log if entry[0] != "point" or entry[1][1]]
    assert objects == [
        ("ask", 0),
        ("ask", 1), ("write", [1, 5]), ("point", (101, 11, 0), False),
        ("ask", 2), ("write", [9, 13]), ("point", (101, 12, 0), False),
        ("write", [17, 21]), ("point", (101, 101, 0), True),  # the last one: durable
    ]


def test_what_an_abandoned_fetch_streams_is_dropped():
    log: list = []
    app = App(Recorder(log), state=CellStates.OUT_OF_DATE.value)

    async def main():
        rep = Replicator(app)
        future = asyncio.get_running_loop().create_future()
        rep._chunks[future] = object()
        rep._abandon(future)
        rep.batch_received(future, 1, [(1, 10, 0, b"", b"", None)])
        rep.object_received(future, 1, (5, 10, 0, b"", b"", None))
        future.set_exception(ConnectionError("gone"))  # retrieved: no warning
    asyncio.run(main())
    assert log == []


# -- several partitions at once ---------------------------------------------------------

class Partitions(Recorder):
    """A Recorder with a resume point per partition."""

    def __init__(self, log):
        super().__init__(log)
        self.points: dict = {}

    def get_replication(self, partition):
        return self.points.get(partition, (0, 0, 0))

    def set_replication(self, partition, point, durable=True):
        self.points[partition] = point
        self.log.append(("point", partition, durable))

    def add_objects(self, partition, records):
        self.log.append(("write", partition, [r[0] for r in records]))


class SlowSource:
    """Streams two objects of the asked partition per chunk, each chunk
    answered one loop turn after the ask; ``fail`` raises on a partition's
    second chunk."""

    def __init__(self, rep, log, chunks, fail=None, then=None):
        self.rep, self.log, self.chunks, self.fail = rep, log, chunks, fail
        self.then = then  # run right after partition 0's last answer
        self.asked: dict = {}

    def ask(self, packet, partition, length, *args):
        future = asyncio.get_running_loop().create_future()
        if packet is Packets.AskFetchTransactions:
            future.set_result((None, [], None))
            return future
        n = self.asked.get(partition, 0)
        self.asked[partition] = n + 1
        self.log.append(("ask", partition, n))

        def stream():
            if future.done():
                return
            if partition == self.fail and n == 1:
                future.set_exception(ConnectionError("source lost"))
                return
            oid = 8 * NP * n + partition
            self.rep.batch_received(future, partition, [(oid, 10 + n, 0, b"", b"", None),
                                                        (oid + NP, 10 + n, 0, b"", b"", None)])
            last = n + 1 == self.chunks
            future.set_result((None, None, {}) if last else (p64(11 + n), p64(0), {}))
            if last and partition == 0 and self.then is not None:
                self.then()
        asyncio.get_running_loop().call_soon(stream)
        return future


class AllPT(PT):
    def partitions_of(self, nid):
        return list(range(NP))


class MultiApp(App):
    nm = type("nm", (), {"get": staticmethod(lambda nid: Node())})
    master_conn = None  # _maybe_done tells nobody
    packer = type("packer", (), {"stale": False, "pending": staticmethod(lambda p: False)})

    def __init__(self, backend, state):
        super().__init__(backend, state)
        self.pt = AllPT()

    def lockless_pending(self, partition):
        return False

    async def peer_connection(self, nid):
        return self.source


def _step(log, fail=None):
    app = MultiApp(Partitions(log), state=CellStates.OUT_OF_DATE.value)

    async def main():
        rep = Replicator(app)
        app.source = SlowSource(rep, log, 3, fail)
        for partition in range(NP):
            rep.targets[partition] = 100
            rep.unfinished[partition] = set()
        try:
            return await rep._step()
        finally:
            assert rep._chunks == {}  # nothing left streaming into a forgotten chunk
    return asyncio.run(main())


def test_partitions_are_replicated_two_at_a_time(caplog):
    log: list = []
    caplog.set_level("INFO", "neozodb.storage")
    assert _step(log)
    asks = [entry[1:] for entry in log if entry[0] == "ask"]
    # partitions 0 and 1 go side by side, then 2 and 3 as they end
    assert asks[:2] == [(0, 0), (1, 0)]
    assert {p for p, n in asks} == set(range(NP)) and len(asks) == 3 * NP
    started = [p for p, n in asks if n == 0]
    assert started == [0, 1, 2, 3]
    for partition in range(NP):
        writes = [oids for entry in log if entry[0] == "write" and entry[1] == partition
                  for oids in [entry[2]]]
        assert [oid % NP for oids in writes for oid in oids] == [partition] * 6
        durable = [entry for entry in log if entry[:2] == ("point", partition) and entry[2]]
        assert len(durable) == 1
    # each partition's log line counts its own objects, not its neighbour's
    done = [r.getMessage() for r in caplog.records if "replicated from" in r.getMessage()]
    assert len(done) == NP
    assert all("(6 objects in" in line and "3 messages)" in line for line in done), done


def test_a_failed_partition_stops_the_other_and_is_retried_as_one_error():
    log: list = []
    with pytest.raises(ConnectionError, match="source lost"):
        _step(log, fail=1)
    # partition 0 was stopped with it, before its end: no durable point
    assert not [entry for entry in log if entry[0] == "point" and entry[2]]


def test_a_stop_reaches_both_partitions_at_once():
    """The master is lost (``stop``) in the loop turn that brings a
    partition's last answer: neither partition writes anything more, nor
    goes on to another one (whose target ``stop`` forgot)."""
    log: list = []
    app = MultiApp(Partitions(log), state=CellStates.OUT_OF_DATE.value)

    async def main():
        rep = Replicator(app)

        def stop():
            log.append(("stop",))
            rep.stop()
        app.source = SlowSource(rep, log, 3, then=stop)
        for partition in range(NP):
            rep.targets[partition] = 100
            rep.unfinished[partition] = set()
        rep._task = asyncio.ensure_future(rep._step())
        with pytest.raises(asyncio.CancelledError):
            await rep._task
        assert not rep._workers and rep._chunks == {}
    asyncio.run(main())
    after = log[log.index(("stop",)) + 1:]
    assert after == [], after
