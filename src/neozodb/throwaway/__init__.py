"""Throw-away database servers: a PostgreSQL or MariaDB server of its own,
started in a directory on 127.0.0.1 for ``neosimple --adapter`` and for the
tests, and stopped with everything it wrote.

Each server module provides ``start(directory: str) -> Server``; a Server
has ``database(name: str) -> str`` (creates database ``name`` if needed
and returns what ``neostorage -d`` takes for it) and ``stop()``.  The
modules need the server binaries and the backend's driver only when
started, so this package imports without them.
"""

from __future__ import annotations

import importlib
from typing import Protocol

__all__ = ['Server', 'servers', 'start']


class Server(Protocol):
    def database(self, name: str) -> str: ...

    def stop(self) -> None: ...


# adapter name (lower case) -> module with start(directory)
_SERVERS: dict[str, str] = {
    'postgresql': 'neozodb.throwaway.postgresql',
    'mariadb': 'neozodb.throwaway.mariadb',
    'mysql': 'neozodb.throwaway.mariadb',
}


def servers() -> list[str]:
    """Adapters whose server can be started here, lower case."""
    return sorted(_SERVERS)


def start(adapter: str, directory: str) -> Server:
    """Start a throw-away server for ``adapter`` (case-insensitive) with its
    files in ``directory``; ValueError if the adapter needs no server or
    has none here."""
    try:
        module = _SERVERS[adapter.lower()]
    except KeyError:
        raise ValueError(f'no throw-away server for adapter {adapter}') from None
    return importlib.import_module(module).start(directory)
