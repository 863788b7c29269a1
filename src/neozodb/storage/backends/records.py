"""The values a storage backend reads and writes (records, pack orders,
what replication carries) and the pack rule shared by every backend."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

#: Checksum of "no data": deletion records and undone creations.
ZERO_HASH = bytes(20)

#: Cell state meaning "remove this cell" in ``change_pt`` (CellStates.DISCARDED).
DISCARDED = 4

#: (serial, next_serial, compression, checksum, data, data_serial)
ObjectRecord = tuple[int, "int | None", int, bytes, bytes, "int | None"]
#: (oids, user, description, ext, packed, ttid)
TransactionRecord = tuple[list[int], bytes, bytes, bytes, bool, int]
#: (oids, user, description, ext, packed) as given to store_transaction
TransactionMetadata = tuple[Sequence[int], bytes, bytes, bytes, bool]
#: (ptid, num_replicas, rows); rows[offset] = [(nid, cell_state), ...]
PartitionTableRecord = tuple["int | None", int, list[list[tuple[int, int]]]]
#: A pack order as stored: (tid, approved, partial, oids, pack_tid, gc).
#: ``tid`` is the pack transaction's; ``approved`` None until the master
#: signs it; ``partial``: only ``oids`` have their history packed (NEO);
#: ``gc``: every oid's history is packed and ``oids`` (unreachable objects)
#: lose all their revisions up to ``pack_tid``.
PackOrderRecord = tuple[int, "bool | None", bool, "list[int] | None", int, bool]
#: What the vote of a pack transaction records: (partial, oids, pack_tid, gc).
PackRequest = tuple[bool, "list[int] | None", int, bool]
#: One order applied by ``pack_partition``: (pack_tid, partial, oids, gc).
PackStep = tuple[int, bool, "frozenset[int] | set[int] | None", bool]
#: Pack progress of a partition: (done, target, next_oid): every order up
#: to ``done`` is applied; orders in (done, target] are being applied,
#: oids below ``next_oid`` are done (target None: no pass running).
PackProgress = tuple[int, "int | None", int]
#: An object revision as replication carries it: (oid, tid, compression,
#: checksum, data, data_serial); ZERO_HASH and b'' for a deletion.
ReplicatedObject = tuple[int, int, int, bytes, bytes, "int | None"]
#: A transaction as replication carries it: (tid, oids, user, description,
#: ext, packed, ttid).
ReplicatedTransaction = tuple[int, Sequence[int], bytes, bytes, bytes, bool, int]


def revisions_to_delete(oid: int, revisions: Sequence[tuple[int, int | None]],
                        steps: Iterable[PackStep]) -> list[int]:
    """Tids of the revisions of ``oid`` that packing with ``steps`` (in
    order) deletes.  ``revisions`` are ``(tid, data_id)`` in ascending tid
    order (data_id None: a deletion record).

    History: of the revisions up to ``pack_tid``, only the last one is
    kept, and not even that one if it is a deletion.  GC (``oid`` in the
    oids of a gc step): every revision up to ``pack_tid`` goes.  A partial
    step only concerns its listed oids."""
    alive = list(revisions)
    doomed: list[int] = []
    for pack_tid, partial, oids, gc in steps:
        if partial and (oids is None or oid not in oids):
            continue
        old = [r for r in alive if r[0] <= pack_tid]
        if not old:
            continue
        if gc and oids is not None and oid in oids:
            gone = old
        elif old[-1][1] is None:
            gone = old              # ends with a deletion: nothing to keep
        else:
            gone = old[:-1]
        if gone:
            doomed += [tid for tid, _ in gone]
            alive = alive[len(gone):]
    return doomed


class Unsupported(Exception):
    """A read or operation this backend cannot do in its current state
    (e.g. iterating transactions an Importer has not copied yet).  The
    storage node answers the request with BACKEND_NOT_IMPLEMENTED and the
    exception's message; the connection and the backend stay usable."""
