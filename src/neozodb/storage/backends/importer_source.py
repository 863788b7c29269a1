"""Reading the source of an import (a ZODB storage) for the Importer
backend: its transactions in TID order, ready to be copied
(:func:`read_source`), single revisions of an object, for the reads
that merge what is not copied yet (``FileStorageView``, ``GenericView``),
and the files of its blob revisions (a source with a ``blob-dir``: its
``loadBlob``), read a chunk at a time.

Nothing here touches the destination database.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator

from ZODB.blob import is_blob_record
from ZODB.interfaces import IBlobStorage
from ZODB.POSException import POSKeyError
from ZODB.utils import p64, u64

from neozodb.deflate import DEFAULT_LEVEL, compress_record
from neozodb.protocol.blobs import CHUNK

from .records import ZERO_HASH

log = logging.getLogger('neozodb.storage')

#: (oid, compression, checksum, data or None, data_txn or None, blob): blob
#: is None, the source's file of a blob revision's content (as read), or
#: the blob id of its copy in the database (``Importer.import_blobs``,
#: which also gives the record its tail)
ImportRecord = tuple[int, int, bytes, "bytes | None", "int | None", "str | int | None"]
#: (tid, user, description, extension, records)
ImportTransaction = tuple[int, bytes, bytes, bytes, list[ImportRecord]]


class SourceDamaged(Exception):
    """The source cannot be read past some point (its message says where)."""


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


def source_view(storage) -> FileStorageView | GenericView:
    """How to read the revisions of ``storage``: a FileStorage's own records
    keep the undo back-pointers that the public API hides."""
    return FileStorageView(storage) if _is_filestorage(storage) else GenericView(storage)


def extension_bytes(txn) -> bytes:
    """The extension of a source transaction as stored (pickled)."""
    ext = getattr(txn, 'extension_bytes', None)
    if isinstance(ext, bytes):
        return ext
    extension = getattr(txn, 'extension', None) or {}
    if not extension:
        return b''
    from ZODB._compat import dumps
    return dumps(extension, 3)


def pack_record(oid: int, data: bytes | None, data_txn: int | None,
                level: int | None, blob: str | None = None) -> ImportRecord:
    """A record as stored: compressed by NEO's rule, whenever that makes it
    smaller (``deflate.compress_record``; our clients' default is choosier),
    with the SHA-1 of the stored bytes (a blob revision's tail is added
    once its content is copied)."""
    if data is None:
        return oid, 0, ZERO_HASH, None, data_txn, None
    compression, stored, checksum = compress_record(data, level)
    return oid, compression, checksum, stored, data_txn, blob


# -- blob files ---------------------------------------------------------------------------------


def has_blobs(storage) -> bool:
    """Whether ``storage`` keeps blob contents (a ``blob-dir``)."""
    return IBlobStorage.providedBy(storage)


def blob_file(storage, oid: int, tid: int, data_txn: int | None) -> str | None:
    """The source's file of the content of revision ``tid`` of ``oid``, a
    blob's; None if it has none (packed away, lost).  An undo has its own
    file in a ``BlobStorage``; one written by ``restore`` alone may only
    have the file of the revision it points to (``data_txn``)."""
    for serial in (tid, data_txn):
        if serial is not None:
            try:
                return storage.loadBlob(p64(oid), p64(serial))
            except (POSKeyError, KeyError):
                pass
    return None


def read_chunks(filename: str) -> Iterator[bytes]:
    """The content of a file in chunks of ``CHUNK`` bytes, as stored: an
    empty content is one empty chunk."""
    with open(filename, 'rb') as f:
        n = 0
        while True:
            chunk = f.read(CHUNK)
            if not chunk and n:
                return
            yield chunk
            n += 1
            if len(chunk) < CHUNK:
                return


def blob_tail(filename: str) -> tuple[bytes, int]:
    """(SHA-256, size) of a file's content, read a chunk at a time."""
    hasher = hashlib.sha256()
    size = 0
    for chunk in read_chunks(filename):
        hasher.update(chunk)
        size += len(chunk)
    return hasher.digest(), size


def read_chunk(filename: str, n: int) -> bytes | None:
    """Chunk ``n`` of a file's content, None if it has no such chunk."""
    with open(filename, 'rb') as f:
        f.seek(n * CHUNK)
        chunk = f.read(CHUNK)
    return chunk if chunk or n == 0 else None


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


def _packed(storage, records, txn, level: int | None) -> Iterator[ImportRecord]:
    """The records of a source transaction as ``pack_record`` makes them,
    a blob revision's with the name of its file in the source's blob-dir
    (a blob revision in a source without one is refused: its content
    would be lost)."""
    blobs = has_blobs(storage)
    for record in records:
        oid, data = u64(record.oid), record.data
        data_txn = None if record.data_txn is None else u64(record.data_txn)
        blob = None
        if data and is_blob_record(data):
            if not blobs:
                raise SourceDamaged('blob record of oid %#x in %s, and the source has no'
                                    ' blob-dir: add the blob-dir of the source to its'
                                    ' section' % (oid, _where(txn, None)))
            tid = u64(record.tid)
            blob = blob_file(storage, oid, tid, data_txn)
            if blob is None:
                log.warning('import: the blob of %#x at %#x has no file in the source\'s'
                            ' blob-dir: imported as a record without content', oid, tid)
        yield pack_record(oid, data, data_txn, level, blob)


def read_source(storage, after: int, upto: int, compress: bool = True,
                stop: Callable[[], bool] = lambda: False
                ) -> Iterator[tuple[ImportTransaction, float | None]]:
    """The transactions of ``storage`` in ``(after, upto]``, ready for
    ``import_transactions``, each with the fraction of the source read so
    far (FileStorage: by bytes; None if unknown).

    Raises SourceDamaged when a transaction cannot be read completely, or
    when the source ends before ``upto`` (FileStorage's iterator stops
    silently on damaged data, logging a warning): nothing of the damaged
    transaction is returned.  ``stop()`` is checked between transactions.
    """
    level = DEFAULT_LEVEL if compress else None
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
            packed = list(_packed(storage, records, txn, level))
            end = getattr(records, '_tend', None)
            if end is not None and records._pos < end:
                # FileStorage's record iterator stops at a bad record
                raise SourceDamaged('damaged record in %s: it ends beyond its transaction'
                                    % _where(txn, records))
            last = tid
            done = None
            if size:
                done = min(1.0, getattr(iterator, '_pos', 0) / size)
            yield (tid, txn.user, txn.description, extension_bytes(txn), packed), done
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
