"""Pack of ``SQLiteBackend`` (a mixin): pack orders, per-partition pack
progress, and deleting the revisions a pack makes useless."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .base import PackOrderRecord, PackProgress, PackStep, revisions_to_delete
from .sqlite_schema import (
    _ADD_PACK,
    _DEL_OBJ,
    _DEL_PACK_PROGRESS,
    _GET_PACK_ORDERS,
    _GET_PACK_PROGRESS,
    _OID_ROWS,
    _PACK_ROWS,
    _SET_PACK_PROGRESS,
    _SIGN_PACK,
    _pack_oids,
    _unpack_oids,
)


class SQLitePack:
    """Pack orders and packing of ``SQLiteBackend``."""

    # -- pack ---------------------------------------------------------------------

    def get_pack_orders(self, min_tid: int = 0, max_tid: int | None = None,
                        max_oids: int | None = None) -> list[PackOrderRecord]:
        if max_tid is None:
            max_tid = (1 << 63) - 1
        orders: list[PackOrderRecord] = []
        count = 0
        for tid, approved, partial, oids, pack_tid, gc in self.connection.execute(
                _GET_PACK_ORDERS, (min_tid, max_tid)):
            orders.append((tid, None if approved is None else bool(approved), bool(partial),
                           None if oids is None else _unpack_oids(oids), pack_tid, bool(gc)))
            count += len(oids or b'') // 8
            if max_oids is not None and count > max_oids:
                break
        return orders

    def add_pack_order(self, order: PackOrderRecord) -> None:
        tid, approved, partial, oids, pack_tid, gc = order
        with self._txn(durable=False) as conn:
            conn.execute(_ADD_PACK, (tid, None if approved is None else bool(approved),
                                     bool(partial),
                                     None if oids is None else _pack_oids(oids),
                                     pack_tid, bool(gc)))

    def sign_pack_orders(self, tids: Iterable[int], approved: bool) -> None:
        with self._txn(durable=False) as conn:
            conn.executemany(_SIGN_PACK, [(bool(approved), tid) for tid in tids])

    def get_pack_progress(self, partition: int) -> PackProgress | None:
        row = self.connection.execute(_GET_PACK_PROGRESS, (partition,)).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def set_pack_progress(self, partition: int, progress: PackProgress | None) -> None:
        with self._txn(durable=False) as conn:
            if progress is None:
                conn.execute(_DEL_PACK_PROGRESS, (partition,))
            else:
                conn.execute(_SET_PACK_PROGRESS, (partition, *progress))

    def _pack_candidates(self, partition: int, steps: Sequence[PackStep], min_oid: int,
                         length: int) -> tuple[dict[int, list], bool]:
        """Revisions of the next objects to pack: ({oid: [(tid, data_id)]},
        whether the partition has more)."""
        conn = self._conn
        np = self._partitions()
        if all(partial for _, partial, _, _ in steps):
            # partial packs only: the listed oids of this partition
            wanted = sorted({oid for _, _, oids, _ in steps for oid in oids or ()
                             if oid % np == partition and oid >= min_oid})
            chunk = wanted[:length]
            revisions = {oid: conn.execute(_OID_ROWS, (partition, oid)).fetchall()
                         for oid in chunk}
            return revisions, len(wanted) > length
        rows = conn.execute(_PACK_ROWS, (partition, min_oid, length)).fetchall()
        revisions: dict[int, list] = {}
        for oid, tid, data_id in rows:
            revisions.setdefault(oid, []).append((tid, data_id))
        more = len(rows) == length
        if more:
            # the last object may have more revisions than the chunk holds
            last = rows[-1][0]
            if len(revisions) == 1:
                revisions[last] = conn.execute(_OID_ROWS, (partition, last)).fetchall()
            else:
                del revisions[last]
        return revisions, more

    def pack_partition(self, partition: int, steps: Sequence[PackStep], min_oid: int,
                       length: int, progress: PackProgress) -> tuple[int | None, int, int]:
        # durable: its own fsync flushes what it wrote, which the next
        # commit's fsync would otherwise have to
        with self._txn(durable=True) as conn:
            revisions, more = self._pack_candidates(partition, steps, min_oid, length)
            doomed = []
            candidates = []
            for oid, revs in revisions.items():
                tids = revisions_to_delete(oid, revs, steps)
                if tids:
                    gone = set(tids)
                    doomed += [(partition, oid, tid) for tid in tids]
                    candidates += [d for t, d in revs if t in gone and d is not None]
            conn.executemany(_DEL_OBJ, doomed)
            self._prune(candidates)
            next_oid = max(revisions) + 1 if more and revisions else None
            done, target, _ = progress
            conn.execute(_SET_PACK_PROGRESS, (partition, done, target,
                                              min_oid if next_oid is None else next_oid))
        return next_oid, len(revisions), len(doomed)
