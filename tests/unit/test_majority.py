"""master/majority.py: how many masters a primary needs, the quiet time
after a primary lost to silence."""
from __future__ import annotations

import time
from types import SimpleNamespace

from neozodb.master import majority
from neozodb.nodes import Node, NodeManager
from neozodb.protocol import NodeTypes, make_nid


def app_with(masters: int, connected: int, quiet_until: float = 0.0):
    nm = NodeManager()
    for i in range(2, masters + 1):
        node = nm.add(Node(NodeTypes.MASTER, make_nid(NodeTypes.MASTER, i)))
        node.conn = SimpleNamespace(closed=False) if i - 2 < connected else None
    return SimpleNamespace(masters=[("m%d" % i, 1) for i in range(1, masters + 1)], nm=nm,
                           quiet_until=quiet_until, label="M1")


def test_majority_of_the_list():
    assert [majority.majority(n) for n in range(6)] == [1, 1, 1, 2, 3, 3]


def test_a_primary_needs_a_majority_from_three_masters_on():
    assert majority.may_lead(app_with(1, 0))
    assert majority.may_lead(app_with(2, 0))  # two masters: alone, as NEO's
    assert not majority.may_lead(app_with(3, 0))
    assert majority.may_lead(app_with(3, 1))
    assert not majority.may_lead(app_with(5, 1))
    assert majority.may_lead(app_with(5, 2))
    assert not majority.may_lead(app_with(3, 2, quiet_until=time.monotonic() + 60))


def test_quiet_time_only_after_a_silent_primary():
    now = time.monotonic()
    silent = SimpleNamespace(went_silent=True, last_received=now - 6, keepalive=6)
    app = app_with(3, 0)
    majority.lost_primary(app, silent)
    assert app.quiet_until == now - 6 + 9 + majority.QUIET_MARGIN
    closed = SimpleNamespace(went_silent=False, last_received=now, keepalive=6)
    app = app_with(3, 0)
    majority.lost_primary(app, closed)  # it died or closed: nobody to wait for
    assert app.quiet_until == 0.0
    app = app_with(2, 0)
    majority.lost_primary(app, silent)  # no majority rule with two masters
    assert app.quiet_until == 0.0
