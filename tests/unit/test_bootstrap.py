"""Following a secondary master's NotPrimaryMaster redirection."""
from __future__ import annotations

import pytest

from neozodb.master.election import earlier
from neozodb.net.bootstrap import FollowsPrimary, next_masters

pytestmark = pytest.mark.timeout(10)


class FakeConn:
    closed_with = None

    def close(self, reason=""):
        self.closed_with = reason


def test_redirect_names_the_primary_and_teaches_masters():
    conn = FakeConn()
    FollowsPrimary().NotPrimaryMaster(conn, 0, 1, [(b"10.0.0.1", 1), (b"10.0.0.3", 3)])
    assert conn.closed_with == "not the primary master"
    masters = [("10.0.0.1", 1), ("10.0.0.2", 2)]
    assert next_masters(masters, conn) == [("10.0.0.3", 3)]
    assert masters == [("10.0.0.1", 1), ("10.0.0.2", 2), ("10.0.0.3", 3)]


def test_no_primary_known_or_bad_index():
    for primary in (None, 5, -1):
        conn = FakeConn()
        FollowsPrimary().NotPrimaryMaster(conn, 0, primary, [(b"h", 1)])
        assert next_masters([("h", 1)], conn) == []


def test_refusal_without_redirect():
    assert next_masters([("h", 1)], FakeConn()) == []


def test_earlier_claim_wins_ties_by_address():
    assert earlier((1.0, ("b", 2)), (2.0, ("a", 1)))
    assert not earlier((2.0, ("a", 1)), (1.0, ("b", 2)))
    assert earlier((1.0, ("a", 1)), (1.0, ("a", 2)))
    assert not earlier((1.0, ("a", 2)), (1.0, ("a", 2)))
