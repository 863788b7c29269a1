"""A throw-away PostgreSQL server for the tests (``neozodb.throwaway``),
and the reason to skip when PostgreSQL's binaries or psycopg are missing."""

from __future__ import annotations

import importlib.util

from neozodb.throwaway.postgresql import find_binaries


def skip_reason() -> str | None:
    """Why PostgreSQL tests cannot run here, or None."""
    if importlib.util.find_spec('psycopg') is None:
        return 'psycopg (extra "postgresql") is not installed'
    if find_binaries() is None:
        return ('PostgreSQL binaries (initdb, pg_ctl, postgres) not found in'
                ' /usr/lib/postgresql/*/bin, $PATH or $NEOZODB_PG_BIN')
    return None


def server_fixture(tmp_path_factory):
    """Body of the session fixture ``postgresql_server`` (conftest.py):
    skips with the reason when the server cannot run here, stops it at
    the end of the session whatever happened."""
    import pytest

    from neozodb.throwaway.postgresql import start

    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    server = start(str(tmp_path_factory.mktemp('postgresql')))
    try:
        yield server
    finally:
        server.stop()
