"""The client's pool of new OIDs (client/oids.py): the next batch is asked
when half of the current one is used, and read only when the pool runs
out; clients that use batches quickly get bigger ones."""
from __future__ import annotations

from queue import SimpleQueue

import pytest

from neozodb.client import oids as pool_module
from neozodb.client.oids import FIRST, MOST, OidPool
from neozodb.net.endpoint import ConnectionClosed
from neozodb.protocol import Packets, p64

pytestmark = pytest.mark.timeout(30)


class Master:
    """Gives OIDs from ``start`` on; records what was asked, and how."""

    def __init__(self, start: int = 1, fail_asks: bool = False) -> None:
        self.next = start
        self.log: list[tuple[str, int]] = []
        self.fail_asks = fail_asks

    def _give(self, count: int) -> list[bytes]:
        oids = [p64(n) for n in range(self.next, self.next + count)]
        self.next += count
        return oids

    def ask(self, packet, count):
        assert packet is Packets.AskNewOIDs
        self.log.append(("ask", count))
        queue = SimpleQueue()
        if self.fail_asks:
            queue.put((None, None, ConnectionClosed("lost"), self))
        else:
            queue.put((None, (self._give(count),), None, self))
        return queue

    def wait(self, queue, timeout=None):
        self.log.append(("wait", 0))
        return queue.get_nowait()

    def call(self, packet, count, timeout=None):
        assert packet is Packets.AskNewOIDs
        self.log.append(("call", count))
        return (self._give(count),)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def take(pool, master, n):
    return [pool.take(master, lambda: master) for _ in range(n)]


def test_the_next_batch_is_asked_at_half_and_read_when_needed():
    clock, master = Clock(), Master()
    pool = OidPool(clock)
    got = take(pool, master, FIRST // 2)
    assert master.log == [("call", FIRST)]  # the first one waits
    got += take(pool, master, 1)
    assert master.log == [("call", FIRST), ("ask", FIRST)]  # asked, not waited for
    got += take(pool, master, FIRST // 2 - 1)  # the first batch, to its end
    assert len(master.log) == 2
    clock.now += 10  # slowly: batches keep their size
    got += take(pool, master, 1)
    assert master.log[2:] == [("wait", 0)]  # the answer, there since long
    got += take(pool, master, FIRST // 2)
    assert master.log[3:] == [("ask", FIRST)]
    assert len(got) == FIRST + FIRST // 2 + 1 and pool.requests == 3
    assert got == [p64(n) for n in range(1, len(got) + 1)]  # in order, none twice


def test_quick_refills_get_bigger_batches_up_to_most():
    clock, master = Clock(), Master()
    pool = OidPool(clock)
    got = take(pool, master, 20 * MOST)
    sizes = [count for kind, count in master.log if kind != "wait"]
    assert sizes[:4] == [FIRST, FIRST, 2 * FIRST, 4 * FIRST]
    assert max(sizes) == MOST and sizes[-1] == MOST
    assert len(sizes) < 40  # at 100 a batch: 200 requests
    assert got == [p64(n) for n in range(1, 20 * MOST + 1)]


def test_a_failed_request_ahead_is_made_again_and_waited_for():
    master = Master(fail_asks=True)
    pool = OidPool(Clock())
    got = take(pool, master, FIRST + 1)
    assert master.log == [("call", FIRST), ("ask", FIRST), ("wait", 0), ("call", 2 * FIRST)]
    assert got == [p64(n) for n in range(1, FIRST + 2)]


def test_a_new_master_starts_a_new_pool():
    old, new = Master(1), Master(1000)
    pool = OidPool(Clock())
    assert take(pool, old, 3) == [p64(1), p64(2), p64(3)]
    # the old master's OIDs, and its answer under way, are not used
    assert take(pool, new, 2) == [p64(1000), p64(1001)]
    assert new.log == [("call", FIRST)]


def test_no_answer_in_time_falls_back_to_a_call(monkeypatch):
    class Silent(Master):
        def wait(self, queue, timeout=None):
            from queue import Empty
            self.log.append(("wait", 0))
            raise Empty
    monkeypatch.setattr(pool_module, "TIMEOUT", 0.01)
    master = Silent()
    pool = OidPool(Clock())
    got = take(pool, master, FIRST + 1)
    assert ("call", 2 * FIRST) in master.log
    assert len(set(got)) == FIRST + 1
