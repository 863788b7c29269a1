"""neoadmin: run an admin node."""
from __future__ import annotations

import sys

from neozodb.cli.config import parse_options
from neozodb.cli.run import run_node


def main(argv: list[str] | None = None) -> int:
    options = parse_options("admin", argv, prog="neoadmin")
    from neozodb.admin.app import AdminApp
    return run_node(options, lambda: AdminApp(options.cluster, options.masters, options.bind,
                                                    options.allow_anonymous_ctl))


if __name__ == "__main__":
    sys.exit(main())
