"""Long-running tasks of the server nodes (master cycle, replication...):
one that dies with an exception stops its node with a log line, instead of
leaving a process that looks alive and does nothing."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("neozodb.net")


def watch(app: Any, task: asyncio.Future, what: str, stop: Callable[[], None]) -> asyncio.Future:
    """Call ``stop()`` (after logging why) if ``task`` ends with an
    exception; cancellation and a normal end are the owner's business."""
    def done(t: asyncio.Future) -> None:
        if t.cancelled():
            return
        exc = t.exception()
        if exc is not None:
            log.error("%s: %s died (%s: %s): stopping the node", app.label, what,
                      type(exc).__name__, exc, exc_info=exc)
            stop()
    task.add_done_callback(done)
    return task
