"""The TTID blocks a client holds (feature begin-ahead, client/begin.py)."""
import threading

import pytest

from neozodb.client.begin import Reserved

pytestmark = pytest.mark.timeout(60)


def test_a_block_serves_only_the_connection_that_got_it():
    r = Reserved()
    old, new = object(), object()
    r.add(old, 100)
    r.add(new, 200)
    assert r.holds(new) and r.holds(old)
    assert r.take(new) == 200
    # a block of another connection (a master since lost) is dropped on the way
    assert r.take(new) is None
    assert not r.holds(old)


def test_blocks_are_forgotten_on_clear_and_beyond_the_limit():
    r = Reserved()
    conn = object()
    for base in range(Reserved.LIMIT + 3):
        r.add(conn, base)
    taken = []
    while (base := r.take(conn)) is not None:
        taken.append(base)
    assert sorted(taken) == list(range(3, Reserved.LIMIT + 3))
    r.add(conn, 7)
    r.clear()
    assert r.take(conn) is None


def test_threads_never_share_a_block():
    r = Reserved()
    conn = object()
    for base in range(Reserved.LIMIT):
        r.add(conn, base)
    got: list[int | None] = []
    start = threading.Barrier(8)

    def take():
        start.wait(10)
        got.append(r.take(conn))
        got.append(r.take(conn))
    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(got) == list(range(Reserved.LIMIT))
