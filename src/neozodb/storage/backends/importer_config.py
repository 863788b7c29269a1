"""The Importer adapter's INI file (``-a Importer -d importer.conf``):
parsing and checking it, and opening the source storage it describes.

The file's format is in :mod:`neozodb.storage.backends.importer`.
"""
from __future__ import annotations

import configparser
import os

import ZODB.config
from ZODB.interfaces import IBlobStorage

_BACKEND_KEYS = ('adapter', 'database', 'writeback', 'compress', 'rate')
# what the import can write into
_ADAPTERS = ('SQLite', 'PostgreSQL')


class ImporterConfig:
    """The parsed INI file (its format: :mod:`neozodb.storage.backends.importer`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        cp = configparser.ConfigParser(interpolation=None, default_section='\0')
        try:
            with open(path, encoding='utf-8') as f:
                cp.read_file(f)
        except OSError as e:
            raise ValueError(f'cannot read {path}: {e.strerror or e}') from None
        except (configparser.Error, UnicodeDecodeError) as e:
            raise ValueError(f'invalid importer configuration {path}: '
                             + ' '.join(str(e).split())) from None
        sections = cp.sections()
        if not sections:
            raise ValueError(f'{path}: no section: the first one names the backend'
                             ' (adapter, database), the next one the source (storage)')
        backend, sources = sections[0], sections[1:]
        options = dict(cp.items(backend))
        unknown = sorted(set(options) - set(_BACKEND_KEYS))
        if unknown:
            raise ValueError(f'{path}: [{backend}] unknown option(s): {", ".join(unknown)}'
                             f' (known: {", ".join(_BACKEND_KEYS)})')
        adapter = options.get('adapter', 'SQLite').strip()
        known = {a.lower(): a for a in _ADAPTERS}
        if adapter.lower() not in known:
            raise ValueError(f'{path}: [{backend}] adapter {adapter!r}: one of'
                             f' {", ".join(_ADAPTERS)}')
        self.adapter = known[adapter.lower()]
        database = options.get('database', '').strip()
        if not database:
            raise ValueError(f'{path}: [{backend}] missing database (the SQLite file or'
                             ' PostgreSQL DSN)')
        if (self.adapter == 'SQLite' and database != ':memory:'
                and not os.path.isabs(database)):
            database = os.path.join(os.path.dirname(os.path.abspath(path)), database)
        self.database = database
        self.writeback = self._bool(cp, backend, 'writeback', False)
        self.compress = self._bool(cp, backend, 'compress', True)
        try:
            self.rate = float(options.get('rate', '0').strip() or 0)
        except ValueError:
            raise ValueError(f'{path}: [{backend}] rate: not a number of transactions'
                             ' per second') from None
        if not self.rate >= 0:
            raise ValueError(f'{path}: [{backend}] rate: must be 0 (no limit) or more')
        if not sources:
            raise ValueError(f'{path}: no source section after [{backend}]'
                             ' (storage = <filestorage> ...)')
        if len(sources) > 1:
            raise ValueError(f'{path}: {len(sources)} source databases'
                             f' ({", ".join(sources)}): merging several databases is not'
                             ' supported, import one')
        self.source_name = sources[0]
        source = dict(cp.items(self.source_name))
        extra = sorted(set(source) - {'storage'})
        if extra:
            raise ValueError(f'{path}: [{self.source_name}] unsupported option(s):'
                             f' {", ".join(extra)} (mount points and oid shifting are for'
                             ' merging, which is not supported)')
        self.storage = source.get('storage', '').strip()
        if not self.storage:
            raise ValueError(f'{path}: [{self.source_name}] missing storage'
                             ' (a ZConfig storage section, e.g. <filestorage>)')

    def _bool(self, cp, section: str, key: str, default: bool) -> bool:
        if not cp.has_option(section, key):
            return default
        value = cp.get(section, key).strip().lower()
        if value not in cp.BOOLEAN_STATES:
            raise ValueError(f'{self.path}: [{section}] {key}: not a boolean: {value!r}')
        return cp.BOOLEAN_STATES[value]

    def open_source(self):
        """Open the source storage from its ZConfig section."""
        try:
            storage = ZODB.config.storageFromString(self.storage)
        except Exception as e:
            raise ValueError(f'{self.path}: [{self.source_name}] cannot open the source: '
                             + ' '.join(str(e).split())) from None
        if self.writeback and storage.isReadOnly():
            storage.close()
            raise ValueError(f'{self.path}: writeback needs a writable source: remove'
                             f' "read-only true" from [{self.source_name}]')
        if self.writeback and IBlobStorage.providedBy(storage):
            # new blob revisions would reach the source without their contents
            storage.close()
            raise ValueError(f'{self.path}: writeback to a source with blobs (blob-dir) is'
                             ' not supported: remove "writeback = true"')
        return storage
