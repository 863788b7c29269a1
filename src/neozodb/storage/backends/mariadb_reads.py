"""Reads of ``MariaDBBackend`` (a mixin): object revisions, oids and data
rows (bigdata reassembled), then the metadata of transactions (history,
undo log, tid listings)."""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from . import mariadb_schema as S
from .base import ZERO_HASH, ObjectRecord, TransactionRecord
from .mariadb_blobs import wire_compression


class MariaDBReads:
    """Object and transaction metadata reads of ``MariaDBBackend``."""

    def _value(self, compression: int, value: bytes) -> tuple[int, bytes]:
        """(compression id on the wire, data) of a data row: a bigdata
        reference is read, a blob revision's flag translated
        (mariadb_blobs)."""
        value = bytes(value)
        if compression is not None and compression & S.BIG_FLAG:
            first, end, length = S.big_ids(value)
            chunks = self._q(S.BIGDATA, (first, end))
            data = b''.join(bytes(chunk) for _, chunk in chunks)
            if [i for i, _ in chunks] != list(range(first, end)) or len(data) != length:
                raise ValueError(f'bigdata rows {first}..{end - 1} incomplete')
            return wire_compression(compression & ~S.BIG_FLAG), data
        return wire_compression(compression or 0), value

    def get_object(self, oid: int, tid: int | None = None,
                   before_tid: int | None = None) -> ObjectRecord | None | bool:
        np = self._np
        if np is None:
            return None
        p = oid % np
        if tid is None and before_tid is None:
            rows = self._q(S.GET_LATEST, (p, oid))
            if not rows:
                return None
            next_serial = None
        else:
            if tid is None:
                rows = self._q(S.GET_BEFORE_NEXT, (p, oid, before_tid))
            elif before_tid is None:
                rows = self._q(S.GET_AT_NEXT, (p, oid, tid))
            else:
                raise ValueError('tid and before_tid are mutually exclusive')
            if not rows:
                return False if self._q(S.OID_EXISTS, (p, oid)) else None
            next_serial = rows[0][5]
        serial, value_tid, compression, checksum, value = rows[0][:5]
        if checksum is None:
            return serial, next_serial, 0, ZERO_HASH, b'', None
        compression, data = self._value(compression, value)
        return serial, next_serial, compression, bytes(checksum), data, value_tid

    def get_revision(self, oid: int, tid: int | None = None,
                     before_tid: int | None = None) -> tuple[int, int | None, int | None] | None:
        np = self._np
        if np is None:
            return None
        if (tid is None) == (before_tid is None):
            raise ValueError('give exactly one of tid and before_tid')
        if tid is None:
            rows = self._q(S.REVISION_BEFORE, (oid % np, oid, before_tid))
        else:
            rows = self._q(S.REVISION_AT, (oid % np, oid, tid))
        return None if not rows else tuple(rows[0])

    def get_oids_from(self, partition: int, length: int, min_oid: int, tid: int
                      ) -> tuple[list[int], int | None]:
        if length <= 0:
            raise ValueError('length must be positive')
        rows = self._q(S.OIDS_FROM, (partition, min_oid, tid, length, partition))
        oids = [oid for oid, data_id in rows if data_id is not None]
        return oids, (rows[-1][0] + 1 if len(rows) == length else None)

    def last_serial(self, oid: int) -> int | None:
        np = self._np
        if np is None:
            return None
        return self._scalar(S.LAST_SERIAL, (oid % np, oid))

    def last_serials(self, oids: list[int]) -> dict[int, int | None]:
        found = dict.fromkeys(oids)
        np = self._np
        if np is None:
            return found
        for i in range(0, len(oids), S.IN_CHUNK):
            chunk = oids[i:i + S.IN_CHUNK]
            partitions = sorted({oid % np for oid in chunk})
            sql = S.LAST_SERIALS % (','.join('?' * len(partitions)), ','.join('?' * len(chunk)))
            found.update(self._q(sql, partitions + chunk))
        return found

    def load_data(self, data_id: int) -> tuple[bytes, int, bytes] | None:
        rows = self._q(S.LOAD_DATA, (data_id,))
        if not rows:
            return None
        checksum, compression, value = rows[0]
        compression, data = self._value(compression, value)
        return bytes(checksum), compression, data

    # -- metadata reads ----------------------------------------------------------

    def get_transaction(self, tid: int) -> TransactionRecord | None:
        np = self._np
        if np is None:
            return None
        rows = self._q(S.GET_TRANS, (tid % np, tid))
        if not rows:
            return None
        oids, user, description, ext, packed, ttid = rows[0]
        return (S.unpack_oids(bytes(oids)), bytes(user), bytes(description), bytes(ext),
                bool(packed), ttid)

    def get_object_history(self, oid: int, offset: int, length: int
                           ) -> list[tuple[int, int]] | None:
        np = self._np
        if np is None:
            return None
        p = oid % np
        history = []
        for serial, big, size in self._q(S.HISTORY, (p, oid, length, offset)):
            if big is not None:
                size = S.big_ids(bytes(big))[2]
            history.append((serial, size or 0))
        if not history and not self._q(S.OID_EXISTS, (p, oid)):
            return None
        return history

    def get_tids(self, offset: int, length: int, partitions: Iterable[int]) -> list[int]:
        if length <= 0:
            return []
        limit = offset + length
        runs = []
        for p in set(partitions):
            progress = self.get_pack_progress(p)
            packed = None if progress is None else self._scalar(S.PACKED_UP_TO, (progress[0],))
            runs.append([row[0] for row in self._q(
                S.UNDO_TIDS_DESC, (p, -1 if packed is None else packed, limit))])
        return list(heapq.merge(*runs, reverse=True))[offset:limit]

    def get_tids_from(self, min_tid: int, max_tid: int, length: int,
                      partitions: Iterable[int]) -> list[int]:
        if length <= 0:
            return []
        runs = [[row[0] for row in self._q(S.TIDS_FROM, (p, min_tid, max_tid, length))]
                for p in set(partitions)]
        return list(heapq.merge(*runs))[:length]
