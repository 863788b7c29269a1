"""Replication, replica checks and truncation of ``MariaDBBackend`` (a
mixin).

Resume points: NEO keeps one tid per OUT_OF_DATE cell of its own in
``pt.tid`` (replicated up to it); neozodb resumes transactions and object
revisions separately, so the exact point is a ``neozodb.replication.P``
configuration key holding it and the ``pt.tid`` written with it, and
``pt.tid`` is kept at the point's lower bound for NEO.  When ``pt.tid`` no
longer is what the key says (NEO ran on the database since), ``pt.tid``
is the truth.  The digests compared by checks are the SQLite backend's,
so that replicas on either backend compare equal."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from . import mariadb_schema as S
from .base import ZERO_HASH, ReplicatedObject, ReplicatedTransaction


class MariaDBReplication:
    """Replication, checks and truncation of ``MariaDBBackend``."""

    # -- reads of a source ----------------------------------------------------------

    def fetch_tids(self, partition: int, length: int, min_tid: int, max_tid: int) -> list[int]:
        return [row[0] for row in self._q(S.TIDS_FROM, (partition, min_tid, max_tid, length))]

    def fetch_object_keys(self, partition: int, length: int, min_tid: int, max_tid: int,
                          min_oid: int) -> list[tuple[int, int]]:
        return [(tid, oid) for tid, oid in self._q(
            S.FETCH_OBJ_KEYS, (partition, min_tid, min_tid, min_oid, max_tid, length))]

    def fetch_object(self, oid: int, tid: int) -> tuple[int, bytes, bytes, int | None] | None:
        rows = self._q(S.FETCH_OBJ, (oid % self._partitions(), oid, tid))
        if not rows:
            return None
        value_tid, compression, checksum, value = rows[0]
        if checksum is None:
            return 0, ZERO_HASH, b'', None
        compression, data = self._value(compression, value)
        return compression, bytes(checksum), data, value_tid

    # -- writes of a destination ------------------------------------------------------

    def add_transactions(self, records: Sequence[ReplicatedTransaction]) -> None:
        np = self._partitions()
        with self._txn(durable=False):
            self._many(S.ADD_TRANS, [
                (tid % np, tid, bool(packed), S.pack_oids(oids), user, description, ext, ttid)
                for tid, oids, user, description, ext, packed, ttid in records])

    def add_transaction(self, tid: int, oids: Sequence[int], user: bytes, description: bytes,
                        ext: bytes, packed: bool, ttid: int) -> None:
        self.add_transactions([(tid, oids, user, description, ext, packed, ttid)])

    def add_objects(self, partition: int, records: Sequence[ReplicatedObject]) -> None:
        if not records:
            return
        np = self._partitions()
        if any(oid % np != partition for oid, *_ in records):
            raise ValueError('object of another partition than %d' % partition)
        with self._txn(durable=False):
            olds = self._replaced_rows(partition, records)
            values = [(checksum, compression, data, oid)
                      for oid, _, compression, checksum, data, _ in records
                      if not (checksum == ZERO_HASH and not data)]
            data_ids = iter(self._data_rows(values))
            replaced = []
            rows = []
            for oid, tid, _, checksum, data, data_serial in records:
                data_id = None if checksum == ZERO_HASH and not data else next(data_ids)
                rows.append((partition, oid, tid, data_id, data_serial))
                old = olds.get((oid, tid))
                if old is not None and old != data_id:
                    replaced.append(old)
            self._many(S.ADD_OBJ, rows)
            if replaced:
                self._prune(replaced)

    def _replaced_rows(self, partition: int, records: Sequence[ReplicatedObject]
                       ) -> dict[tuple[int, int], int]:
        """(oid, tid) -> data id of the revisions of ``records`` already
        here with data (one statement per 250 oids)."""
        wanted = {(oid, tid) for oid, tid, *_ in records}
        oids = sorted({oid for oid, _ in wanted})
        tids = [tid for _, tid in wanted]
        low, high = min(tids), max(tids)
        found = {}
        for n in range(0, len(oids), S.IN_CHUNK):
            chunk = oids[n:n + S.IN_CHUNK]
            for oid, tid, data_id in self._q(
                    S.OBJ_DATA_IDS % ','.join('?' * len(chunk)), [partition, low, high, *chunk]):
                if data_id is not None and (oid, tid) in wanted:
                    found[oid, tid] = data_id
        return found

    def add_object(self, oid: int, tid: int, compression: int, checksum: bytes, data: bytes,
                   data_serial: int | None) -> None:
        self.add_objects(oid % self._partitions(),
                         [(oid, tid, compression, checksum, data, data_serial)])

    def delete_transactions(self, partition: int, tids: Iterable[int]) -> None:
        tids = list(tids)
        with self._txn(durable=False):
            self._many(S.DEL_TRANS, [(partition, tid) for tid in tids])
            for tid in tids:
                self._delete_pack_order(tid)

    def delete_objects(self, partition: int, keys: Iterable[tuple[int, int]]) -> None:
        with self._txn(durable=False):
            candidates = []
            for tid, oid in keys:
                rows = self._q(S.OBJ_DATA_ID, (partition, oid, tid))
                if rows:
                    self._q(S.DEL_OBJ, (partition, oid, tid))
                    if rows[0][0] is not None:
                        candidates.append(rows[0][0])
            self._prune(candidates)

    # -- resume points -------------------------------------------------------------------

    def _replication_key(self, partition: int) -> tuple[int, int, int, int] | None:
        value = self.get_config(S.KEY_REPLICATION % partition)
        if value is None:
            return None
        next_tid, obj_tid, obj_oid, mirror = map(int, value.split())
        return next_tid, obj_tid, obj_oid, mirror

    def _replication_mirror(self, partition: int) -> int:
        """pt.tid of this node's OUT_OF_DATE cell of ``partition``."""
        key = self._replication_key(partition)
        return 0 if key is None else key[3]

    def get_replication(self, partition: int) -> tuple[int, int, int] | None:
        key = self._replication_key(partition)
        cell = self._own_cell(partition)
        replicated = cell[0] if cell is not None and cell[0] >= 0 else None
        if key is not None and (replicated is None or replicated == key[3]):
            return key[:3]
        if replicated is not None:
            if replicated:      # NEO's: everything up to that tid is here
                return replicated + 1, replicated + 1, 0
            if self.last_tid_of(partition) is not None:
                return 0, 0, 0  # a partial copy NEO left: compared from the start
        return None

    def _write_replication(self, partition: int, point: tuple[int, int, int] | None) -> None:
        if point is None:
            self._set_config(S.KEY_REPLICATION % partition, None)
            return
        next_tid, obj_tid, obj_oid = map(int, point)
        mirror = max(0, min(next_tid, obj_tid) - 1)
        self._set_config(S.KEY_REPLICATION % partition,
                         f'{next_tid} {obj_tid} {obj_oid} {mirror}')
        own = self._own_nid()
        if own is not None:
            self._q(S.SET_CELL_TID, (mirror, partition, own))

    def set_replication(self, partition: int, point: tuple[int, int, int] | None,
                        durable: bool = True) -> None:
        # not durable: the point joins the pending writes it covers
        with self._txn(durable=durable):
            self._write_replication(partition, point)

    def last_tid_of(self, partition: int) -> int | None:
        tids = [self._scalar(sql, (partition,)) for sql in (S.MAX_TRANS_TID, S.MAX_OBJ_TID)]
        return max((t for t in tids if t is not None), default=None)

    # -- truncation and dropping -------------------------------------------------------

    def truncate(self, tid: int) -> None:
        tid = int(tid)
        np = self._np or 0
        with self._txn(durable=True):
            candidates: list[int] = []
            for p in range(np):
                candidates += [row[0] for row in self._q(S.TRUNCATE_DATA_IDS, (p, tid))]
                self._q(S.TRUNCATE_OBJ, (p, tid))
                self._q(S.TRUNCATE_TRANS, (p, tid))
            # what is left of ttrans is locked at tid or below: the tobj
            # rows of any other ttid are unfinished
            for (ttid,) in self._q(S.TRUNCATE_TTRANS_TTIDS, (tid,)):
                self._forget_pack(ttid)
                self._q(S.DEL_TTRANS, (ttid,))
            for (ttid,) in self._q(S.UNFINISHED_TOBJ):
                candidates += [row[0] for row in self._q(S.TOBJ_DATA_IDS_OF, (ttid,))]
                self._q(S.DEL_TOBJ, (ttid,))
            for (pack_tid,) in self._q(S.TRUNCATE_PACK, (tid,)):
                self._delete_pack_order(pack_tid)
            self._prune(candidates)
            for p in range(np):
                key = self._replication_key(p)
                if key is not None:
                    next_tid, obj_tid, obj_oid, _ = key
                    if next_tid > tid + 1:
                        next_tid = tid + 1
                    if (obj_tid, obj_oid) > (tid + 1, 0):
                        obj_tid, obj_oid = tid + 1, 0
                    self._write_replication(p, (next_tid, obj_tid, obj_oid))
            self._q(S.TRUNCATE_CELL_TIDS, (tid, tid))
            self._set_config(self.CONFIG_TRUNCATE_TID, None)

    def drop_partition(self, partition: int, length: int) -> bool:
        with self._txn(durable=False):
            rows = self._q(S.PARTITION_OBJ_CHUNK, (partition, length))
            self._many(S.DEL_OBJ, [(partition, oid, tid) for oid, tid, _ in rows])
            self._prune(data_id for _, _, data_id in rows if data_id is not None)
            tids = self._q(S.PARTITION_TRANS_CHUNK, (partition, length))
            self._many(S.DEL_TRANS, [(partition, tid) for (tid,) in tids])
        return len(rows) == length or len(tids) == length

    # -- replica checks -----------------------------------------------------------------

    def check_tid_range(self, partition: int, length: int, min_tid: int, max_tid: int
                        ) -> tuple[int, bytes, int]:
        digest = hashlib.sha1()
        count, last = 0, min_tid
        pack = S._U64.pack
        for tid, packed, oids, user, description, ext in self._q(
                S.CHECK_TRANS, (partition, min_tid, max_tid, length)):
            count += 1
            last = tid
            digest.update(pack(tid))
            for blob in (oids, user, description, ext):
                blob = bytes(blob)
                digest.update(pack(len(blob)))
                digest.update(blob)
            digest.update(b'\1' if packed else b'\0')
        return count, (digest.digest() if count else ZERO_HASH), last

    def check_serial_range(self, partition: int, length: int, min_tid: int, max_tid: int,
                           min_oid: int) -> tuple[int, bytes, int, bytes, int]:
        tid_digest, oid_digest = hashlib.sha1(), hashlib.sha1()
        count, last_tid, last_oid = 0, min_tid, min_oid
        pack = S._U64.pack
        for tid, oid, value_tid, checksum in self._q(
                S.CHECK_OBJ, (partition, min_tid, min_tid, min_oid, max_tid, length)):
            count += 1
            last_tid, last_oid = tid, oid
            tid_digest.update(pack(tid))
            oid_digest.update(pack(oid))
            oid_digest.update(bytes(checksum) if checksum is not None else ZERO_HASH)
            oid_digest.update(pack(value_tid or 0))
        if not count:
            return 0, ZERO_HASH, min_tid, ZERO_HASH, min_oid
        return count, tid_digest.digest(), last_tid, oid_digest.digest(), last_oid
