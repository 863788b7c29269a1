"""neostorage: run a storage node."""
from __future__ import annotations

import re
import sys
import time

from neozodb.cli.config import parse_options
from neozodb.cli.run import run_node


def _shown(database: str) -> str:
    """``database`` for messages, a password in it replaced by ***
    (``user:password@...``, ``scheme://user:password@...``)."""
    return re.sub(r"^((?:\w+://)?[^:@/]+):.*@", r"\1:***@", database)


def _backend_options(options) -> dict[str, object]:
    """Adapter options given on the command line (a backend refuses those it
    does not take)."""
    given = {"engine": options.engine, "dedup": options.dedup or None}
    return {k: v for k, v in given.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    options = parse_options("storage", argv, prog="neostorage")
    from neozodb.storage.app import StorageApp
    from neozodb.storage.backends import open_backend

    # -w: the database may not be there yet (a server starting, a volume
    # being mounted): retry opening it for that long (-1: forever)
    deadline = None if options.wait < 0 else time.monotonic() + options.wait
    delay = 0.1
    while True:
        try:
            backend = open_backend(options.adapter, options.database, reset=options.reset,
                                   **_backend_options(options))
            break
        except Exception as e:  # unusable database: say what and where, no traceback
            if deadline is not None and time.monotonic() + delay > deadline:
                print("neostorage: error: cannot open %s database %s: %s" % (
                    options.adapter, _shown(options.database), e), file=sys.stderr)
                return 2
            time.sleep(delay)  # retry backoff while waiting for the database
            delay = min(delay * 2, 5.0)
    if options.reset:
        backend.close()
        return 0
    name = backend.get_name()
    if name is not None and name != options.cluster:
        print("neostorage: error: database %s belongs to cluster %r, not %r" % (
            _shown(options.database), name, options.cluster), file=sys.stderr)
        return 2
    if options.nid is not None and backend.get_nid() is None:
        backend.set_nid(options.nid)

    def make():
        app = StorageApp(options.cluster, options.masters, backend, options.bind,
                         options.replication_rate, options.pack_rate)
        # --read-only: storage/handlers.py refuses writes from clients
        app.read_only = options.read_only
        return app
    return run_node(options, make)


if __name__ == "__main__":
    sys.exit(main())
