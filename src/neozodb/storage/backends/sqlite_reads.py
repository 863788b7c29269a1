"""Reads of ``SQLiteBackend`` (a mixin): object revisions, oids and data
rows, then the metadata of transactions (history, undo log, tid
listings)."""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from .base import ZERO_HASH, ObjectRecord, TransactionRecord
from .sqlite_schema import (
    _GET_AT_NEXT,
    _GET_BEFORE_NEXT,
    _GET_LATEST,
    _GET_TRANS,
    _HISTORY,
    _LAST_SERIAL,
    _LAST_SERIALS,
    _LAST_SERIALS_CHUNK,
    _LOAD_DATA,
    _OID_EXISTS,
    _OIDS_FROM,
    _PACKED_UP_TO,
    _REVISION_AT,
    _REVISION_BEFORE,
    _TIDS_FROM,
    _UNDO_TIDS_DESC,
    _unpack_oids,
)


class SQLiteReads:
    """Object and transaction metadata reads of ``SQLiteBackend``."""

    # -- reads ---------------------------------------------------------------

    def get_object(self, oid: int, tid: int | None = None,
                   before_tid: int | None = None) -> ObjectRecord | None | bool:
        np = self._np
        if np is None:
            return None
        conn = self.connection
        p = oid % np
        if tid is None and before_tid is None:
            row = conn.execute(_GET_LATEST, (p, oid)).fetchone()
            if row is None:
                return None
            next_serial = None      # the latest revision has no successor
        else:
            if tid is None:
                row = conn.execute(_GET_BEFORE_NEXT, (p, oid, before_tid)).fetchone()
            elif before_tid is None:
                row = conn.execute(_GET_AT_NEXT, (p, oid, tid)).fetchone()
            else:
                raise ValueError('tid and before_tid are mutually exclusive')
            if row is None:
                return False if conn.execute(_OID_EXISTS, (p, oid)).fetchone() else None
            next_serial = row[5]
        serial, value_tid, compression, checksum, data = row[:5]
        if checksum is None:            # data_id NULL: deletion / undone creation
            return serial, next_serial, 0, ZERO_HASH, b'', None
        return serial, next_serial, compression, checksum, data, value_tid

    def get_revision(self, oid: int, tid: int | None = None,
                     before_tid: int | None = None) -> tuple[int, int | None, int | None] | None:
        np = self._np
        if np is None:
            return None
        if (tid is None) == (before_tid is None):
            raise ValueError('give exactly one of tid and before_tid')
        if tid is None:
            row = self.connection.execute(_REVISION_BEFORE, (oid % np, oid, before_tid)).fetchone()
        else:
            row = self.connection.execute(_REVISION_AT, (oid % np, oid, tid)).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def get_oids_from(self, partition: int, length: int, min_oid: int, tid: int
                      ) -> tuple[list[int], int | None]:
        if length <= 0:
            raise ValueError('length must be positive')
        rows = self.connection.execute(_OIDS_FROM, (partition, min_oid, tid, length)).fetchall()
        oids = [oid for oid, _, data_id in rows if data_id is not None]
        return oids, (rows[-1][0] + 1 if len(rows) == length else None)

    def last_serial(self, oid: int) -> int | None:
        np = self._np
        if np is None:
            return None
        return self._scalar(_LAST_SERIAL, (oid % np, oid))

    def last_serials(self, oids: list[int]) -> dict[int, int | None]:
        np = self._np
        if np is None:
            return dict.fromkeys(oids)
        found = {}
        execute = self.connection.execute
        for i in range(0, len(oids), _LAST_SERIALS_CHUNK):
            chunk = oids[i:i + _LAST_SERIALS_CHUNK]
            params = [x for oid in chunk for x in (oid % np, oid)]
            found.update(execute(_LAST_SERIALS % ','.join(('(?,?)',) * len(chunk)), params))
        return found

    def load_data(self, data_id: int) -> tuple[bytes, int, bytes] | None:
        row = self.connection.execute(_LOAD_DATA, (data_id,)).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    # -- metadata reads ----------------------------------------------------------

    def get_transaction(self, tid: int) -> TransactionRecord | None:
        np = self._np
        if np is None:
            return None
        row = self.connection.execute(_GET_TRANS, (tid % np, tid)).fetchone()
        if row is None:
            return None
        oids, user, description, ext, packed, ttid = row
        return _unpack_oids(oids), user, description, ext, bool(packed), ttid

    def get_object_history(self, oid: int, offset: int, length: int
                           ) -> list[tuple[int, int]] | None:
        np = self._np
        if np is None:
            return None
        conn = self.connection
        p = oid % np
        history = conn.execute(_HISTORY, (p, oid, length, offset)).fetchall()
        if not history and conn.execute(_OID_EXISTS, (p, oid)).fetchone() is None:
            return None
        return [(serial, size) for serial, size in history]

    def get_tids(self, offset: int, length: int, partitions: Iterable[int]) -> list[int]:
        if length <= 0:
            return []
        conn = self.connection
        # Each partition is a descending primary-key range; merging the
        # first offset+length of each avoids sorting the union in SQL.
        limit = offset + length
        runs = [[row[0] for row in conn.execute(
                    _UNDO_TIDS_DESC, (p, self._scalar(_PACKED_UP_TO, (p,)) or -1, limit))]
                for p in set(partitions)]
        merged = heapq.merge(*runs, reverse=True)
        return list(merged)[offset:limit]

    def get_tids_from(self, min_tid: int, max_tid: int, length: int,
                      partitions: Iterable[int]) -> list[int]:
        if length <= 0:
            return []
        conn = self.connection
        runs = [[row[0] for row in conn.execute(_TIDS_FROM, (p, min_tid, max_tid, length))]
                for p in set(partitions)]
        return list(heapq.merge(*runs))[:length]
