"""Following the primary master: the connect / identify / wait-for-loss
loop that storage and admin nodes run (in their asyncio loop), and the
redirection a secondary master answers with (``NotPrimaryMaster``), which
the client's threaded connection uses too."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from neozodb.net.connection import Connection, ConnectionClosed, Handler, RemoteError, connect
from neozodb.protocol import ProtocolError
from neozodb.protocol.values import check_address

log = logging.getLogger("neozodb.net")

# Seconds to connect to a master (TLS handshake included) before trying
# the next: a master cut off from the network would hold us for minutes.
CONNECT_TIMEOUT = 3.0


class FollowsPrimary:
    """Mixin of the handlers of a connection to a master: a secondary
    master answers identification with ``NotPrimaryMaster`` then closes;
    ``conn.redirect`` is then the primary it named (None if it knows none)
    and ``conn.known_masters`` the masters it knows."""

    def NotPrimaryMaster(self, conn: Any, msg_id: int, primary: int | None, known: list) -> None:
        masters = []
        for address in known:
            try:
                masters.append(check_address(address))
            except ProtocolError:
                masters.append(None)  # keeps the index of the primary right
        conn.known_masters = [a for a in masters if a is not None]
        conn.redirect = masters[primary] if primary is not None and 0 <= primary < len(masters) \
            else None
        conn.close("not the primary master")


def next_masters(masters: list[tuple[str, int]], conn: Any) -> list[tuple[str, int]]:
    """After a refused identification: the addresses to try first, the
    primary that ``conn``'s peer named, then the other masters it knows.

    Only a configured master (one of ``masters``, the -m list) is listened
    to: a redirection from anybody else, an address a configured master
    named included, is ignored, so nobody can make a node follow a chain of
    redirections to an address of their choosing.  What is learnt is tried
    this time only; ``masters`` is left as configured."""
    peer = getattr(conn, "address", None) or _address_of(getattr(conn, "peer", ""))
    if peer not in masters:
        if getattr(conn, "redirect", None) is not None:
            log.warning("redirection from %s:%s to %s:%s ignored: not a configured master",
                        *(peer or ("?", "?")), *conn.redirect)
        return []
    redirect = getattr(conn, "redirect", None)
    first = [] if redirect is None else [redirect]
    return first + [a for a in getattr(conn, "known_masters", ()) if a != redirect]


def reorder(order: list, unreachable) -> None:
    """Move a master that could not be reached to the end of ``order``."""
    if unreachable in order:
        order.remove(unreachable)
        order.append(unreachable)


def _address_of(peer: str) -> tuple[str, int] | None:
    host, _, port = peer.rpartition(":")
    return (host, int(port)) if port.isdigit() else None


async def follow_master(app: Any, masters: list[tuple[str, int]],
                        make_handler: Callable[[], Handler],
                        identify: Callable[[Connection], Awaitable[None]],
                        lost: Callable[[], None]) -> None:
    """Forever: connect to a master, ``identify`` on the new connection,
    wait until it closes, call ``lost``; retry the masters in turn (first
    the primary a secondary named), with a backoff of up to one second when
    none could be reached.  A master that cannot be reached within
    CONNECT_TIMEOUT goes to the end of the order (``reorder``): a dead
    master first in the list costs one timeout, not one per attempt."""
    delay = 0.1
    order = list(masters)
    while True:
        queue = list(order)
        tried: set[tuple[str, int]] = set()
        while queue:
            address = queue.pop(0)
            if address in tried:
                continue
            tried.add(address)
            try:
                conn = await asyncio.wait_for(connect(app, make_handler(), address),
                                              CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError) as e:
                log.debug("%s: cannot reach master %s:%s: %s", app.label, *address, e)
                reorder(order, address)
                continue
            try:
                await identify(conn)
            except (ConnectionClosed, RemoteError) as e:
                redirect = [a for a in next_masters(masters, conn) if a not in tried]
                if redirect:
                    log.info("%s: %s:%s is not the primary master, trying %s:%s",
                             app.label, *address, *redirect[0])
                else:
                    log.warning("%s: master %s:%s refused us: %s", app.label, *address, e)
                conn.close()
                queue[:0] = redirect
                continue
            delay = 0.1
            # shielded: cancelling this task (the node stops) must not
            # cancel the connection's own future, which the node waits on
            # to handle what the master still sends before it closes
            await asyncio.shield(conn.closed_future)
            lost()
            break
        else:
            await asyncio.sleep(delay)  # reconnection backoff, not synchronisation
            delay = min(delay * 2, 1.0)
