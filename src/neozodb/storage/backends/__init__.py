"""Storage node database backends.

``Backend`` (``base.py``) is the interface; each adapter implements it in
its own module, imported only when selected so that a node never needs the
drivers of the databases it does not use.  Backends are synchronous and are
called from the storage node's event loop thread.
"""

from __future__ import annotations

import importlib
import os

from .base import DISCARDED, ZERO_HASH, Backend, Unsupported

__all__ = ['Backend', 'DISCARDED', 'Unsupported', 'ZERO_HASH', 'adapters', 'open_backend']

# adapter name (lower case) -> (module, class or function making the backend)
_ADAPTERS = {
    'sqlite': ('neozodb.storage.backends.sqlite', 'SQLiteBackend'),
    'postgresql': ('neozodb.storage.backends.postgresql', 'PostgreSQLBackend'),
    # NEO's MySQL schema, served in place; 'mysql' is NEO's adapter name
    'mariadb': ('neozodb.storage.backends.mariadb', 'MariaDBBackend'),
    'mysql': ('neozodb.storage.backends.mariadb', 'MariaDBBackend'),
    # live import of a ZODB storage into SQLite or PostgreSQL (database =
    # its INI file; a function choosing the class)
    'importer': ('neozodb.storage.backends.importer', 'importer_backend'),
}


def adapters() -> list[str]:
    """Known adapter names, lower case."""
    return sorted(_ADAPTERS)


def open_backend(adapter: str, database: str, **options: object) -> Backend:
    """Create the backend for ``adapter`` (case-insensitive) and open it.

    ``options`` go to the backend's constructor, except ``reset`` (bool,
    default False) which is passed to ``Backend.open`` and erases the
    database first.  Raises ValueError("unknown adapter: X") for an unknown
    adapter and ValueError for options the backend does not know.
    """
    try:
        module_name, class_name = _ADAPTERS[adapter.lower()]
    except KeyError:
        raise ValueError(f'unknown adapter: {adapter}') from None
    if database.strip() == ':memory:' and adapter.lower() == 'sqlite' \
            and os.environ.get('NEOZODB_ALLOW_MEMORY_DATABASE') != '1':
        # a node that forgets everything when it stops, while the cluster
        # counts on what it acknowledged: for tests only (they opt in)
        raise ValueError(':memory: loses every committed transaction when the node stops'
                         ' (tests: set NEOZODB_ALLOW_MEMORY_DATABASE=1)')
    reset = bool(options.pop('reset', False))
    cls = getattr(importlib.import_module(module_name), class_name)
    backend = cls(database, **options)
    backend.open(reset=reset)
    return backend
