"""The loop of a storage's background task (replication, pack): steps while
there is work, waits to be woken otherwise, retries with a backoff after a
peer or the master failed it, and stops the node on a bug."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from neozodb.net.connection import ConnectionClosed, RemoteError
from neozodb.protocol import ProtocolError

log = logging.getLogger("neozodb.storage")

TRANSIENT = (ConnectionClosed, RemoteError, ProtocolError, OSError)


async def run_steps(app: Any, what: str, wake: asyncio.Event,
                    step: Callable[[], Awaitable[bool]],
                    transient: tuple[type[BaseException], ...] = TRANSIENT) -> None:
    """Forever: ``step()``; again at once if it returns True, else after
    ``wake`` is set.  ``transient`` errors are retried after 0.1 s up to
    2 s; any other error is a bug: logged, and the node exits with 1."""
    backoff = 0.1
    while True:
        wake.clear()
        try:
            progressed = await step()
            backoff = 0.1
            if not progressed:
                await wake.wait()
        except asyncio.CancelledError:
            raise
        except transient as e:
            log.warning("%s: %s interrupted: %s", app.label, what, e)
            await asyncio.sleep(backoff)  # retry backoff, not synchronisation
            backoff = min(backoff * 2, 2.0)
        except Exception as e:
            fatal = getattr(app, "fatal_error", None)
            if fatal is None or not fatal(e, what):
                log.exception("%s: %s failed", app.label, what)
                app.exit(1)
            return
