"""Waiting, with a bound, for a future's done callbacks instead of sleeping
a loop turn and hoping they ran."""
from __future__ import annotations

import asyncio


async def callbacks_ran(fut: asyncio.Future, timeout: float = 5.0) -> None:
    """Return once ``fut`` is done and the done callbacks added to it before
    this call have run; raise TimeoutError (failing the test) if it is not
    done within ``timeout`` seconds.

    asyncio schedules a future's done callbacks in the order they were
    added (and one added to a future already done after those), so the
    callback added here runs after them."""
    ran = asyncio.get_running_loop().create_future()

    def mark(_: asyncio.Future) -> None:
        if not ran.done():
            ran.set_result(None)
    fut.add_done_callback(mark)
    await asyncio.wait_for(ran, timeout)
