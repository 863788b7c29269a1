"""Following the primary master: the connect / identify / wait-for-loss
loop that storage and admin nodes run (in their asyncio loop)."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from neozodb.net.connection import Connection, ConnectionClosed, Handler, RemoteError, connect

log = logging.getLogger("neozodb.net")


async def follow_master(app: Any, masters: list[tuple[str, int]],
                        make_handler: Callable[[], Handler],
                        identify: Callable[[Connection], Awaitable[None]],
                        lost: Callable[[], None]) -> None:
    """Forever: connect to a master, ``identify`` on the new connection,
    wait until it closes, call ``lost``; retry the masters in turn, with a
    backoff of up to one second when none could be reached."""
    delay = 0.1
    while True:
        for address in masters:
            try:
                conn = await connect(app, make_handler(), address)
            except OSError as e:
                log.debug("%s: cannot reach master %s:%s: %s", app.label, *address, e)
                continue
            try:
                await identify(conn)
            except (ConnectionClosed, RemoteError) as e:
                log.warning("%s: master %s:%s refused us: %s", app.label, *address, e)
                conn.close()
                continue
            delay = 0.1
            await conn.closed_future
            lost()
            break
        await asyncio.sleep(delay)  # reconnection backoff, not synchronisation
        delay = min(delay * 2, 1.0)
