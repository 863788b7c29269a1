"""neoctl's commands that depend on what the master reports: ``check``,
``print check``, ``print pack``, ``print import``.

A neozodb master acknowledges ``CheckReplicas`` (and an admin's
``AskPackOrders``) with its status as JSON, to a neozodb admin, which
passes it on (``status-json``, protocol/features.py).  NEO's master
acknowledges with an empty message, and NEO's admin gets that from either
master: the status is then unknown, and the commands say so in one line
(``check`` still starts the check, as NEO's neoctl does).
"""
from __future__ import annotations

import json
import time

from neozodb.net.endpoint import ConnectionClosed, RemoteError
from neozodb.protocol import ZERO_TID, CellStates, ErrorCodes, Packets, nid_str
from neozodb.tid import neo_tid_time

NOT_REPORTED = "the master does not report the %s (NEO's master, or NEO's admin in between)"
LOGGED = "; NEO's master logs the corrupted partitions it is told about"
_NOT_READABLE = (CellStates.CORRUPTED, CellStates.OUT_OF_DATE)


class CtlError(Exception):
    pass


def parse_status(text) -> dict | None:
    """The JSON status in an acknowledgement; None for NEO's empty one (or
    anything else that is not ours)."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except (ValueError, TypeError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("results"), dict):
        return None
    return value


def master_status(ctl) -> dict | None:
    # CheckReplicas without partitions starts nothing (NEO's master too)
    (text,) = ctl.call(Packets.CheckReplicas, {}, ZERO_TID, None)
    return parse_status(text)


def check_status(ctl) -> dict:
    status = master_status(ctl)
    if status is None:
        raise CtlError(NOT_REPORTED % "status of checks" + LOGGED)
    status.pop("import", None)
    return status


def import_report(ctl) -> tuple[list[str], object]:
    from neozodb.storage.importer import format_status
    status = master_status(ctl)
    if status is None:
        raise CtlError(NOT_REPORTED % "progress of imports")
    imports = status.get("import") or {}
    if not imports:
        return ["no import"], {}
    return ["%s: %s" % (label, format_status(state))
            for label, state in sorted(imports.items())], imports


def check_report(status: dict) -> list[str]:
    lines = []
    found = repaired = 0
    for partition, result in status["results"].items():
        line = "partition %s: %s" % (partition, result)
        repairs = status["repairs"].get(partition)
        if repairs:
            found += len(repairs)
            repaired += sum(1 for s in repairs.values() if s == "repaired")
            line += "; " + ", ".join("%s %s" % item for item in repairs.items())
        lines.append(line)
    for partition in status["checking"]:
        lines.append("partition %s: being checked" % partition)
    last = "%d partitions checked, %d corrupted copies found, %d repaired" % (
        status["checked"], found, repaired)
    unfollowed = status.get("unfollowed") or {}
    if unfollowed:
        last += "; %d left to NEO's storages, which report differences only" % len(unfollowed)
    lines.append(last)
    return lines


def parse_check_args(args: list[str], parse_nid, parse_tid, parse_offset, num_partitions
                     ) -> tuple[dict[int, int | None], int | None, int | None]:
    """``PARTITION[:NID]...`` (ours), NEO's ``[PARTITION]:[NID]...``
    (``:`` or ``:NID`` alone: every partition) then ``[MIN_TID [MAX_TID]]``
    (``tid:N`` or a UNIX time with a decimal point).  No partition: all."""
    partitions: dict[int, int | None] = {}
    tids: list[int] = []
    for arg in args:
        if arg.lower().startswith("tid:") or "." in arg:
            tids.append(parse_tid(arg))
            continue
        if tids:
            raise CtlError("usage: check [PARTITION[:NID]...] [MIN_TID [MAX_TID]]")
        part, colon, reference = arg.partition(":")
        ref = parse_nid(reference) if reference else None
        if part:
            partitions[parse_offset("partition", part)] = ref
        elif colon:
            partitions.update(dict.fromkeys(range(num_partitions()), ref))
        else:
            raise CtlError("invalid partition ''")
    if len(tids) > 2:
        raise CtlError("usage: check [PARTITION[:NID]...] [MIN_TID [MAX_TID]]")
    if not partitions:
        partitions = dict.fromkeys(range(num_partitions()))
    return partitions, (tids[0] if tids else None), (tids[1] if len(tids) > 1 else None)


def run_check(ctl, partitions: dict[int, int | None], min_tid: bytes, max_tid: bytes | None,
              progress) -> tuple[list[str], object]:
    """Start a check; follow it to its end if the master reports it."""
    (ack,) = ctl.call(Packets.CheckReplicas, partitions, min_tid, max_tid)
    status = parse_status(ack)
    if status is None:
        return _unreported_check(ctl, sorted(partitions))
    shown = None
    while True:
        status.pop("import", None)
        repairing = sum(1 for r in status["repairs"].values() for s in r.values()
                        if s == "repairing")
        now = (status["checked"], repairing)
        if now != shown:
            progress("%d/%d partitions checked, %d copies being repaired" % (
                status["checked"], status["partitions"], repairing))
            shown = now
        if status["done"]:
            return check_report(status), status
        time.sleep(0.2)  # polling the master for progress, not synchronisation
        status = check_status(ctl)


def _unreported_check(ctl, partitions: list[int]) -> tuple[list[str], object]:
    _, _, rows = ctl.call(Packets.AskPartitionList, 0, 0, None)
    return unreported_check(partitions, rows)


def unreported_check(partitions: list[int], rows) -> tuple[list[str], object]:
    """What can be seen of a check the master does not report, in the
    partition table ``rows``: that it was started, and cells CORRUPTED
    (NEO's master marks none unless built with its experimental CORRUPTED
    state) or OUT_OF_DATE."""
    wanted = set(partitions)
    cells = {}
    for offset, row in enumerate(rows):
        if offset in wanted:
            odd = ["%s %s" % (nid_str(nid), CellStates(state).name)
                   for nid, state in row if CellStates(state) in _NOT_READABLE]
            if odd:
                cells[offset] = odd
    lines = ["check of %d partitions started; %s" % (
        len(partitions), NOT_REPORTED % "progress nor findings of checks" + LOGGED)]
    lines += ["partition %d: %s" % (offset, ", ".join(odd)) for offset, odd in sorted(cells.items())]
    return lines, {"started": len(partitions), "reported": False,
                   "cells": {str(p): odd for p, odd in sorted(cells.items())}}


def pack_status(ctl) -> dict:
    # NEO's AnswerPackOrders cannot tell which storage applied what: a
    # neozodb master acknowledges an admin's AskPackOrders with its status
    try:
        ctl.conn.call(Packets.AskPackOrders, ZERO_TID, timeout=ctl.timeout)
    except RemoteError as e:
        if e.code is ErrorCodes.ACK:
            status = _pack_json(e.message)
            if status is not None:
                return status
        elif e.code is ErrorCodes.PROTOCOL_ERROR:  # NEO's admin: an unexpected packet
            raise CtlError("the admin does not report pack status (NEO's admin)") from None
        else:
            raise CtlError(e.message or e.code.name) from None
    except ConnectionClosed as e:
        raise CtlError("connection to admin lost: %s" % e) from None
    raise CtlError("the master does not report pack status (NEO's master)")


def _pack_json(text) -> dict | None:
    try:
        value = json.loads(text)
    except (ValueError, TypeError):
        return None
    return value if isinstance(value, dict) and isinstance(value.get("orders"), list) else None


def pack_report(status: dict) -> list[str]:
    lines = []
    waited = status["waited_for"]
    for order in status["orders"]:
        if not order["known"]:
            kind = "details not known yet"
        elif order["gc"]:
            kind = "GC of %d objects" % order["oids"]
        elif order["partial"]:
            kind = "history of %d objects" % order["oids"]
        else:
            kind = "history"
        approved = {True: "approved", False: "rejected", None: "not approved"}[
            order.get("approved", True)]
        line = "pack %#x: up to %#x (%s), %s, %s; completed by %s" % (
            order["tid"], order["pack_tid"], neo_tid_time(order["pack_tid"]), kind, approved,
            " ".join(order["completed"]) or "none")
        pending = [n for n in waited if n not in order["completed"]]
        if pending:
            line += "; pending on %s" % " ".join(pending)
        lines.append(line)
    if not lines:
        lines.append("no pack order")
    return lines

