"""Writes and two-phase commit of ``MariaDBBackend`` (a mixin): data rows
(ids allocated per partition, big values in ``bigdata``) and their
in-memory holds, store (vote), lock, unlock and abort of transactions, and
unfinished transactions and orphan data after a restart."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from . import mariadb_schema as S
from .base import ZERO_HASH, PackRequest, TransactionMetadata
from .mariadb_blobs import COLUMN_BLOB, DEL_CONTENT, column_compression


class MariaDBWrites:
    """Writes and two-phase commit of ``MariaDBBackend``."""

    # -- data rows ------------------------------------------------------------------

    def _new_data_id(self, partition: int) -> int:
        """Next data id of ``partition``: ``(partition << 48) + n``, as NEO
        allocates them (continuing after the greatest one)."""
        next_id = self._next_data_id.get(partition)
        if next_id is None:
            low = partition << 48
            last = self._scalar(S.DATA_LAST_ID, (low, low + (1 << 48)))
            next_id = low if last is None else last + 1
        self._next_data_id[partition] = next_id + 1
        return next_id

    def _find_data(self, checksum: bytes, compression: int, data: bytes) -> int | None:
        big = len(data) >= S.BIG
        stored = compression | S.BIG_FLAG if big else compression
        for data_id, value in self._q(S.FIND_DATA, (checksum, stored)):
            if big:
                if self._value(stored, value)[1] == data:
                    return data_id
            elif bytes(value) == data:
                return data_id
        return None

    def _insert_data(self, partition: int, checksum: bytes, compression: int,
                     data: bytes) -> int:
        if len(data) >= S.BIG:
            # 8 MiB rows of consecutive ids from the first one's
            first = None
            for offset in range(0, len(data), S.BIG_CHUNK):
                chunk = data[offset:offset + S.BIG_CHUNK]
                if first is None:
                    self._q(S.INSERT_BIGDATA_FIRST, (chunk,))
                    first = self._stmts[S.INSERT_BIGDATA_FIRST].lastrowid
                else:
                    self._q(S.INSERT_BIGDATA, (first + offset // S.BIG_CHUNK, chunk))
            value = S.big_reference(first, len(data))
            compression |= S.BIG_FLAG
        else:
            value = data
        data_id = self._new_data_id(partition)
        self._q(S.INSERT_DATA, (data_id, checksum, compression, value))
        return data_id

    def _data_row(self, partition: int, checksum: bytes, compression: int, data: bytes) -> int:
        """The id of a data row holding ``data`` (a new one unless an
        identical row exists); ``compression`` is the id on the wire."""
        compression = column_compression(compression)
        if len(data) < S.BIG:
            data_id = self._new_data_id(partition)
            self._q(S.INSERT_NEW_DATA, (data_id, checksum, compression, data,
                                        checksum, compression))
            if self._stmts[S.INSERT_NEW_DATA].rowcount == 1:
                return data_id
        data_id = self._find_data(checksum, compression, data)
        if data_id is None:
            data_id = self._insert_data(partition, checksum, compression, data)
        return data_id

    def store_data(self, checksum: bytes, compression: int, data: bytes,
                   oid: int | None = None) -> int:
        if len(checksum) != 20 or checksum == ZERO_HASH:
            raise ValueError('invalid checksum for a data row')
        column_compression(compression)     # ValueError before anything is written
        np = self._np
        partition = 0 if oid is None or not np else oid % np
        if len(data) >= S.BIG:
            # several rows: all or none
            with self._txn(durable=False, keep=False):
                data_id = self._data_row(partition, checksum, compression, data)
        else:
            # one INSERT at most, atomic by itself (and lost at close)
            if self._conn is None:
                raise RuntimeError('backend is not open')
            data_id = self._data_row(partition, checksum, compression, data)
        self._held[data_id] += 1
        return data_id

    # a burst of stores takes its data rows in two round trips (storage/writes.py)
    batched_data = True

    def store_data_many(self, items: list[tuple[bytes, int, bytes, int]]) -> list[int]:
        for checksum, compression, _, _ in items:
            if len(checksum) != 20 or checksum == ZERO_HASH:
                raise ValueError('invalid checksum for a data row')
            column_compression(compression)  # ValueError before anything is written
        if self._conn is None:
            raise RuntimeError('backend is not open')
        if any(len(data) >= S.BIG for _, _, data, _ in items):
            with self._txn(durable=False, keep=False):  # several rows each: all or none
                ids = self._data_rows(items)
        else:
            ids = self._data_rows(items)  # one bulk insert: atomic by itself
        held = self._held
        for data_id in ids:
            held[data_id] += 1
        return ids

    def _data_rows(self, items: Sequence[tuple[bytes, int, bytes, int | None]]) -> list[int]:
        """``_data_row`` for each (checksum, compression, data, oid): values
        under 16 MiB looked up with one statement per 250 checksums and the
        new ones inserted with one bulk statement, bigger ones one at a
        time (the caller makes their several rows all or none)."""
        ids: list = [None] * len(items)
        small = [i for i, item in enumerate(items) if len(item[2]) < S.BIG]
        if small:
            found = {}
            hashes = sorted({items[i][0] for i in small})
            for n in range(0, len(hashes), S.IN_CHUNK):
                chunk = hashes[n:n + S.IN_CHUNK]
                for data_id, checksum, stored, value in self._q(
                        S.FIND_DATA_ANY % ','.join('?' * len(chunk)), chunk):
                    found.setdefault((bytes(checksum), stored, bytes(value)), data_id)
            np = self._np
            new = []
            for i in small:
                checksum, compression, data, oid = items[i]
                key = (checksum, column_compression(compression), data)
                data_id = found.get(key)
                if data_id is None:
                    partition = 0 if oid is None or not np else oid % np
                    data_id = found[key] = self._new_data_id(partition)
                    new.append((data_id, *key))
                ids[i] = data_id
            self._many(S.INSERT_DATA, new)
        np = self._np
        for i, (checksum, compression, data, oid) in enumerate(items):
            if ids[i] is None:
                partition = 0 if oid is None or not np else oid % np
                ids[i] = self._data_row(partition, checksum, compression, data)
        return ids

    def hold_data(self, data_id: int) -> None:
        self._held[data_id] += 1

    def _release(self, data_ids: Iterable[int]) -> None:
        held = self._held
        for data_id in data_ids:
            count = held.get(data_id)
            if count is not None:
                if count > 1:
                    held[data_id] = count - 1
                else:
                    del held[data_id]

    def _prune(self, candidates: Iterable[int]) -> int:
        """Delete the candidate data rows that nothing references (and
        their bigdata rows and blob contents); inside an operation."""
        candidates = [d for d in set(candidates) if d not in self._held]
        if not candidates:
            return 0
        in_tobj = {row[0] for row in self._q(S.TOBJ_DATA_IDS)}
        count = 0
        for data_id in sorted(candidates):
            if data_id in in_tobj or self._q(S.DATA_IN_OBJ, (data_id,)):
                continue
            kind = self._q(S.DATA_KIND, (data_id,))
            if kind:
                compression, big = kind[0]
                if big is not None:
                    first, end, _ = S.big_ids(bytes(big))
                    self._q(S.DEL_BIGDATA, (first, end))
                if compression is not None and compression & COLUMN_BLOB:
                    self._q(DEL_CONTENT, (data_id,))
            self._q(S.DEL_DATA, (data_id,))
            count += 1
        return count

    def release_data(self, data_ids: Iterable[int], prune: bool = False) -> None:
        data_ids = list(data_ids)
        self._release(data_ids)
        if prune:
            with self._txn(durable=False):
                self._prune(data_ids)

    # -- two-phase commit ---------------------------------------------------------------

    def store_transaction(self, ttid: int,
                          objects: Iterable[tuple[int, int | None, int | None]],
                          txn: TransactionMetadata | None,
                          pack: PackRequest | None = None, durable: bool = True) -> None:
        np = self._partitions()
        rows = [(oid % np, oid, ttid, data_id, value_tid)
                for oid, data_id, value_tid in objects]
        with self._txn(durable=durable):
            self._many(S.INSERT_TOBJ, rows)
            if txn is not None:
                oids, user, description, ext, packed = txn
                self._q(S.INSERT_TTRANS, (ttid % np, bool(packed), S.pack_oids(oids),
                                          user, description, ext, ttid))
                if pack is not None:
                    partial, pack_oids, pack_tid, gc = pack
                    self._q(S.INSERT_VOTED_PACK, (
                        ttid, bool(partial),
                        None if pack_oids is None else S.pack_oids(pack_oids), pack_tid))
                    if gc:
                        self._set_config(S.KEY_GC % ttid, '1')
        if txn is not None and pack is not None:
            self._voted_packs().add(ttid)
        # tobj references them now (durably, or in the same transaction,
        # which a crash loses whole)
        self._release(row[3] for row in rows if row[3] is not None)

    def lock_transaction(self, ttid: int, tid: int, pack_approved: bool = False) -> None:
        if pack_approved:
            with self._txn(durable=True):
                self._q(S.LOCK, (tid, ttid))
                self._q(S.APPROVE_PACK, (ttid,))
            return
        # one statement, atomic by itself: no savepoint for the pending writes
        self._q(S.LOCK, (tid, ttid))
        self._commit()

    def unlock_transaction(self, ttid: int, tid: int) -> None:
        packs = self._voted_packs()     # (read before ttrans changes)
        with self._txn(durable=False):
            self._q(S.MOVE_TRANS, (tid, ttid))
            self._q(S.DEL_TTRANS, (ttid,))
            self._q(S.MOVE_OBJ, (tid, ttid))
            self._q(S.DEL_TOBJ, (ttid,))
            if ttid in packs and ttid != tid:
                self._q(S.DEL_PACK, (tid,))
                self._q(S.MOVE_PACK, (tid, ttid))
                if self.get_config(S.KEY_GC % ttid) is not None:
                    self._set_config(S.KEY_GC % ttid, None)
                    self._set_config(S.KEY_GC % tid, '1')
        packs.discard(ttid)

    def abort_transaction(self, ttid: int, data_ids: Iterable[int] = ()) -> None:
        data_ids = list(data_ids)
        self._release(data_ids)
        with self._txn(durable=False):
            # a client may send any 8 bytes as its TTID: one beyond the
            # column never got a row
            if 0 <= ttid < 1 << 64:
                data_ids += [row[0] for row in self._q(S.TOBJ_DATA_IDS_OF, (ttid,))]
                self._forget_pack(ttid)
                self._q(S.DEL_TTRANS, (ttid,))
                self._q(S.DEL_TOBJ, (ttid,))
            self._prune(data_ids)

    def _voted_packs(self) -> set[int]:
        """Ttids of the voted transactions that carry a pack order (kept in
        ``pack`` under their ttid until unlocked): read once."""
        if self._voted_pack_ttids is None:
            self._voted_pack_ttids = {row[0] for row in self._q(S.VOTED_PACK_TTIDS)}
        return self._voted_pack_ttids

    def _forget_pack(self, ttid: int) -> None:
        """The pack order a voted transaction carried, if any."""
        packs = self._voted_packs()
        if ttid in packs:
            self._q(S.DEL_PACK, (ttid,))
            if self.get_config(S.KEY_GC % ttid) is not None:
                self._set_config(S.KEY_GC % ttid, None)
            packs.discard(ttid)   # (read again if the operation fails: _txn)

    def drop_unfinished(self) -> None:
        with self._txn(durable=True):
            candidates: list[int] = []
            for (ttid,) in self._q(S.UNLOCKED_TTIDS):
                self._forget_pack(ttid)
            self._q(S.DROP_UNFINISHED_TTRANS)
            for (ttid,) in self._q(S.UNFINISHED_TOBJ):
                candidates += [row[0] for row in self._q(S.TOBJ_DATA_IDS_OF, (ttid,))]
                self._q(S.DEL_TOBJ, (ttid,))
            # rows stored before a crash for transactions that never voted,
            # and deletions NEO deferred (todel): referenced by nothing
            candidates += [row[0] for row in self._q(S.ORPHANS)]
            candidates += [row[0] for row in self._q(S.TODEL)]
            self._q(S.CLEAR_TODEL)
            self._prune(candidates)

    def prune_orphans(self) -> int:
        with self._txn(durable=False):
            count = self._prune([row[0] for row in self._q(S.ORPHANS)])
        return count

    def get_locked_transactions(self) -> dict[int, int | None]:
        locked: dict[int, int | None] = {ttid: None for (ttid,) in self._q(S.GET_TOBJ_TTIDS)}
        locked.update(self._q(S.GET_TTRANS))
        return locked

    def get_final_tid(self, ttid: int) -> int | None:
        np = self._np
        if np is not None:
            rows = self._q(S.FINAL_TID, (ttid % np, ttid, ttid))
            if rows:
                return rows[0][0]
        return self._scalar(S.LOCKED_TTID, (ttid,))
