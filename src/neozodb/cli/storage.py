"""neostorage: run a storage node."""
from __future__ import annotations

import sys

from neozodb.cli.config import parse_options
from neozodb.cli.run import run_node


def main(argv: list[str] | None = None) -> int:
    options = parse_options("storage", argv, prog="neostorage")
    from neozodb.storage.app import StorageApp
    from neozodb.storage.backends import open_backend

    try:
        backend = open_backend(options.adapter, options.database, reset=options.reset)
    except Exception as e:  # unusable database: say what and where, no traceback
        print("neostorage: error: cannot open %s database %s: %s" % (
            options.adapter, options.database, e), file=sys.stderr)
        return 2
    if options.reset:
        backend.close()
        return 0
    name = backend.get_name()
    if name is not None and name != options.cluster:
        print("neostorage: error: database %s belongs to cluster %r, not %r" % (
            options.database, name, options.cluster), file=sys.stderr)
        return 2
    if options.nid is not None and backend.get_nid() is None:
        backend.set_nid(options.nid)
    return run_node(options, lambda: StorageApp(options.cluster, options.masters, backend,
                                                options.bind))


if __name__ == "__main__":
    sys.exit(main())
