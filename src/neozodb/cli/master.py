"""neomaster: run a master node."""
from __future__ import annotations

import logging
import sys

from neozodb.cli.config import parse_options
from neozodb.cli.run import run_node


def main(argv: list[str] | None = None) -> int:
    options = parse_options("master", argv, prog="neomaster")
    from neozodb.master.app import MasterApp

    def make():
        app = MasterApp(options.cluster, options.bind, partitions=options.partitions,
                        replicas=options.replicas, autostart=options.autostart,
                        masters=options.masters)
        if options.nid is not None:
            app.nid = options.nid
        others = [m for m in options.masters if m != options.bind]
        if others:
            logging.getLogger("neozodb.master").warning(
                "%s: this version runs a single master; ignoring the other masters %s",
                app.label, " ".join("%s:%s" % m for m in others))
        return app
    return run_node(options, make)


if __name__ == "__main__":
    sys.exit(main())
