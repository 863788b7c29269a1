"""Electing the primary among several masters (neo-architecture.md 5.1),
and what keeps a split network from having two primaries.

A master plays primary from its start, and again when it loses its
primary.  While its cluster is RECOVERING it asks every other master to
identify it, giving the time it started playing primary, then asks again
every ELECTION_INTERVAL those that are not its secondaries, until the
cluster leaves RECOVERING.  A master that plays primary and is asked by one
that started earlier (ties: the lower address) yields to it; one that
accepts the request (a running primary accepts every master) is the
primary, and the requester becomes its secondary.  Secondaries answer with
``NotPrimaryMaster``.  So a primary cut off, or stuck in RECOVERING, finds
the running primary once the network heals and becomes its secondary.

Majority (master/majority.py): with N masters in the ``-m`` list (itself
included), N >= 3, a primary needs a majority of them in touch (itself and
its connected secondaries); with 1 or 2 masters, itself alone.  Without
it, it accepts no storage, admin or client (``NotPrimaryMaster`` naming no
primary) and does not leave RECOVERING; a primary that loses it (the
keep-alive closed the connections of its secondaries) steps down: its
storages, admin and clients are disconnected and go to the other masters,
a running cluster goes back to RECOVERING, and it elects again.  A
secondary that lost its primary to silence waits 1.5 keep-alive after it
last heard from it (plus a margin) before it leads or follows anybody:
by then the old primary found it gone and stepped down if that left it
without a majority.  Two majorities share a master, which follows one
primary at a time: two primaries never both serve.  This assumes every
master has the same keep-alive.

The cluster leaves RECOVERING only once every other master answered,
refused or could not be reached (CONNECT_TIMEOUT, ANSWER_TIMEOUT), and,
from 3 masters on, with a majority; running also needs every storage with
readable cells (or an operator's ``neoctl start``): with two masters, that
is what keeps the halves of a split network from both running the cluster.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from neozodb.master import majority
from neozodb.master.secondary import PrimaryHandler
from neozodb.net.connection import connect
from neozodb.protocol import NodeTypes, Packets
from neozodb.protocol.features import ANNOUNCEMENT

if TYPE_CHECKING:
    from neozodb.master.app import MasterApp

log = logging.getLogger("neozodb.master")

CONNECT_TIMEOUT = 2.0  # an unreachable master does not hold the election longer
ANSWER_TIMEOUT = 3.0  # nor does one that accepts connections but is stuck
ELECTION_INTERVAL = 1.0  # between two rounds while RECOVERING


def earlier(peer: tuple[float, tuple[str, int]], me: tuple[float, tuple[str, int]]) -> bool:
    """Whether the peer's claim (election time, address) beats ours."""
    return peer < me


async def run(app: MasterApp) -> None:
    """Ask every other master, after the quiet time if any;
    ``app.election_pending`` empties as they answer.  Then again every
    ELECTION_INTERVAL, those not connected as our secondaries, until
    cancelled (the cluster left RECOVERING).  Acceptance makes ``app``
    yield (``app.yield_to``)."""
    others = [a for a in app.masters if a != app.address]
    app.election_pending = set(others)
    await majority.quiet(app)
    while True:
        secondaries = {n.address for n in app.nm.of_type(NodeTypes.MASTER) if n.connected}
        await asyncio.gather(*(_ask(app, address) for address in others
                               if address not in secondaries or address in app.election_pending))
        await asyncio.sleep(ELECTION_INTERVAL)  # pace of the rounds, not synchronisation


async def _ask(app: MasterApp, address: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    conn = None
    try:
        conn = await asyncio.wait_for(connect(app, PrimaryHandler(app), address), CONNECT_TIMEOUT)
        answered = loop.create_future()

        def answer(c, result, error):
            # decided here, in the same read as the answer: the primary's
            # state messages that follow it reach the secondary's handler
            if error is None:
                node_type, peer_nid, my_nid = result
                if node_type is NodeTypes.MASTER:
                    c.nid = peer_nid
                    app.yield_to(address, c, my_nid)
            else:
                log.debug("%s: election: %s:%s: %s", app.label, *address, error)
            if not answered.done():
                answered.set_result(None)

        addr = (app.address[0].encode(), app.address[1])
        conn.ask(Packets.RequestIdentification, NodeTypes.MASTER, app.nid, addr, app.name_bytes,
                 app.election_time, ANNOUNCEMENT, callback=answer)
        await asyncio.wait_for(answered, ANSWER_TIMEOUT)
    except (OSError, asyncio.TimeoutError) as e:
        log.debug("%s: election: cannot reach %s:%s: %s", app.label, *address, e)
    finally:
        if conn is not None and conn is not app.primary_conn:
            conn.close("election over")
        app.election_pending.discard(address)
        app.changed()
