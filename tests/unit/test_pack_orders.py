"""Pack bookkeeping that needs no cluster: the master's PackManager, the GC
mark in transaction extensions, the wire form of orders, which revisions a
pack deletes."""
from __future__ import annotations

import pickle

import pytest

from neozodb.master.pack import Order, PackManager
from neozodb.protocol import p64
from neozodb.storage.backends.base import revisions_to_delete
from neozodb.storage.pack import is_gc_extension, order_from_wire, wire_order

pytestmark = pytest.mark.timeout(30)


def test_gc_mark_in_extension():
    assert is_gc_extension(pickle.dumps({"neozodb_gc": True}, 3))
    assert not is_gc_extension(pickle.dumps({"neozodb_gc": 1}, 3))
    assert not is_gc_extension(pickle.dumps({"other": True}, 3))
    assert not is_gc_extension(b"")
    assert not is_gc_extension(b"garbage")
    # never unpickles classes from a client
    assert not is_gc_extension(pickle.dumps({"neozodb_gc": True, "x": Order}, 3))


@pytest.mark.parametrize("record", [
    (10, True, False, [3, 4], 8, True),      # GC
    (10, None, True, [3], 8, False),          # partial history
    (10, False, False, None, 8, False),       # full history
])
def test_order_wire_round_trip(record):
    wire = wire_order(record)
    assert order_from_wire(*wire) == record
    order = Order.from_wire(wire)
    assert (order.tid, order.approved, order.partial, order.pack_tid, order.gc) == (
        record[0], record[1], record[2], record[4], record[5])
    assert order.wire() == wire


def test_revisions_to_delete():
    revs = [(10, 1), (20, 2), (30, None), (40, 4)]
    assert revisions_to_delete(7, revs, [(25, False, None, False)]) == [10]
    # the last revision up to pack_tid is a deletion: it goes too
    assert revisions_to_delete(7, revs, [(35, False, None, False)]) == [10, 20, 30]
    assert revisions_to_delete(7, revs, [(5, False, None, False)]) == []
    # GC: everything up to pack_tid, later revisions stay
    assert revisions_to_delete(7, revs, [(35, False, {7}, True)]) == [10, 20, 30]
    assert revisions_to_delete(8, revs, [(25, False, {7}, True)]) == [10]
    # partial: only listed oids
    assert revisions_to_delete(8, revs, [(45, True, {7}, False)]) == []
    assert revisions_to_delete(7, revs, [(45, True, {7}, False)]) == [10, 20, 30]
    # steps in sequence
    assert revisions_to_delete(7, revs, [(15, False, None, False),
                                         (25, False, None, False)]) == [10]
    assert revisions_to_delete(7, revs, [(25, False, None, False),
                                         (45, False, None, False)]) == [10, 20, 30]


def order(tid, pack_tid=1, gc=False, oids=None):
    return Order(tid, pack_tid, True, oids is not None and not gc, oids, gc)


def test_pack_manager_completion_and_waiters():
    pm = PackManager()
    pm.learned(order(100))
    pm.committed(200, [p64(1)], 150)
    woken = []
    assert not pm.done(100, {1, 2})
    assert pm.done(50, {1, 2})          # unknown order: nothing to wait for
    pm.wait(100, lambda: woken.append(100))
    pm.wait(200, lambda: woken.append(200))
    # a storage told about 200 must not report 100 done before it knows 200
    assert [o.tid for o in pm.known()] == [100]
    pm.report(1, 150)
    assert pm.ready_waiters({1, 2}) == [] and woken == []
    pm.report(2, 100)
    for callback in pm.ready_waiters({1, 2}):
        callback()
    assert woken == [100]
    pm.learned(order(200, 150, gc=True, oids=[p64(1)]))
    assert [o.tid for o in pm.known(101)] == [200]
    pm.report(1, 200)
    assert pm.ready_waiters({1, 2}) == []
    pm.forget(2)                          # a storage going down is not waited for
    for callback in pm.ready_waiters({1}):
        callback()
    assert woken == [100, 200]


def test_pack_manager_guess_and_status():
    pm = PackManager()
    pm.committed(300, [p64(5)], 250)
    guessed = pm.guess(300)
    assert (guessed.partial, guessed.gc, guessed.approved) == (True, False, True)
    assert pm.guess(300) is None
    pm.learned(order(400, 350, gc=True, oids=[p64(1), p64(2)]))
    pm.committed(500, None, 450)
    pm.report(7, 400)
    status = pm.status(lambda nid: "S%d" % nid)
    assert status["storages"] == {"S7": 400}
    assert [(o["tid"], o["known"], o["completed"]) for o in status["orders"]] == [
        (300, True, ["S7"]), (400, True, ["S7"]), (500, False, [])]
    assert status["orders"][1]["oids"] == 2 and status["orders"][1]["gc"]
    assert status["orders"][2]["pack_tid"] == 450
    pm.reset()
    assert pm.known() == [] and pm.status(str)["orders"] == []


def test_pack_manager_pages():
    pm = PackManager()
    pm.learned(order(100, gc=True, oids=[p64(1)] * 3))
    pm.learned(order(200, gc=True, oids=[p64(2)] * 3))
    pm.learned(order(300))
    assert [o.tid for o in pm.known(max_oids=2)] == [100]
    assert [o.tid for o in pm.known(max_oids=4)] == [100, 200]
    assert [o.tid for o in pm.known(101, max_oids=4)] == [200, 300]
    assert [o.tid for o in pm.known(301, max_oids=4)] == []


def test_pack_order_oids_as_one_byte_string():
    """NEO's master sends the oids of orders read back from its SQLite
    storages as one byte string: decoded, and read as the same list."""
    from neozodb.protocol import Decoder, Packets, encode
    oids = [p64(1), p64(2), p64(0x1234)]
    entry = (p64(5), True, True, b"".join(oids), p64(4))
    d = Decoder()
    d.feed(encode(7, Packets.AnswerPackOrders.code, ([entry],)))
    ((_, _, (orders,)),) = list(d)
    assert order_from_wire(*orders[0])[3] == [1, 2, 0x1234]
    order = Order.from_wire(orders[0])
    assert (order.oids, order.partial, order.gc) == (oids, True, False)
    # the list form, as ours send it, reads the same
    assert Order.from_wire((p64(5), True, True, oids, p64(4))).oids == oids
    # a byte string that is not whole oids is refused
    bad = Decoder()
    bad.feed(encode(7, Packets.AnswerPackOrders.code,
                    ([(p64(5), True, True, b"\0" * 9, p64(4))],)))
    with pytest.raises(Exception, match="AnswerPackOrders"):
        list(bad)
