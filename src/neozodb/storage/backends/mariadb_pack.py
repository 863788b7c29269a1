"""Pack of ``MariaDBBackend`` (a mixin): pack orders in NEO's ``pack``
table, per-partition pack progress, and deleting the revisions a pack
makes useless.

NEO's pack orders have no GC flag: neozodb's GC orders are marked with a
``neozodb.gc.TID`` configuration key (NEO applies them as plain packs).
The progress of a partition is a ``neozodb.pack.P`` key; its first value
(the last order applied) is also ``pt.pack`` of this node's cell, which
is what NEO keeps.  When ``pt.pack`` no longer says what the key does
(NEO packed since), ``pt.pack`` is the truth."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from . import mariadb_schema as S
from .base import PackOrderRecord, PackProgress, PackStep, revisions_to_delete


class MariaDBPack:
    """Pack orders and packing of ``MariaDBBackend``."""

    def _gc_tids(self) -> set[int]:
        prefix = len(S.KEY_GC_PREFIX)
        return {int(bytes(name)[prefix:], 16) for (name,) in self._q(S.GC_KEYS)}

    def _delete_pack_order(self, tid: int) -> None:
        self._q(S.DEL_PACK, (tid,))
        self._set_config(S.KEY_GC % tid, None)

    def get_pack_orders(self, min_tid: int = 0, max_tid: int | None = None,
                        max_oids: int | None = None) -> list[PackOrderRecord]:
        if max_tid is None:
            max_tid = (1 << 63) - 1
        gc = self._gc_tids()
        orders: list[PackOrderRecord] = []
        count = 0
        for tid, approved, partial, oids, pack_tid in self._q(
                S.GET_PACK_ORDERS, (min_tid, max_tid)):
            oids = None if oids is None else S.unpack_oids(bytes(oids))
            orders.append((tid, None if approved is None else bool(approved), bool(partial),
                           oids, pack_tid or 0, tid in gc))
            count += len(oids or ())
            if max_oids is not None and count > max_oids:
                break
        return orders

    def add_pack_order(self, order: PackOrderRecord) -> None:
        tid, approved, partial, oids, pack_tid, gc = order
        with self._txn(durable=False):
            self._q(S.ADD_PACK, (tid, None if approved is None else bool(approved),
                                 bool(partial), None if oids is None else S.pack_oids(oids),
                                 pack_tid))
            self._set_config(S.KEY_GC % tid, '1' if gc else None)

    def sign_pack_orders(self, tids: Iterable[int], approved: bool) -> None:
        with self._txn(durable=False):
            self._many(S.SIGN_PACK, [(bool(approved), tid) for tid in tids])

    # -- progress -------------------------------------------------------------------------

    def _pack_key(self, partition: int) -> tuple[int, int | None, int] | None:
        value = self.get_config(S.KEY_PACK % partition)
        if value is None:
            return None
        done, target, next_oid = value.split()
        return int(done), None if target == '-' else int(target), int(next_oid)

    def _pack_done(self, partition: int) -> int:
        """pt.pack of this node's cell of ``partition``."""
        key = self._pack_key(partition)
        return 0 if key is None else key[0]

    def get_pack_progress(self, partition: int) -> PackProgress | None:
        key = self._pack_key(partition)
        cell = self._own_cell(partition)
        packed = None if cell is None else cell[1]
        if key is not None and (packed is None or packed == key[0]):
            return key
        if packed:
            return packed, None, 0      # NEO's: orders up to it are applied
        return None

    def set_pack_progress(self, partition: int, progress: PackProgress | None) -> None:
        with self._txn(durable=False):
            self._write_pack_progress(partition, progress)

    def _write_pack_progress(self, partition: int, progress: PackProgress | None) -> None:
        if progress is None:
            self._set_config(S.KEY_PACK % partition, None)
            done = 0
        else:
            done, target, next_oid = progress
            self._set_config(S.KEY_PACK % partition, '%d %s %d' % (
                done, '-' if target is None else target, next_oid))
        own = self._own_nid()
        if own is not None:
            self._q(S.SET_CELL_PACK, (done, partition, own))

    # -- packing ----------------------------------------------------------------------------

    def _pack_candidates(self, partition: int, steps: Sequence[PackStep], min_oid: int,
                         length: int) -> tuple[dict[int, list], bool]:
        """Revisions of the next objects to pack: ({oid: [(tid, data_id)]},
        whether the partition has more)."""
        np = self._partitions()
        if all(partial for _, partial, _, _ in steps):
            wanted = sorted({oid for _, _, oids, _ in steps for oid in oids or ()
                             if oid % np == partition and oid >= min_oid})
            chunk = wanted[:length]
            revisions = {oid: [tuple(r) for r in self._q(S.OID_ROWS, (partition, oid))]
                         for oid in chunk}
            return revisions, len(wanted) > length
        rows = self._q(S.PACK_ROWS, (partition, min_oid, length))
        revisions: dict[int, list] = {}
        for oid, tid, data_id in rows:
            revisions.setdefault(oid, []).append((tid, data_id))
        more = len(rows) == length
        if more:
            # the last object may have more revisions than the chunk holds
            last = rows[-1][0]
            if len(revisions) == 1:
                revisions[last] = [tuple(r) for r in self._q(S.OID_ROWS, (partition, last))]
            else:
                del revisions[last]
        return revisions, more

    def pack_partition(self, partition: int, steps: Sequence[PackStep], min_oid: int,
                       length: int, progress: PackProgress) -> tuple[int | None, int, int]:
        with self._txn(durable=True):
            revisions, more = self._pack_candidates(partition, steps, min_oid, length)
            doomed = []
            candidates = []
            for oid, revs in revisions.items():
                tids = revisions_to_delete(oid, revs, steps)
                if tids:
                    gone = set(tids)
                    doomed += [(partition, oid, tid) for tid in tids]
                    candidates += [d for t, d in revs if t in gone and d is not None]
            self._many(S.DEL_OBJ, doomed)
            self._prune(candidates)
            next_oid = max(revisions) + 1 if more and revisions else None
            done, target, _ = progress
            self._write_pack_progress(partition, (
                done, target, min_oid if next_oid is None else next_oid))
        return next_oid, len(revisions), len(doomed)
