"""Undo on a storage node: what AskObjectUndoSerial answers, and which
serial a transaction may name when it stores an object again.  Runs in the
storage's event loop, reading the backend; no I/O of its own.

NEO's client is the reference here: it sends the serial answered as
current for an object its transaction already changed straight back in
its next store, and points its undo records at the serial answered as
the state to go back to.
"""
from __future__ import annotations

from neozodb.net.connection import HandlerError
from neozodb.protocol import ErrorCodes, p64, u64


def same_state(undone: tuple, current: tuple, same_data=None) -> bool:
    """Whether two revisions ``(serial, data_id, value_tid)`` hold the same
    state: same data (back-pointers followed, the same data row, or rows
    that ``same_data(id, id)`` finds equal), or both deletions.  ``current``
    may have no serial (stored by the undoing transaction itself)."""
    def data_tid(revision):
        serial, _, value_tid = revision
        return serial if value_tid is None else value_tid
    if undone[1] is None or current[1] is None:
        return undone[1] is None and current[1] is None
    if undone[1] == current[1]:
        return True
    tid = data_tid(current)
    if tid is not None and tid == data_tid(undone):
        return True
    # a backend that does not deduplicate keeps equal data in several rows
    return same_data is not None and same_data(undone[1], current[1])


def _same_data(backend, a: int, b: int) -> bool:
    """Whether data rows ``a`` and ``b`` hold the same bytes (same SHA-1
    and compression)."""
    if backend.deduplicates:
        return False  # equal data would be one row
    rows = backend.load_data(a), backend.load_data(b)
    return None not in rows and rows[0][:2] == rows[1][:2]


def store_again_ok(previous: tuple, serial: bytes) -> bool:
    """Whether a transaction may store again an object it stored already
    (``previous``: serial, data_id, value_tid of that store) based on
    ``serial``.  After an undo (a back-pointer), the next store must be
    based on the revision the undo points to, which AskObjectUndoSerial
    answered as current (NEO's rule); our client names the serial its
    first store was based on, accepted as well.  After a plain store (a
    merged undo among them) any serial goes: NEO's client then names its
    TTID."""
    value_tid = previous[2]
    return value_tid is None or serial in (p64(value_tid), previous[0])


def undo_serials(backend, txn, ttid: bytes, ltid: bytes, undone_tid: bytes,
                 oids: list[bytes]) -> dict[bytes, tuple[bytes, bytes | None, bool]]:
    """For each oid of an undone transaction: ``(current_serial,
    undo_serial, is_current)``.

    current_serial is the revision the undoing transaction sees: the last
    one before ltid or, if the transaction (``txn``, None if it stored
    nothing here) already stored the object itself (an earlier undo in the
    same transaction), the back-pointer of that store, ttid if it had none:
    the serial its next store must name (see store_again_ok).  undo_serial
    is the revision just before undone_tid, even if it is a back-pointer
    (None: the undo deletes the object, e.g. an undone creation): a pack
    keeps that revision when it deletes the one it points to.  is_current
    tells whether the current state is the undone one, so that the undo can
    simply point back to undo_serial."""
    undone_at = u64(undone_tid)
    result = {}
    for oid in oids:
        n = u64(oid)
        undone = backend.get_revision(n, tid=undone_at)
        if undone is None:
            # listed by the transaction but gone: packed away
            raise HandlerError("%s has no revision %s (packed?)" % (oid.hex(), undone_tid.hex()),
                               ErrorCodes.UNDO_PACK_ERROR)
        previous = backend.get_revision(n, before_tid=undone_at)
        undo_serial = None
        if previous is not None and previous[1] is not None:
            undo_serial = p64(previous[0])
        stored = None if txn is None else txn.objects.get(oid)
        if stored is not None:
            current_serial = ttid if stored[2] is None else p64(stored[2])
            current = (None, stored[1], stored[2])
        else:
            current = backend.get_revision(n, before_tid=u64(ltid))
            if current is None:
                raise HandlerError("%s does not exist before %s" % (oid.hex(), ltid.hex()),
                                   ErrorCodes.OID_NOT_FOUND)
            current_serial = p64(current[0])
        result[oid] = (current_serial, undo_serial, same_state(
            undone, current, lambda a, b: _same_data(backend, a, b)))
    return result
