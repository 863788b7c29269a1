"""When loads read ahead (``Loads._ahead``): after READ_AHEAD_AFTER misses
on consecutive oids, and then at each miss that continues the run past what
was read ahead."""
from __future__ import annotations

from neozodb.client.loads import READ_AHEAD_AFTER, Loads
from neozodb.protocol import p64, u64


def _misses(loads: Loads, *oids: int) -> list[list[int]]:
    return [[u64(o) for o in loads._ahead(p64(oid))] for oid in oids]


def test_a_run_of_misses_reads_ahead_then_goes_on_after_it():
    loads = Loads()
    loads.read_ahead = 4
    assert READ_AHEAD_AFTER == 3
    assert _misses(loads, 10, 11, 12) == [[], [], [12, 13, 14, 15, 16]]
    # 13 to 16 are cached: the next miss of the run is 17
    assert _misses(loads, 17) == [[17, 18, 19, 20, 21]]


def test_other_misses_break_the_run():
    loads = Loads()
    loads.read_ahead = 4
    assert _misses(loads, 10, 11, 50, 51, 12, 13) == [[]] * 6
    assert _misses(loads, 14) == [[14, 15, 16, 17, 18]]


def test_read_ahead_0_never_reads_ahead():
    loads = Loads()
    loads.read_ahead = 0
    assert _misses(loads, *range(10)) == [[]] * 10


def test_the_greatest_oids_read_ahead_no_further():
    loads = Loads()
    loads.read_ahead = 4
    top = (1 << 64) - 1
    assert _misses(loads, top - 3, top - 2, top - 1) == [[], [], [top - 1, top]]
