"""neomaster: run a master node."""
from __future__ import annotations

import sys

from neozodb.cli.config import parse_options
from neozodb.cli.run import run_node


def main(argv: list[str] | None = None) -> int:
    options = parse_options("master", argv, prog="neomaster")
    from neozodb.master.app import MasterApp

    def make():
        # -m lists the other masters (this one may be listed too): they
        # elect one primary, the others follow it as secondaries
        return MasterApp(options.cluster, options.bind, partitions=options.partitions,
                         replicas=options.replicas, autostart=options.autostart,
                         masters=options.masters, nid=options.nid,
                         read_only=options.read_only)
    return run_node(options, make)


if __name__ == "__main__":
    sys.exit(main())
