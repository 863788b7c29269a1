"""neoctl's ``print pt_history`` and ``recover_pt PTID``: when the latest
partition table is not operational with the storages present, list the
older tables they remember and start from one (master/older_pt.py).

Both need a neozodb admin and master (feature ``older-pt``): neoctl sends
nothing to an admin that did not announce it (NEO's admin, or ours without
``-c``), which would take the request for a protocol error.
"""
from __future__ import annotations

from neozodb.protocol import Packets, nid_str, u64
from neozodb.protocol.features import OLDER_PT
from neozodb.tid import neo_tid_time

from .status import CtlError

NOT_OFFERED = ("the admin does not relay partition table histories (NEO's admin,"
               " or neoctl without -c/--cluster)")
RECOVER_USAGE = "usage: recover_pt PTID"


def _check_admin(ctl) -> None:
    if OLDER_PT not in ctl.conn.peer_features:
        raise CtlError(NOT_OFFERED)


def describe(ptid: int, latest: int | None, operational: bool, tid: int | None,
             storages: list[str], unreadable: list[int], packed: int | None = None) -> str:
    """One line of ``print pt_history``."""
    name = "ptid %d%s" % (ptid, " (latest)" if ptid == latest else "")
    if not operational:
        return "%s: not operational, no readable copy of partitions %s (copies on %s)" % (
            name, " ".join(map(str, unreadable)), " ".join(storages) or "no storage")
    line = "%s: operational with %s, truncating after %#x (%s)" % (
        name, " ".join(storages), tid, neo_tid_time(tid))
    if packed is not None and packed > tid:
        line += "; a pack up to %#x (%s) was applied since: the objects it deleted are lost" % (
            packed, neo_tid_time(packed))
    return line


def print_history(ctl, args: list[str]) -> tuple[list[str], object]:
    if args:
        raise CtlError("usage: print pt_history")
    _check_admin(ctl)
    latest, tables = ctl.call(Packets.AskOlderPartitionTables)
    lines = []
    value = []
    for ptid, operational, tid, nids, unreadable, packed in tables:
        tid = None if tid is None else u64(tid)
        packed = None if packed is None else u64(packed)
        storages = [nid_str(nid) for nid in nids]
        lines.append(describe(ptid, latest, operational, tid, storages, list(unreadable),
                              packed))
        value.append({"ptid": ptid, "operational": operational, "truncate_tid": tid,
                      "storages": storages, "unreadable": list(unreadable),
                      "packed_tid": packed})
    if not lines:
        lines = ["no storage present keeps a partition table history"]
    return lines, {"latest": latest, "tables": value}


def recover(ctl, args: list[str]) -> tuple[list[str], object]:
    if len(args) != 1:
        raise CtlError(RECOVER_USAGE)
    text = args[0]
    if not text.isascii() or not text.isdigit() or len(text) > 18 or not int(text):
        raise CtlError("invalid partition table id %r: expected 1, 2, ..." % text)
    _check_admin(ctl)
    (message,) = ctl.call(Packets.RecoverPartitionTable, int(text))
    return [message], {"ok": True, "message": message}
