"""Writes and two-phase commit of ``SQLiteBackend`` (a mixin): data rows
and their in-memory holds, store (vote), lock, unlock and abort of
transactions, unfinished transactions after a restart, and the orphan
floor that bounds the scan for unreferenced data rows."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from neozodb.protocol.blobs import BLOB_FLAG

from .base import ZERO_HASH, PackRequest, TransactionMetadata
from .sqlite_schema import (
    _APPROVE_TPACK,
    _CONFIG_ORPHAN_FLOOR,
    _DATA_IN_OBJ,
    _DATA_NOT_IN_OBJ,
    _DATA_SEQ,
    _DEL_DATA,
    _DEL_TOBJ,
    _DEL_TPACK,
    _DEL_TTRANS,
    _DROP_UNFINISHED_TOBJ,
    _DROP_UNFINISHED_TPACK,
    _DROP_UNFINISHED_TTRANS,
    _FINAL_TID,
    _FIND_BLOB_DATA,
    _FIND_DATA,
    _FLOOR_STEP,
    _GET_TOBJ_TTIDS,
    _GET_TTRANS,
    _INSERT_DATA,
    _INSERT_DATA_ID,
    _INSERT_TOBJ,
    _INSERT_TPACK,
    _INSERT_TTRANS,
    _LOCK,
    _LOCKED_TTID,
    _MAX_DATA_ID,
    _MOVE_OBJ,
    _MOVE_PACK,
    _MOVE_TRANS,
    _TOBJ_DATA_IDS,
    _TOBJ_DATA_IDS_OF,
    _TPACK_TTIDS,
    _UNFINISHED_DATA_IDS,
    _pack_oids,
)


class SQLiteWrites:
    """Writes and two-phase commit of ``SQLiteBackend``."""

    # ttids that may have a tpack row (None: not read yet).  Pack orders are
    # rare: without this, every unlock ran two statements on tpack for
    # nothing.  A ttid too many costs those statements; one missing would
    # lose its order, so every insert adds to it and it is read again from
    # the table whenever unfinished transactions are dropped.
    _tpack_ttids: set[int] | None = None

    # -- writes and two-phase commit -------------------------------------------

    def store_data(self, checksum: bytes, compression: int, data: bytes,
                   oid: int | None = None) -> int:
        if len(checksum) != 20 or checksum == ZERO_HASH:
            raise ValueError('invalid checksum for a data row')
        self._begin()
        data_id, inserted = self._find_or_insert_data(checksum, compression, data)
        if inserted:
            self._data_added += 1
        self._held[data_id] += 1
        return data_id

    def _insert_many(self, sql: str, rows: list[tuple]) -> None:
        """The one-row INSERT ``sql`` for each of ``rows``, in order (a
        database server's connection sends them as one statement;
        SQLiteBackend, 100 rows per statement)."""
        self._conn.executemany(sql, rows)

    def _new_data_ids(self, conn, count: int) -> range:
        """``count`` data ids never used: after the greatest one ever
        allocated (AUTOINCREMENT's sequence counts the deleted ones too;
        rows inserted with an explicit id move it on)."""
        seq = conn.execute(_DATA_SEQ).fetchone()
        next_id = max(self._scalar(_MAX_DATA_ID, ()) or 0, seq[0] if seq else 0) + 1
        return range(next_id, next_id + count)

    def _insert_data(self, values: list[tuple[bytes, int, bytes]]) -> Sequence[int]:
        """New data rows, (checksum, compression, data) each, under ids
        never used; their ids, in order.  Not held (callers decide)."""
        ids = self._new_data_ids(self._conn, len(values))
        self._insert_many(_INSERT_DATA_ID, [
            (data_id, *value) for data_id, value in zip(ids, values, strict=True)])
        return ids

    def _find_or_insert_data(self, checksum: bytes, compression: int, data: bytes
                             ) -> tuple[int, bool]:
        """(id of an identical data row or of a new one, whether it is new)."""
        conn = self._conn
        params = (checksum, compression, data)
        if self.deduplicates or compression & BLOB_FLAG:
            row = conn.execute(_FIND_DATA if self.deduplicates else _FIND_BLOB_DATA,
                               params).fetchone()
            if row is not None:
                return row[0], False
        return conn.execute(_INSERT_DATA, params).lastrowid, True

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
        """Delete candidate data rows that nothing references; must run
        inside a write transaction."""
        candidates = [d for d in set(candidates) if d not in self._held]
        if not candidates:
            return 0
        return self._delete_orphans(candidates)

    def _delete_orphans(self, candidates: list[int]) -> int:
        """Delete the data rows of ``candidates`` that no obj/tobj row
        references; how many."""
        conn = self._conn
        # tobj holds only unfinished transactions: read its references once.
        in_tobj = {row[0] for row in conn.execute(_TOBJ_DATA_IDS)}
        orphans = [(d,) for d in candidates
                   if d not in in_tobj and conn.execute(_DATA_IN_OBJ, (d,)).fetchone() is None]
        conn.executemany(_DEL_DATA, orphans)
        return len(orphans)

    def release_data(self, data_ids: Iterable[int], prune: bool = False) -> None:
        data_ids = list(data_ids)
        self._release(data_ids)
        if prune:
            with self._txn(durable=False):
                self._prune(data_ids)

    def store_transaction(self, ttid: int,
                          objects: Iterable[tuple[int, int | None, int | None]],
                          txn: TransactionMetadata | None,
                          pack: PackRequest | None = None, durable: bool = True) -> None:
        np = self._partitions()
        rows = [(oid % np, oid, ttid, data_id, value_tid)
                for oid, data_id, value_tid in objects]
        with self._txn(durable=durable) as conn:
            self._insert_many(_INSERT_TOBJ, rows)
            if txn is not None:
                oids, user, description, ext, packed = txn
                conn.execute(_INSERT_TTRANS, (ttid % np, bool(packed), _pack_oids(oids),
                                              user, description, ext, ttid))
                if pack is not None:
                    self._with_pack_order(ttid)
                    partial, pack_oids, pack_tid, gc = pack
                    conn.execute(_INSERT_TPACK, (
                        ttid, bool(partial), None if pack_oids is None else _pack_oids(pack_oids),
                        pack_tid, bool(gc)))
            self._advance_floor(_FLOOR_STEP)
        # Only now that tobj references them (durably, or in the same pending
        # SQLite transaction, which a crash loses whole) are the holds useless.
        self._release(row[3] for row in rows if row[3] is not None)

    def lock_transaction(self, ttid: int, tid: int, pack_approved: bool = False) -> None:
        if pack_approved:
            with self._txn(durable=True) as conn:
                conn.execute(_LOCK, (tid, ttid))
                conn.execute(_APPROVE_TPACK, (ttid,))
            return
        # one statement, atomic by itself: no savepoint needed to keep the
        # pending writes if it fails
        self._begin()
        self._conn.execute(_LOCK, (tid, ttid))
        self._commit()

    def lock_bulk(self, ttids: list[int]) -> None:
        self._begin()
        self._conn.executemany(_LOCK, [(ttid, ttid) for ttid in ttids])
        self._commit()

    def unlock_transaction(self, ttid: int, tid: int) -> None:
        with self._txn(durable=False) as conn:
            conn.execute(_MOVE_TRANS, (tid, ttid))
            conn.execute(_DEL_TTRANS, (ttid,))
            conn.execute(_MOVE_OBJ, (tid, ttid))
            conn.execute(_DEL_TOBJ, (ttid,))
            if ttid in self._with_pack_order():
                conn.execute(_MOVE_PACK, (tid, ttid))
                conn.execute(_DEL_TPACK, (ttid,))
                self._tpack_ttids.discard(ttid)

    def _with_pack_order(self, ttid: int | None = None) -> set[int]:
        """``_tpack_ttids``, read if needed, with ``ttid`` added."""
        ttids = self._tpack_ttids
        if ttids is None:
            ttids = self._tpack_ttids = {row[0] for row in self._conn.execute(_TPACK_TTIDS)}
        if ttid is not None:
            ttids.add(ttid)
        return ttids

    def abort_transaction(self, ttid: int, data_ids: Iterable[int] = ()) -> None:
        data_ids = list(data_ids)
        self._release(data_ids)
        with self._txn(durable=False) as conn:
            # A client may send any 8 bytes as its TTID; one beyond SQLite's
            # integers never got a row (its vote failed), and the abort runs
            # when the client is gone: raising here took the storage out.
            if ttid < 1 << 63:
                data_ids += [row[0] for row in conn.execute(_TOBJ_DATA_IDS_OF, (ttid,))]
                conn.execute(_DEL_TTRANS, (ttid,))
                conn.execute(_DEL_TOBJ, (ttid,))
                conn.execute(_DEL_TPACK, (ttid,))
            self._prune(data_ids)

    def drop_unfinished(self) -> None:
        with self._txn(durable=True) as conn:
            candidates = [row[0] for row in conn.execute(_UNFINISHED_DATA_IDS)]
            conn.execute(_DROP_UNFINISHED_TOBJ)
            conn.execute(_DROP_UNFINISHED_TPACK)
            conn.execute(_DROP_UNFINISHED_TTRANS)
            self._tpack_ttids = None
            # Rows stored before a crash for transactions that never voted
            # are referenced by nothing; they can only be above the floor.
            candidates += [row[0] for row in conn.execute(_DATA_NOT_IN_OBJ, (self._get_floor(),))]
            self._prune(candidates)
            self._advance_floor(0)

    def _get_floor(self) -> int:
        if self._floor is None:
            self._floor = self._floor_checked = int(self.get_config(_CONFIG_ORPHAN_FLOOR) or 0)
        return self._floor

    def _advance_floor(self, step: int) -> None:
        """Raise the orphan floor, in a write transaction about to be made
        durable, once ``step`` data rows were added since the last time:
        below the oldest data row held for a transaction that has not voted
        (or above the last row when none is held), every row is referenced
        by obj or tobj, since releases, aborts and deletions prune what they
        leave unreferenced (see _prune; a ``release_data`` without prune
        leaves its orphan to ``prune_orphans``).  A crash cannot leave an
        orphan below it."""
        if step and self._data_added < step:
            return  # cheap: not even a query (rows added by replication are not counted)
        self._data_added = 0
        floor = self._get_floor()
        last = self._scalar(_MAX_DATA_ID, ()) or 0
        if last - self._floor_checked < step:
            return  # no scan of the holds
        self._floor_checked = last
        new_floor = min(self._held) - 1 if self._held else last
        if new_floor > floor:
            self._set_config(_CONFIG_ORPHAN_FLOOR, str(new_floor))
            self._floor = new_floor

    def prune_orphans(self) -> int:
        with self._txn(durable=False) as conn:
            count = self._prune([row[0] for row in conn.execute(_DATA_NOT_IN_OBJ, (0,))])
        return count

    def get_locked_transactions(self) -> dict[int, int | None]:
        conn = self.connection
        locked: dict[int, int | None] = {ttid: None for (ttid,) in conn.execute(_GET_TOBJ_TTIDS)}
        locked.update(conn.execute(_GET_TTRANS))
        return locked

    def get_final_tid(self, ttid: int) -> int | None:
        conn = self.connection
        np = self._np
        if np is not None:
            row = conn.execute(_FINAL_TID, (ttid % np, ttid, ttid)).fetchone()
            if row is not None:
                return row[0]
        row = conn.execute(_LOCKED_TTID, (ttid,)).fetchone()
        return None if row is None else row[0]
