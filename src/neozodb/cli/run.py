"""Running a server node: logging, event loop, signals."""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable

from neozodb.cli.logs import setup_logging
from neozodb.net.connection import set_identify_timeout, set_keepalive, set_max_accepted


def run_node(options, make_app: Callable, on_signal: Callable | None = None) -> int:
    """Build the app inside a fresh event loop and run it until it exits.

    SIGTERM and SIGINT call ``on_signal(app)`` (default: ``app.exit()``) so
    that the node stops cleanly instead of dying mid-write.
    ``options.keepalive``, when given, becomes the keep-alive of every
    connection of the node."""
    setup_logging(None, options.logfile, options.loglevel)
    if getattr(options, "keepalive", None) is not None:
        set_keepalive(options.keepalive)
    if getattr(options, "identify_timeout", None) is not None:
        set_identify_timeout(options.identify_timeout)
    if getattr(options, "max_connections", None) is not None:
        set_max_accepted(options.max_connections)
    loop_name = _event_loop_policy(getattr(options, "event_loop", "auto"))

    async def main() -> int:
        app = make_app()
        logging.getLogger("neozodb").info("%s: event loop %s", app.label, loop_name)
        app.tls = getattr(options, "tls", None)
        loop = asyncio.get_running_loop()
        if app.tls is not None:
            app.tls.warn_if_exposed(app.label)
            # certificate rotation: new connections use the new files
            loop.add_signal_handler(signal.SIGHUP, lambda: app.tls.reload(app.label))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _handler(app, on_signal))
        if hasattr(app, "dump_state"):
            loop.add_signal_handler(signal.SIGUSR1, app.dump_state)
        result = await app.run()
        return result or 0

    try:
        return asyncio.run(main())
    except OSError as e:
        print("neo%s: error: %s" % (options.node, e), file=sys.stderr)
        return 1


def _event_loop_policy(name: str) -> str:
    """Install the event loop ``name`` (auto: uvloop if installed) and
    return the one installed.  uvloop (the extra 'fast') costs half of
    asyncio's time per message: bench/README.md, "Event loop"."""
    if name in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if name == "uvloop":  # checked with the options: uninstalled since
                raise
        else:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
            return "uvloop"
    asyncio.set_event_loop_policy(None)
    return "asyncio"


def _handler(app, on_signal):
    def handle():
        if on_signal is not None:
            on_signal(app)
        else:
            app.exit()
    return handle
