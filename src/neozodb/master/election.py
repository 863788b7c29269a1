"""Electing the primary among several masters (neo-architecture.md 5.1).

A master plays primary from its start, and again when it loses its
primary.  While its cluster is RECOVERING it asks every other master to
identify it, giving the time it started playing primary.  A master that
plays primary and is asked by one that started earlier (ties: the lower
address) yields to it; one that accepts the request is the primary, and the
requester becomes its secondary.  Secondaries answer with
``NotPrimaryMaster``.  The cluster leaves RECOVERING only once every other
master answered, refused or could not be reached: two primaries never
both get past recovery, and running needs every storage with readable
cells (or an operator's ``neoctl start``), so the halves of a split network
never both run the cluster.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from neozodb.master.secondary import PrimaryHandler
from neozodb.net.connection import connect
from neozodb.protocol import NodeTypes, Packets
from neozodb.protocol.features import ANNOUNCEMENT

if TYPE_CHECKING:
    from neozodb.master.app import MasterApp

log = logging.getLogger("neozodb.master")

CONNECT_TIMEOUT = 2.0  # an unreachable master does not hold the election longer
ANSWER_TIMEOUT = 3.0  # nor does one that accepts connections but is stuck


def earlier(peer: tuple[float, tuple[str, int]], me: tuple[float, tuple[str, int]]) -> bool:
    """Whether the peer's claim (election time, address) beats ours."""
    return peer < me


async def run(app: MasterApp) -> None:
    """Ask every other master once; ``app.election_pending`` empties as
    they answer.  Acceptance makes ``app`` yield (``app.yield_to``)."""
    others = [a for a in app.masters if a != app.address]
    app.election_pending = set(others)
    await asyncio.gather(*(_ask(app, address) for address in others))


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
