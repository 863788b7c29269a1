"""A conflict names the transaction holding the object's lock on a storage,
which may be locked there and not yet completed by the master: until it
is, another replica may lack that revision, and the conflict resolution's
``loadSerial`` failed (a ConflictError out of a commit that Length's
resolution should have saved: test_deadlock.py's contention test, 2-3
runs in 80 under load).  ``ClientApp.catch_up`` puts barriers with the
master until the client knows that transaction committed."""
from __future__ import annotations

import pytest

from neozodb.client.app import ClientApp
from neozodb.protocol import p64

pytestmark = pytest.mark.timeout(30)


class Master:
    """Completes the transaction at its ``after``-th barrier."""

    def __init__(self, app, tid: int, after: int) -> None:
        self.app, self.tid, self.after = app, tid, after
        self.barriers = 0

    def sync(self) -> None:
        self.barriers += 1
        if self.barriers >= self.after:
            self.app.last_tid = p64(self.tid)


class App:
    catch_up = ClientApp.catch_up

    def __init__(self, last: int, tid: int, after: int) -> None:
        self.last_tid = p64(last)
        self.master = Master(self, tid, after)
        self.sync = self.master.sync


@pytest.mark.parametrize("after", [1, 2, 5])
def test_barriers_until_the_transaction_is_known(after):
    app = App(10, 20, after)
    assert app.catch_up(p64(20))
    assert app.master.barriers == after and app.last_tid == p64(20)


def test_none_for_a_transaction_already_known():
    app = App(20, 20, 1)
    assert app.catch_up(p64(15))
    assert app.master.barriers == 0


def test_bounded_when_it_never_completes():
    app = App(10, 20, 1 << 30)
    assert not app.catch_up(p64(20), timeout=0.05)
    assert app.master.barriers >= 1 and app.last_tid == p64(10)
