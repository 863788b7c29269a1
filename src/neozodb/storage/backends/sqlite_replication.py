"""Replication and replica checks of ``SQLiteBackend`` (a mixin): chunks
read from a source and written to a destination, replication points,
truncation, dropping partitions, and the digests compared by the
checker."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from .base import ZERO_HASH
from .sqlite_schema import (
    _ADD_OBJ,
    _ADD_TRANS,
    _CHECK_OBJ,
    _CHECK_TRANS,
    _DEL_OBJ,
    _DEL_PACK,
    _DEL_REPLICATION,
    _DEL_TRANS,
    _DROP_UNFINISHED_TOBJ,
    _DROP_UNFINISHED_TPACK,
    _FETCH_OBJ,
    _FETCH_OBJ_KEYS,
    _FETCH_TIDS,
    _FIND_DATA,
    _FLOOR_STEP,
    _GET_REPLICATION,
    _INSERT_DATA,
    _MAX_OBJ_TID,
    _MAX_TRANS_TID,
    _OBJ_DATA_ID,
    _PARTITION_OBJ_CHUNK,
    _PARTITION_TRANS_CHUNK,
    _SET_REPLICATION,
    _TRUNCATE_DATA_IDS,
    _TRUNCATE_OBJ,
    _TRUNCATE_PACK,
    _TRUNCATE_REPLICATION_OBJ,
    _TRUNCATE_REPLICATION_TRANS,
    _TRUNCATE_TRANS,
    _TRUNCATE_TTRANS,
    _U64,
    _UNFINISHED_DATA_IDS,
    _pack_oids,
)


class SQLiteReplication:
    """Replication and replica checks of ``SQLiteBackend``."""

    # -- replication -------------------------------------------------------------

    def fetch_tids(self, partition: int, length: int, min_tid: int, max_tid: int) -> list[int]:
        rows = self.connection.execute(_FETCH_TIDS, (partition, min_tid, max_tid, length))
        return [row[0] for row in rows]

    def fetch_object_keys(self, partition: int, length: int, min_tid: int, max_tid: int,
                          min_oid: int) -> list[tuple[int, int]]:
        return self.connection.execute(
            _FETCH_OBJ_KEYS, (partition, min_tid, min_oid, max_tid, length)).fetchall()

    def fetch_object(self, oid: int, tid: int) -> tuple[int, bytes, bytes, int | None] | None:
        row = self.connection.execute(_FETCH_OBJ, (oid % self._partitions(), oid, tid)).fetchone()
        if row is None:
            return None
        value_tid, compression, checksum, data = row
        if checksum is None:
            return 0, ZERO_HASH, b'', None
        return compression, checksum, data, value_tid

    def add_transaction(self, tid: int, oids: Sequence[int], user: bytes, description: bytes,
                        ext: bytes, packed: bool, ttid: int) -> None:
        np = self._partitions()
        with self._txn(durable=False) as conn:
            conn.execute(_ADD_TRANS, (tid % np, tid, bool(packed), _pack_oids(oids), user,
                                      description, ext, ttid))

    def add_object(self, oid: int, tid: int, compression: int, checksum: bytes, data: bytes,
                   data_serial: int | None) -> None:
        p = oid % self._partitions()
        with self._txn(durable=False) as conn:
            old = conn.execute(_OBJ_DATA_ID, (p, oid, tid)).fetchone()
            if checksum == ZERO_HASH and not data:
                data_id = None
            else:
                params = (checksum, compression, data)
                row = conn.execute(_FIND_DATA, params).fetchone()
                data_id = row[0] if row is not None else conn.execute(_INSERT_DATA, params).lastrowid
            conn.execute(_ADD_OBJ, (p, oid, tid, data_id, data_serial))
            if old is not None and old[0] is not None and old[0] != data_id:
                self._prune([old[0]])

    def delete_transactions(self, partition: int, tids: Iterable[int]) -> None:
        tids = list(tids)
        with self._txn(durable=False) as conn:
            conn.executemany(_DEL_TRANS, [(partition, tid) for tid in tids])
            conn.executemany(_DEL_PACK, [(tid,) for tid in tids])

    def delete_objects(self, partition: int, keys: Iterable[tuple[int, int]]) -> None:
        with self._txn(durable=False) as conn:
            candidates = []
            for tid, oid in keys:
                row = conn.execute(_OBJ_DATA_ID, (partition, oid, tid)).fetchone()
                if row is not None:
                    conn.execute(_DEL_OBJ, (partition, oid, tid))
                    if row[0] is not None:
                        candidates.append(row[0])
            self._prune(candidates)

    def get_replication(self, partition: int) -> tuple[int, int, int] | None:
        row = self.connection.execute(_GET_REPLICATION, (partition,)).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def set_replication(self, partition: int, point: tuple[int, int, int] | None) -> None:
        with self._txn(durable=True) as conn:
            if point is None:
                conn.execute(_DEL_REPLICATION, (partition,))
            else:
                conn.execute(_SET_REPLICATION, (partition, *point))
            self._advance_floor(_FLOOR_STEP)

    def last_tid_of(self, partition: int) -> int | None:
        tids = [self._scalar(sql, (partition,)) for sql in (_MAX_TRANS_TID, _MAX_OBJ_TID)]
        return max((t for t in tids if t is not None), default=None)

    def truncate(self, tid: int) -> None:
        tid = int(tid)
        with self._txn(durable=True) as conn:
            candidates = []
            for p in range(self._np or 0):
                candidates += [row[0] for row in conn.execute(_TRUNCATE_DATA_IDS, (p, tid))]
                conn.execute(_TRUNCATE_OBJ, (p, tid))
                conn.execute(_TRUNCATE_TRANS, (p, tid))
            # what is left of ttrans is locked at tid or below: the tobj rows
            # of any other ttid are unfinished (as in drop_unfinished)
            conn.execute(_TRUNCATE_TTRANS, (tid,))
            candidates += [row[0] for row in conn.execute(_UNFINISHED_DATA_IDS)]
            conn.execute(_DROP_UNFINISHED_TOBJ)
            conn.execute(_DROP_UNFINISHED_TPACK)
            conn.execute(_TRUNCATE_PACK, (tid,))
            self._prune(candidates)
            conn.execute(_TRUNCATE_REPLICATION_TRANS, (tid + 1, tid + 1))
            conn.execute(_TRUNCATE_REPLICATION_OBJ, (tid + 1, tid + 1))
            self._set_config(self.CONFIG_TRUNCATE_TID, None)

    def drop_partition(self, partition: int, length: int) -> bool:
        with self._txn(durable=False) as conn:
            rows = conn.execute(_PARTITION_OBJ_CHUNK, (partition, length)).fetchall()
            conn.executemany(_DEL_OBJ, [(partition, oid, tid) for oid, tid, _ in rows])
            self._prune(data_id for _, _, data_id in rows if data_id is not None)
            tids = conn.execute(_PARTITION_TRANS_CHUNK, (partition, length)).fetchall()
            conn.executemany(_DEL_TRANS, [(partition, tid) for (tid,) in tids])
        return len(rows) == length or len(tids) == length

    # -- replica checks -----------------------------------------------------------

    def check_tid_range(self, partition: int, length: int, min_tid: int, max_tid: int
                        ) -> tuple[int, bytes, int]:
        digest = hashlib.sha1()
        count, last = 0, min_tid
        pack = _U64.pack
        for tid, packed, oids, user, description, ext in self.connection.execute(
                _CHECK_TRANS, (partition, min_tid, max_tid, length)):
            count += 1
            last = tid
            digest.update(pack(tid))
            for blob in (oids, user, description, ext):
                digest.update(pack(len(blob)))
                digest.update(blob)
            digest.update(b'\1' if packed else b'\0')
        return count, (digest.digest() if count else ZERO_HASH), last

    def check_serial_range(self, partition: int, length: int, min_tid: int, max_tid: int,
                           min_oid: int) -> tuple[int, bytes, int, bytes, int]:
        tid_digest, oid_digest = hashlib.sha1(), hashlib.sha1()
        count, last_tid, last_oid = 0, min_tid, min_oid
        pack = _U64.pack
        for tid, oid, value_tid, checksum in self.connection.execute(
                _CHECK_OBJ, (partition, min_tid, min_oid, max_tid, length)):
            count += 1
            last_tid, last_oid = tid, oid
            tid_digest.update(pack(tid))
            oid_digest.update(pack(oid))
            oid_digest.update(checksum or ZERO_HASH)
            oid_digest.update(pack(value_tid or 0))
        if not count:
            return 0, ZERO_HASH, min_tid, ZERO_HASH, min_oid
        return count, tid_digest.digest(), last_tid, oid_digest.digest(), last_oid
