"""Replication and replica checks of ``SQLiteBackend`` (a mixin): chunks
read from a source and written to a destination, replication points,
truncation, dropping partitions, and the digests compared by the
checker."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence

from neozodb.protocol.blobs import BLOB_FLAG

from .base import ZERO_HASH, ReplicatedObject, ReplicatedTransaction
from .sqlite_schema import (
    _ADD_OBJ,
    _ADD_TRANS,
    _BLOB_ROWS,
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
    _FLOOR_STEP,
    _GET_REPLICATION,
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

# A chunk is read and written with a few set-based statements instead of
# several per record: per-record statements (and their savepoints) were most
# of a destination's time.
_FETCH_OBJ_RANGE = (
    "SELECT o.tid, o.oid, o.value_tid, d.compression, d.hash, d.value"
    " FROM obj AS o LEFT JOIN data AS d ON d.id = o.data_id"
    " WHERE o.partition=? AND (o.tid, o.oid)>=(?, ?) AND (o.tid, o.oid)<=(?, ?)"
    " ORDER BY o.tid, o.oid")
_OBJ_RANGE_DATA_IDS = (
    "SELECT oid, tid, data_id FROM obj"
    " WHERE partition=? AND (tid, oid)>=(?, ?) AND (tid, oid)<=(?, ?)")
_OBJ_RANGE_COUNT = ("SELECT COUNT(*) FROM obj"
                    " WHERE partition=? AND (tid, oid)>=(?, ?) AND (tid, oid)<=(?, ?)")
#: Hashes per ``_find_data_sql`` statement; a shorter batch is padded by
#: repeating its last hash, so that one prepared statement serves them all.
_FIND_BATCH = 200
_FIND_DATA_IN = ("SELECT id, hash, compression, value FROM data WHERE hash IN (%s)"
                 % ", ".join("?" * _FIND_BATCH))
_FIND_BLOB_DATA_IN = _FIND_DATA_IN + " AND " + _BLOB_ROWS
#: Below this share of a range's revisions, ``fetch_objects`` reads the
#: wanted ones one by one rather than the whole range.
_DENSE = 0.5


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

    def fetch_objects(self, partition: int, keys: Sequence[tuple[int, int]]
                      ) -> Iterator[ReplicatedObject]:
        if not keys:
            return
        first, last = keys[0], keys[-1]
        conn = self.connection
        # one range scan when most of the range is wanted (a destination
        # that lacks everything), one lookup per key otherwise
        span = conn.execute(_OBJ_RANGE_COUNT, (partition, *first, *last)).fetchone()[0]
        if len(keys) < span * _DENSE:
            yield from super().fetch_objects(partition, keys)
            return
        wanted = set(keys)
        for tid, oid, value_tid, compression, checksum, data in conn.execute(
                _FETCH_OBJ_RANGE, (partition, *first, *last)):
            if (tid, oid) in wanted:
                if checksum is None:
                    yield oid, tid, 0, ZERO_HASH, b'', None
                else:
                    yield oid, tid, compression, checksum, data, value_tid

    def add_transactions(self, records: Sequence[ReplicatedTransaction]) -> None:
        np = self._partitions()
        with self._txn(durable=False):
            self._insert_many(_ADD_TRANS, [
                (tid % np, tid, bool(packed), _pack_oids(oids), user, description, ext, ttid)
                for tid, oids, user, description, ext, packed, ttid in records])

    def add_objects(self, partition: int, records: Sequence[ReplicatedObject]) -> None:
        if not records:
            return
        np = self._partitions()
        if any(oid % np != partition for oid, *_ in records):
            raise ValueError('object of another partition than %d' % partition)
        with self._txn(durable=False) as conn:
            keys = sorted((tid, oid) for oid, tid, *_ in records)
            # rows replaced (e.g. leftovers of a discarded cell): their data
            # may be left unreferenced
            old = {(tid, oid): data_id for oid, tid, data_id in conn.execute(
                _OBJ_RANGE_DATA_IDS, (partition, *keys[0], *keys[-1]))}
            data_ids = self._data_ids(conn, records)
            rows = []
            replaced = []
            for (oid, tid, _, _, _, data_serial), data_id in zip(records, data_ids, strict=True):
                rows.append((partition, oid, tid, data_id, data_serial))
                previous = old.get((tid, oid))
                if previous is not None and previous != data_id:
                    replaced.append(previous)
            rows.sort()  # primary key order
            self._insert_many(_ADD_OBJ, rows)
            if replaced:
                self._prune(replaced)

    def _data_ids(self, conn, records: Sequence[ReplicatedObject]) -> list[int | None]:
        """Data row of each record (None for a deletion): an identical row
        if there is one, a new one otherwise, inserted with ids allocated
        here (no id is ever reused: AUTOINCREMENT's sequence counts too)."""
        values = {}
        for _, _, compression, checksum, data, _ in records:
            if not (checksum == ZERO_HASH and not data):
                values[(checksum, compression, data)] = None
        # without deduplication only blob revisions are looked for
        hashes = list({checksum for checksum, compression, _ in values
                       if self.deduplicates or compression & BLOB_FLAG})
        for data_id, checksum, compression, data in self._data_rows(conn, hashes):
            key = (checksum, compression, data)
            if key in values and values[key] is None:
                values[key] = data_id
        new = [key for key, data_id in values.items() if data_id is None]
        if new:
            values.update(zip(new, self._insert_data(new), strict=True))
        return [None if checksum == ZERO_HASH and not data else values[(checksum, compression, data)]
                for _, _, compression, checksum, data, _ in records]

    def _data_rows(self, conn, hashes: list[bytes]) -> Iterator[tuple[int, bytes, int, bytes]]:
        """(id, hash, compression, value) of the data rows with these hashes
        (without deduplication, blob revisions' only)."""
        query = _FIND_DATA_IN if self.deduplicates else _FIND_BLOB_DATA_IN
        for i in range(0, len(hashes), _FIND_BATCH):
            batch = hashes[i:i + _FIND_BATCH]
            batch += batch[-1:] * (_FIND_BATCH - len(batch))
            yield from conn.execute(query, batch)

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
                data_id = self._find_or_insert_data(checksum, compression, data)[0]
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

    def set_replication(self, partition: int, point: tuple[int, int, int] | None,
                        durable: bool = True) -> None:
        # not durable: the point joins the pending transaction that holds
        # the rows it covers, and is committed with them or not at all
        with self._txn(durable=durable) as conn:
            if point is None:
                conn.execute(_DEL_REPLICATION, (partition,))
            else:
                conn.execute(_SET_REPLICATION, (partition, *point))
            if durable:
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
