"""Reads of ``Importer`` (a mixin, before the SQL backend): while
importing, what the database has is merged with the source's
revisions not copied yet (the gap ``(import_tid, source_tid]``), and what
would have to list the gap is refused with ``Unsupported``.

A blob revision not imported yet (a source with a ``blob-dir``) is
served as it will be imported: the record packed as the import packs it,
with its tail, so its checksum is the one its data row will have; the
tail costs one reading of the source's file, remembered (``GAP_BLOBS``
revisions).  Its content is read from that file, a chunk per request:
``load_blob_chunk`` looks for the checksum in the database first, then
among the blob revisions served from the source.

It uses the backend's import state (``import_tid``, ``source_tid``,
``importing``, ``source`` and ``_view``), kept by
:mod:`neozodb.storage.backends.importer`.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

from ZODB.blob import is_blob_record
from ZODB.utils import p64, u64

from neozodb.protocol.blobs import add_tail

from .base import ZERO_HASH, ObjectRecord, TransactionRecord, Unsupported
from .importer_source import (
    blob_file,
    blob_tail,
    extension_bytes,
    has_blobs,
    pack_record,
    read_chunk,
)
from .sqlite_schema import _NEXT_SERIAL

_MAX_TID = (1 << 63) - 1
#: blob revisions served from the source whose tails and files are
#: remembered (the oldest served forgotten first)
GAP_BLOBS = 10000

log = logging.getLogger('neozodb.storage')


class ImporterReads:
    """Merged reads and refusals of ``ImporterBackend``."""

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
        if self.blobs and is_blob_record(data) and has_blobs(self.source):
            blob = self._gap_blob(oid, serial, data, data_txn)
            if blob is not None:
                return (serial, next_serial) + blob + (data_txn,)
        return serial, next_serial, 0, hashlib.sha1(data).digest(), data, data_txn

    def _gap_blob(self, oid: int, serial: int, data: bytes, data_txn: int | None
                  ) -> tuple[int, bytes, bytes] | None:
        """(compression, checksum, stored bytes) of a blob revision not
        imported yet, as the import will store it; None if the source has
        no file for it (imported as a record alone, too)."""
        tails, files = self._gap_tails, self._gap_files
        filename = blob_file(self.source, oid, serial, data_txn)
        if filename is None:
            return None
        tail = tails.get((oid, serial))
        if tail is None:
            try:
                tail = blob_tail(filename)
            except OSError as e:
                raise self._source_error(oid, e) from e
            tails[oid, serial] = tail
            if len(tails) > GAP_BLOBS:
                tails.popitem(last=False)
        _, compression, _, packed, _, _ = pack_record(
            oid, data, None, 6 if self.config.compress else None)
        compression, stored = add_tail(compression, packed, *tail)
        checksum = hashlib.sha1(stored).digest()
        files[checksum] = filename
        files.move_to_end(checksum)
        if len(files) > GAP_BLOBS:
            files.popitem(last=False)
        return compression, checksum, stored

    def load_blob_chunk(self, checksum: bytes, n: int) -> bytes | None:
        chunk = super().load_blob_chunk(checksum, n)
        if chunk is None:
            filename = self._gap_files.get(checksum)
            if filename is not None:
                try:
                    chunk = read_chunk(filename, n)
                except OSError as e:
                    log.error('cannot read chunk %d of the blob %s from the source (%s): %s',
                              n, checksum.hex(), filename, e)
        return chunk

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

    def last_serials(self, oids: list[int]) -> dict[int, int | None]:
        if not self.importing:
            return super().last_serials(oids)
        return {oid: self.last_serial(oid) for oid in oids}  # with the gaps

    def get_revision(self, oid: int, tid: int | None = None,
                     before_tid: int | None = None) -> tuple[int, int | None, int | None] | None:
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

    def get_object_history(self, oid: int, offset: int, length: int
                           ) -> list[tuple[int, int]] | None:
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
                    return oids, txn.user, txn.description, extension_bytes(txn), False, tid
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

    def get_tids(self, offset: int, length: int, partitions: Iterable[int]) -> list[int]:
        tids = super().get_tids(offset, length, partitions)
        # newest first: the transactions committed since the import started,
        # then the gap, then what is imported
        if self.importing and (len(tids) < length or tids[-1] <= self.source_tid):
            self._refuse_gap('undo log')
        return tids

    def get_tids_from(self, min_tid: int, max_tid: int, length: int,
                      partitions: Iterable[int]) -> list[int]:
        tids = super().get_tids_from(min_tid, max_tid, length, partitions)
        if self.importing and min_tid <= self.source_tid and max_tid > self.import_tid:
            if not (len(tids) == length and tids[-1] <= self.import_tid):
                self._refuse_gap('iteration')
        return tids

    def get_oids_from(self, partition: int, length: int, min_oid: int, tid: int
                      ) -> tuple[list[int], int | None]:
        if self.importing and tid > self.import_tid:
            self._refuse_gap('listing objects')
        return super().get_oids_from(partition, length, min_oid, tid)

    # -- not a replication source while importing -----------------------------------------------------

    def _no_replication(self) -> None:
        if self.importing:
            raise Unsupported('this storage is importing a ZODB: it cannot be a replication'
                              ' source or be checked until the import is finished')

    def fetch_tids(self, *args: int) -> list[int]:
        self._no_replication()
        return super().fetch_tids(*args)

    def fetch_object_keys(self, *args: int) -> list[tuple[int, int]]:
        self._no_replication()
        return super().fetch_object_keys(*args)

    def fetch_object(self, oid: int, tid: int) -> tuple[int, bytes, bytes, int | None] | None:
        self._no_replication()
        return super().fetch_object(oid, tid)

    def check_tid_range(self, *args: int) -> tuple[int, bytes, int]:
        self._no_replication()
        return super().check_tid_range(*args)

    def check_serial_range(self, *args: int) -> tuple[int, bytes, int, bytes, int]:
        self._no_replication()
        return super().check_serial_range(*args)
