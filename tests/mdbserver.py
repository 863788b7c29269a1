"""A throw-away MariaDB server for the tests (``neozodb.throwaway.mariadb``),
stopped and removed whatever happened."""

from __future__ import annotations


def server_fixture(tmp_path_factory):
    """Body of a test module's (or session's) ``server`` fixture."""
    from neozodb.throwaway import mariadb

    server = mariadb.start(str(tmp_path_factory.mktemp('mariadb')))
    try:
        yield server
    finally:
        server.stop()
