"""Importer backend: a SQLite backend that starts over an existing ZODB
storage (the *source*, e.g. a FileStorage) and copies it in the background.

``-a Importer -d importer.conf``: the INI file's first section describes
the real backend, the next one the source::

    [neo]
    adapter = SQLite
    database = /var/lib/neo/s1.sqlite
    writeback = false

    [root]
    storage = <filestorage>
        path /var/lib/zope/Data.fs
        read-only true
      </filestorage>

The cluster is usable at once.  The source's transactions are copied in
TID order (``read_source`` then ``import_transactions``, a slice at a time
in the node's loop, see ``neozodb/storage/importer.py``); ``import_tid``, the last
copied transaction, is written in the same SQLite transaction as the rows,
so a restart resumes exactly after it.  Until the copy is done, reads merge
what this database has with the source's revisions not copied yet: the
*gap* ``(import_tid, source_tid]``.  New commits get TIDs after the
source's last one (``last_ids`` includes it), so they never fall in the gap.

While importing, what would need to list the gap is refused with
``Unsupported`` (the node answers BACKEND_NOT_IMPLEMENTED): iterating
transactions or objects past ``import_tid``, the undo log beyond the
transactions committed since the import started, undoing a transaction of
the gap, and serving replication or replica checks.  Loads, history and
transaction metadata work.

This module needs ZODB (the source is opened with ``ZODB.config``): it is
imported only when the Importer adapter is selected.
"""
from __future__ import annotations

import configparser
import hashlib
import os
import zlib
from collections.abc import Iterator

import ZODB.config
from ZODB.POSException import POSKeyError
from ZODB.utils import p64, u64

from .base import ZERO_HASH, ObjectRecord, TransactionRecord, Unsupported
from .sqlite import (
    _ADD_OBJ,
    _ADD_TRANS,
    _FIND_DATA,
    _INSERT_DATA,
    _NEXT_SERIAL,
    SQLiteBackend,
    _pack_oids,
)

#: (oid, compression, checksum, data or None, data_txn or None)
ImportRecord = tuple[int, int, bytes, "bytes | None", "int | None"]
#: (tid, user, description, extension, records)
ImportTransaction = tuple[int, bytes, bytes, bytes, list[ImportRecord]]

CONFIG_SOURCE_TID = 'import_source_tid'    # last tid of the source to import
CONFIG_SOURCE_OID = 'import_source_oid'    # greatest oid of the source
CONFIG_FIRST_TID = 'import_first_tid'      # first tid of the source
CONFIG_IMPORT_TID = 'import_tid'           # last tid imported
CONFIG_IMPORT_COUNT = 'import_count'       # transactions imported so far
CONFIG_SOURCE = 'import_source'            # the source's configuration

_BACKEND_KEYS = ('adapter', 'database', 'writeback', 'compress', 'rate')
_MAX_TID = (1 << 63) - 1


class SourceDamaged(Exception):
    """The source cannot be read past some point (its message says where)."""


# -- configuration --------------------------------------------------------------------------


class ImporterConfig:
    """The parsed INI file (see the module docstring)."""

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
        if adapter.lower() != 'sqlite':
            raise ValueError(f'{path}: [{backend}] adapter {adapter!r}: only SQLite is supported')
        database = options.get('database', '').strip()
        if not database:
            raise ValueError(f'{path}: [{backend}] missing database (the SQLite file)')
        if database != ':memory:' and not os.path.isabs(database):
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
        return storage


# -- reading the source -----------------------------------------------------------------------


def _is_filestorage(storage) -> bool:
    from ZODB.FileStorage import FileStorage
    return isinstance(storage, FileStorage)


class FileStorageView:
    """Revisions of a FileStorage read from its records (data, undo
    back-pointers and deletions exactly as its iterator gives them)."""

    def __init__(self, storage) -> None:
        self.storage = storage

    def _chain(self, oid: int, f):
        """Data record headers of ``oid``, newest first."""
        fs, key = self.storage, p64(oid)
        try:
            pos = fs._lookup_pos(key)
        except POSKeyError:
            return
        while pos:
            h = fs._read_data_header(pos, key, f)
            yield h
            pos = h.prev

    def revisions(self, oid: int, low: int, high: int) -> tuple[list[int], bool]:
        """Tids of the revisions of ``oid`` in ``(low, high]``, newest first,
        and whether it has any revision at or below ``high``."""
        tids: list[int] = []
        with self.storage._files.get() as f:
            for h in self._chain(oid, f):
                tid = u64(h.tid)
                if tid <= low:
                    return tids, True
                if tid <= high:
                    tids.append(tid)
        return tids, bool(tids)

    def record(self, oid: int, tid: int) -> tuple[bytes | None, int | None]:
        """``(data, data_txn)`` of revision ``tid`` of ``oid`` (data None: a
        deletion or undone creation).  KeyError if there is none."""
        fs, key = self.storage, p64(oid)
        with fs._files.get() as f:
            for h in self._chain(oid, f):
                if u64(h.tid) == tid:
                    if h.plen:
                        return f.read(h.plen), None
                    if not h.back:
                        return None, None
                    back = h.back
                    data = fs._loadBack_impl(key, back, False, f)[0]
                    return data, u64(fs._read_data_header(back, key, f).tid)
                if u64(h.tid) < tid:
                    break
        raise KeyError(tid)


class GenericView:
    """Revisions of any storage through its public API (``history``,
    ``loadSerial``): undo back-pointers are not known (data_txn None)."""

    def __init__(self, storage) -> None:
        self.storage = storage

    def revisions(self, oid: int, low: int, high: int) -> tuple[list[int], bool]:
        try:
            history = self.storage.history(p64(oid), size=1 << 30)
        except (POSKeyError, KeyError):
            return [], False
        tids = sorted((u64(d['tid']) for d in history), reverse=True)
        return [t for t in tids if low < t <= high], any(t <= high for t in tids)

    def record(self, oid: int, tid: int) -> tuple[bytes | None, int | None]:
        try:
            return self.storage.loadSerial(p64(oid), p64(tid)), None
        except POSKeyError:
            return None, None


def _extension_bytes(txn) -> bytes:
    ext = getattr(txn, 'extension_bytes', None)
    if isinstance(ext, bytes):
        return ext
    extension = getattr(txn, 'extension', None) or {}
    if not extension:
        return b''
    from ZODB._compat import dumps
    return dumps(extension, 3)


def pack_record(oid: int, data: bytes | None, data_txn: int | None,
                level: int | None) -> ImportRecord:
    """A record as stored: zlib-compressed when that makes it smaller (as
    clients do), with the SHA-1 of the stored bytes."""
    if data is None:
        return oid, 0, ZERO_HASH, None, data_txn
    if level is not None and len(data) > 32:
        packed = zlib.compress(data, level)
        if len(packed) < len(data):
            return oid, 1, hashlib.sha1(packed).digest(), packed, data_txn
    return oid, 0, hashlib.sha1(data).digest(), data, data_txn


def _where(txn, records) -> str:
    """Where a source transaction (and the record being read) is, for
    error messages: FileStorage offsets when known."""
    parts = []
    if txn is not None:
        parts.append('transaction %#x' % u64(txn.tid))
        tpos = getattr(txn, '_tpos', None)
        if tpos is not None:
            parts.append('at offset %d' % tpos)
    pos = getattr(records, '_pos', None)
    if pos is not None and txn is not None and getattr(txn, '_tpos', None) is not None:
        parts.append('record at offset %d' % pos)
    return ', '.join(parts) or 'the start'


def read_source(storage, after: int, upto: int, compress: bool = True,
                stop=lambda: False) -> Iterator[tuple[ImportTransaction, float | None]]:
    """The transactions of ``storage`` in ``(after, upto]``, ready for
    ``import_transactions``, each with the fraction of the source read so
    far (FileStorage: by bytes; None if unknown).

    Raises SourceDamaged when a transaction cannot be read completely, or
    when the source ends before ``upto`` (FileStorage's iterator stops
    silently on damaged data, logging a warning): nothing of the damaged
    transaction is returned.  ``stop()`` is checked between transactions.
    """
    level = 6 if compress else None
    iterator = storage.iterator(p64(after + 1), p64(upto))
    size = getattr(iterator, '_file_size', None)
    txn = records = None
    last = after
    try:
        for txn in iterator:
            if stop():
                return
            records = None
            tid = u64(txn.tid)
            if tid <= last:
                if tid <= after:
                    continue
                raise SourceDamaged('tids out of order at %s (after %#x)' % (
                    _where(txn, None), last))
            if tid > upto:
                break
            records = iter(txn)
            packed = [pack_record(u64(r.oid), r.data,
                                  None if r.data_txn is None else u64(r.data_txn), level)
                      for r in records]
            end = getattr(records, '_tend', None)
            if end is not None and records._pos < end:
                # FileStorage's record iterator stops at a bad record
                raise SourceDamaged('damaged record in %s: it ends beyond its transaction'
                                    % _where(txn, records))
            last = tid
            done = None
            if size:
                done = min(1.0, getattr(iterator, '_pos', 0) / size)
            yield (tid, txn.user, txn.description, _extension_bytes(txn), packed), done
            txn = records = None
    except SourceDamaged:
        raise
    except Exception as e:
        raise SourceDamaged('cannot read %s: %s: %s' % (
            _where(txn, records), type(e).__name__, ' '.join(str(e).split()))) from e
    finally:
        close = getattr(iterator, 'close', None)
        if close is not None:
            close()
    if last < upto and not stop():
        where = getattr(iterator, '_pos', None)
        raise SourceDamaged('the source ends after transaction %#x%s, before its last'
                            ' transaction %#x (damaged or truncated: see the warnings'
                            ' logged by ZODB)' % (last, '' if where is None else
                                                  ' (offset %d)' % where, upto))


# -- the backend --------------------------------------------------------------------------------


class ImporterBackend(SQLiteBackend):
    """SQLite backend serving a ZODB storage until it has copied it."""

    name = 'Importer'

    def __init__(self, database: str, **options: object) -> None:
        self._reject_options(options)
        self.config = ImporterConfig(database)
        super().__init__(self.config.database)
        self.config_path = database
        self.writeback = self.config.writeback
        self.source = None
        self._view: FileStorageView | GenericView | None = None
        self.source_tid = 0          # last tid of the source to import
        self.source_oid: int | None = None
        self.source_first_tid: int | None = None
        self.import_tid = 0          # last tid imported
        self.import_count = 0        # transactions imported (all runs)
        #: called after each commit (unlock) of a new transaction: writeback
        self.on_commit = None

    # -- lifecycle ----------------------------------------------------------------------------

    def open(self, reset: bool = False) -> None:
        super().open(reset)
        try:
            if self.source is None:
                self.source = self.config.open_source()
                self._view = (FileStorageView(self.source) if _is_filestorage(self.source)
                              else GenericView(self.source))
            self._load_import_state()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        super().close()
        source, self.source = self.source, None
        if source is not None:
            source.close()

    def erase(self) -> None:
        super().erase()
        self._load_import_state()

    def _load_import_state(self) -> None:
        if self.get_config(CONFIG_SOURCE_TID) is None:
            self._start_import()
        get = self.get_config
        self.source_tid = int(get(CONFIG_SOURCE_TID))
        oid = get(CONFIG_SOURCE_OID)
        self.source_oid = None if oid is None else int(oid)
        first = get(CONFIG_FIRST_TID)
        self.source_first_tid = None if first is None else int(first)
        self.import_tid = int(get(CONFIG_IMPORT_TID) or 0)
        self.import_count = int(get(CONFIG_IMPORT_COUNT) or 0)
        if get(CONFIG_SOURCE) != self.config.storage:
            import logging
            logging.getLogger('neozodb.storage').warning(
                'the source configuration changed since the import started: it must be the'
                ' same database')
            self.set_config(CONFIG_SOURCE, self.config.storage)

    def _start_import(self) -> None:
        """First open over this database: note what is to be imported."""
        if SQLiteBackend.last_ids(self)[0] is not None:
            raise ValueError(f'{self.database}: the database already has transactions and no'
                             ' import was started in it: use an empty database')
        source = self.source
        last = u64(source.lastTransaction())
        first = None
        iterator = source.iterator()
        try:
            for txn in iterator:
                first = u64(txn.tid)
                break
        finally:
            close = getattr(iterator, 'close', None)
            if close is not None:
                close()
        max_oid = getattr(source, '_oid', None)   # FileStorage, MappingStorage
        if isinstance(max_oid, bytes) and len(max_oid) == 8:
            max_oid = u64(max_oid)
        else:
            max_oid = max((u64(r.oid) for t in source.iterator() for r in t), default=None)
        with self._txn(durable=True):
            self._set_config(CONFIG_SOURCE_TID, str(last if first is not None else 0))
            self._set_config(CONFIG_SOURCE_OID, None if not max_oid else str(max_oid))
            self._set_config(CONFIG_FIRST_TID, None if first is None else str(first))
            self._set_config(CONFIG_IMPORT_TID, '0')
            self._set_config(CONFIG_IMPORT_COUNT, '0')
            self._set_config(CONFIG_SOURCE, self.config.storage)

    def describe(self) -> str:
        state = ('importing: up to %#x of %#x imported' % (self.import_tid, self.source_tid)
                 if self.importing else 'import finished')
        name = self.source.getName() if self.source is not None else '?'
        return (f'Importer from {name} ({state}) into SQLite database {self.database!r}'
                + (' with writeback' if self.writeback else ''))

    @property
    def importing(self) -> bool:
        """Whether some transactions of the source are not copied yet."""
        return self.import_tid < self.source_tid

    # -- the import ------------------------------------------------------------------------------

    def read_source(self, stop=lambda: False):
        """``read_source`` over what is left to import."""
        return read_source(self.source, self.import_tid, self.source_tid,
                           self.config.compress, stop)

    def import_transactions(self, txns: list[ImportTransaction]) -> None:
        """Copy source transactions, in TID order, each after ``import_tid``
        (others are skipped), and advance ``import_tid`` in the same SQLite
        transaction.  Not durable by itself (``commit_pending``)."""
        txns = [t for t in txns if self.import_tid < t[0] <= self.source_tid]
        if not txns:
            return
        np = self._partitions()
        with self._txn(durable=False) as conn:
            last = self.import_tid
            for tid, user, description, ext, records in txns:
                if tid <= last:
                    raise ValueError('transactions out of order: %#x after %#x' % (tid, last))
                last = tid
                for oid, compression, checksum, data, data_txn in records:
                    if data is None:
                        data_id = None
                    else:
                        params = (checksum, compression, data)
                        row = conn.execute(_FIND_DATA, params).fetchone()
                        data_id = (row[0] if row is not None
                                   else conn.execute(_INSERT_DATA, params).lastrowid)
                    conn.execute(_ADD_OBJ, (oid % np, oid, tid, data_id, data_txn))
                conn.execute(_ADD_TRANS, (tid % np, tid, False,
                                          _pack_oids([r[0] for r in records]),
                                          user, description, ext, tid))
            self._set_config(CONFIG_IMPORT_TID, str(last))
            self._set_config(CONFIG_IMPORT_COUNT, str(self.import_count + len(txns)))
        self.import_tid = last
        self.import_count += len(txns)

    def new_transactions(self, after: int, limit: int, max_records: int = 1000) -> list:
        """Up to ``limit`` committed transactions after ``after`` and after
        the source's history (fewer once they hold ``max_records`` records),
        with their records, for writeback:
        ``(tid, user, description, ext, [(oid, data or None, data_txn)])``;
        none at or after a transaction that is locked and not unlocked yet
        (TID order)."""
        np = self._np
        if np is None:
            return []
        after = max(after, self.source_tid)
        locked = [tid for tid in self.get_locked_transactions().values() if tid is not None]
        high = min(locked, default=_MAX_TID + 1) - 1
        result = []
        records_count = 0
        for tid in SQLiteBackend.get_tids_from(self, after + 1, high, limit, range(np)):
            if records_count >= max_records:
                break
            oids, user, description, ext, _, _ = SQLiteBackend.get_transaction(self, tid)
            records = []
            for oid in oids:
                compression, checksum, data, data_serial = SQLiteBackend.fetch_object(
                    self, oid, tid)
                if checksum == ZERO_HASH and not data:
                    value = None
                elif compression == 1:
                    value = zlib.decompress(data)
                else:
                    value = data
                records.append((oid, value, data_serial))
            result.append((tid, user, description, ext, records))
            records_count += len(records)
        return result

    # -- writes ------------------------------------------------------------------------------------

    def unlock_transaction(self, ttid: int, tid: int) -> None:
        super().unlock_transaction(ttid, tid)
        if self.on_commit is not None:
            self.on_commit()

    def truncate(self, tid: int) -> None:
        """Truncating into the source's history while importing: what was
        not imported yet after ``tid`` is forgotten too (the import stops at
        ``tid``)."""
        tid = int(tid)
        if tid < self.source_tid:
            with self._txn(durable=False):
                self._set_config(CONFIG_SOURCE_TID, str(tid))
                if self.import_tid > tid:
                    self._set_config(CONFIG_IMPORT_TID, str(tid))
            self.source_tid = tid
            self.import_tid = min(self.import_tid, tid)
        super().truncate(tid)

    # -- ids -----------------------------------------------------------------------------------------

    def last_ids(self, partitions=None):
        last_tid, last_oid = super().last_ids(partitions)
        if self.source_tid:
            last_tid = max(last_tid or 0, self.source_tid)
        if self.source_oid is not None:
            last_oid = max(last_oid or 0, self.source_oid)
        return last_tid, last_oid

    def first_tid(self) -> int | None:
        first = super().first_tid()
        if self.importing and self.source_first_tid is not None:
            return min(first or self.source_first_tid, self.source_first_tid)
        return first

    # -- merged reads ----------------------------------------------------------------------------------

    def _gap(self, oid: int) -> tuple[list[int], bool]:
        """Revisions of ``oid`` not imported yet, newest first, and whether
        the source has some revision of it at all (up to what is imported)."""
        try:
            return self._view.revisions(oid, self.import_tid, self.source_tid)
        except Exception as e:
            raise self._source_error(oid, e) from e

    def _source_error(self, oid: int, e: Exception) -> Unsupported:
        """A damaged source: the requests needing it fail, not the node."""
        return Unsupported('cannot read %#x from the source: %s: %s' % (
            oid, type(e).__name__, ' '.join(str(e).split())))

    def _backend_next(self, oid: int, tid: int) -> int | None:
        np = self._np
        return self.connection.execute(_NEXT_SERIAL, (oid % np, oid, tid)).fetchone()[0]

    def _record(self, oid: int, serial: int) -> tuple[bytes | None, int | None]:
        try:
            return self._view.record(oid, serial)
        except Exception as e:
            raise self._source_error(oid, e) from e

    def _from_source(self, oid: int, serial: int, next_serial: int | None) -> ObjectRecord:
        data, data_txn = self._record(oid, serial)
        if data is None:
            return serial, next_serial, 0, ZERO_HASH, b'', None
        return serial, next_serial, 0, hashlib.sha1(data).digest(), data, data_txn

    def get_object(self, oid: int, tid: int | None = None,
                   before_tid: int | None = None) -> ObjectRecord | None | bool:
        if not self.importing or self._np is None:
            return super().get_object(oid, tid, before_tid)
        low, high = self.import_tid, self.source_tid
        if tid is not None and low < tid <= high:
            gap, _ = self._gap(oid)
            if tid not in gap:
                return False if gap or self.last_serial(oid) is not None else None
            i = gap.index(tid)
            following = gap[i - 1] if i else self._backend_next(oid, tid)
            return self._from_source(oid, tid, following)
        found = super().get_object(oid, tid, before_tid)
        if isinstance(found, tuple) and found[0] > high:
            return found              # committed since the import started
        gap, exists = self._gap(oid)
        if tid is None:
            limit = _MAX_TID + 1 if before_tid is None else before_tid
            candidates = [t for t in gap if t < limit]
            if candidates:
                serial = candidates[0]
                i = gap.index(serial)
                following = gap[i - 1] if i else self._backend_next(oid, serial)
                return self._from_source(oid, serial, following)
        if isinstance(found, tuple):
            # imported; its next revision may not be
            if gap and (found[1] is None or gap[-1] < found[1]):
                found = (found[0], gap[-1]) + found[2:]
            return found
        if found is None and (gap or exists):
            return False
        return found

    def last_serial(self, oid: int) -> int | None:
        last = super().last_serial(oid)
        if not self.importing or (last is not None and last > self.source_tid):
            return last
        gap, _ = self._gap(oid)
        return gap[0] if gap else last

    def get_revision(self, oid: int, tid: int | None = None,
                     before_tid: int | None = None):
        if self.importing:
            low, high = self.import_tid, self.source_tid
            if tid is not None and low < tid <= high:
                raise Unsupported('transaction %#x is not imported yet: undo it once the'
                                  ' import is finished' % tid)
            if before_tid is not None and before_tid > low + 1:
                gap, _ = self._gap(oid)
                if any(t < before_tid for t in gap):
                    raise Unsupported('%#x has revisions not imported yet: undo them once'
                                      ' the import is finished' % oid)
        return super().get_revision(oid, tid, before_tid)

    def get_object_history(self, oid: int, offset: int, length: int):
        if not self.importing or self._np is None:
            return super().get_object_history(oid, offset, length)
        rows = super().get_object_history(oid, 0, offset + length)
        gap, exists = self._gap(oid)
        if rows is None and not gap and not exists:
            return None
        rows = rows or []
        high = self.source_tid
        revisions = [r for r in rows if r[0] > high]
        for tid in gap[:offset + length]:
            data, _ = self._record(oid, tid)
            revisions.append((tid, 0 if data is None else len(data)))
        revisions += [r for r in rows if r[0] <= high]
        return revisions[offset:offset + length]

    def get_transaction(self, tid: int) -> TransactionRecord | None:
        if self.importing and self.import_tid < tid <= self.source_tid:
            iterator = self.source.iterator(p64(tid), p64(tid))
            try:
                for txn in iterator:
                    if u64(txn.tid) != tid:
                        break
                    oids = [u64(r.oid) for r in txn]
                    return oids, txn.user, txn.description, _extension_bytes(txn), False, tid
            finally:
                close = getattr(iterator, 'close', None)
                if close is not None:
                    close()
            return None
        return super().get_transaction(tid)

    def _refuse_gap(self, what: str) -> None:
        raise Unsupported('%s: transactions after %#x are being imported (up to %#x);'
                          ' retry once the import is finished' % (
                              what, self.import_tid, self.source_tid))

    def get_tids(self, offset: int, length: int, partitions) -> list[int]:
        tids = super().get_tids(offset, length, partitions)
        # newest first: the transactions committed since the import started,
        # then the gap, then what is imported
        if self.importing and (len(tids) < length or tids[-1] <= self.source_tid):
            self._refuse_gap('undo log')
        return tids

    def get_tids_from(self, min_tid: int, max_tid: int, length: int, partitions) -> list[int]:
        tids = super().get_tids_from(min_tid, max_tid, length, partitions)
        if self.importing and min_tid <= self.source_tid and max_tid > self.import_tid:
            if not (len(tids) == length and tids[-1] <= self.import_tid):
                self._refuse_gap('iteration')
        return tids

    def get_oids_from(self, partition: int, length: int, min_oid: int, tid: int):
        if self.importing and tid > self.import_tid:
            self._refuse_gap('listing objects')
        return super().get_oids_from(partition, length, min_oid, tid)

    # -- not a replication source while importing -----------------------------------------------------

    def _no_replication(self) -> None:
        if self.importing:
            raise Unsupported('this storage is importing a ZODB: it cannot be a replication'
                              ' source or be checked until the import is finished')

    def fetch_tids(self, *args):
        self._no_replication()
        return super().fetch_tids(*args)

    def fetch_object_keys(self, *args):
        self._no_replication()
        return super().fetch_object_keys(*args)

    def fetch_object(self, oid: int, tid: int):
        self._no_replication()
        return super().fetch_object(oid, tid)

    def check_tid_range(self, *args):
        self._no_replication()
        return super().check_tid_range(*args)

    def check_serial_range(self, *args):
        self._no_replication()
        return super().check_serial_range(*args)


def import_all(backend: ImporterBackend, chunk: int = 100) -> None:
    """Import everything at once (tests, tools): no event loop."""
    batch: list[ImportTransaction] = []
    for txn, _ in backend.read_source():
        batch.append(txn)
        if len(batch) >= chunk:
            backend.import_transactions(batch)
            batch = []
    backend.import_transactions(batch)
    backend.commit_pending()


__all__ = ['ImporterBackend', 'ImporterConfig', 'SourceDamaged', 'import_all', 'read_source']
