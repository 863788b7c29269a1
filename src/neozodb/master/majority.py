"""Who may act as primary: a majority of the masters, and a quiet time
after a primary lost to silence (rules in master/election.py's docstring).

With N masters in the ``-m`` list (this one included), a primary needs
``majority(N)`` of them in touch: itself and the secondaries connected to
it.  ``may_lead``: it has them, and its quiet time is over; only then does
it accept storages, admins and clients, and leave RECOVERING.  A primary
that loses them steps down (``step_down``)."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from neozodb.protocol import ClusterStates, NodeTypes

if TYPE_CHECKING:
    from neozodb.master.app import MasterApp
    from neozodb.net.connection import Connection

log = logging.getLogger("neozodb.master")

# Added to the quiet time: timers and scheduling on both sides.
QUIET_MARGIN = 1.0


def majority(count: int) -> int:
    """Masters a primary needs in touch, out of ``count``: a strict
    majority from 3 masters on; with 1 or 2, itself alone (two masters
    have no majority once one is lost: they work as they did without this
    rule, the storages being the only guard against two running halves)."""
    return count // 2 + 1 if count >= 3 else 1


def in_touch(app: MasterApp) -> int:
    """This master and its connected secondaries."""
    return 1 + sum(1 for n in app.nm.of_type(NodeTypes.MASTER) if n.connected)


def has_majority(app: MasterApp) -> bool:
    return in_touch(app) >= majority(len(app.masters))


def may_lead(app: MasterApp) -> bool:
    """Whether this master, playing primary, may serve: accept storages,
    admins and clients, and leave RECOVERING."""
    return has_majority(app) and time.monotonic() >= app.quiet_until


def lost_primary(app: MasterApp, conn: Connection) -> None:
    """The connection to our primary is gone.  If it went silent (the
    keep-alive closed it) the primary may still be running, with us
    counted among its secondaries, until its own keep-alive gives up on
    us: at most 1.5 keep-alive after we last heard from it (it pings us
    after half a keep-alive of silence, so it last heard from us at most
    that long before we last heard from it).  Until then we neither lead
    nor follow anybody."""
    if conn.went_silent and majority(len(app.masters)) > 1:
        until = conn.last_received + 1.5 * conn.keepalive + QUIET_MARGIN
        app.quiet_until = max(app.quiet_until, until)
        log.info("%s: the primary went silent: quiet for %.1f s (it may not have stepped"
                 " down yet)", app.label, until - time.monotonic())


async def quiet(app: MasterApp) -> None:
    """Wait for the end of the quiet time, if any."""
    delay = app.quiet_until - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


def step_down(app: MasterApp) -> None:
    """A primary lost the majority of the masters: a new primary may be
    elected without it.  It stops serving now: every storage, admin and
    client connection is closed (they are refused until it may lead
    again, and go to the other masters), a running cluster goes back to
    RECOVERING, where the election runs again."""
    if app.stopping:
        return
    log.warning("%s: in touch with %d of %d masters, not a majority: no longer primary"
                " (electing again)", app.label, in_touch(app), len(app.masters))
    serving = app.cluster_state in (ClusterStates.VERIFYING, ClusterStates.RUNNING)
    if serving:
        app.stop_operation()
        # before the connections go: lost storages must not be outdated
        app.set_cluster_state(ClusterStates.RECOVERING)
    for node in list(app.nm):
        if node.connected and node.type is not NodeTypes.MASTER:
            node.conn.close("not primary: lost the majority of the masters")
    app.drop_held_clients("not primary: lost the majority of the masters")
    if serving:
        app.stop_serving("lost the majority of the masters")
    app.changed()
