"""neoctl against NEO's master and admin: what it makes of their answers
(ctl/status.py), NEO's command syntax, NEO's date format, and the admin's
own answers for NEO's neoctl (admin/app.py)."""
from __future__ import annotations

import datetime
import json

import pytest

from neozodb.ctl.status import (
    CtlError,
    check_report,
    parse_check_args,
    parse_status,
    unreported_check,
)
from neozodb.protocol import CellStates, ClusterStates, NodeStates, NodeTypes, Packets, p64

pytestmark = pytest.mark.timeout(10)

STATUS = {"partitions": 2, "checked": 2, "checking": [], "unfollowed": {},
          "results": {"0": "ok: S1 S2 agree", "1": "ok: S1 S2 agree"}, "repairs": {},
          "done": True}


def test_neo_master_empty_acknowledgement_is_no_status():
    """NEO's master acknowledges CheckReplicas with an empty message: no
    status, never a JSON error."""
    assert parse_status("") is None
    assert parse_status(None) is None
    assert parse_status("checking 4 partitions") is None
    assert parse_status("[1, 2]") is None
    assert parse_status(json.dumps(STATUS)) == STATUS


def test_check_not_reported_shows_what_the_table_shows():
    rows = [[(1, CellStates.UP_TO_DATE), (2, CellStates.UP_TO_DATE)],
            [(1, CellStates.UP_TO_DATE), (2, CellStates.CORRUPTED)],
            [(1, CellStates.OUT_OF_DATE), (2, CellStates.UP_TO_DATE)]]
    lines, value = unreported_check([0, 1], rows)
    assert lines[0].startswith("check of 2 partitions started; the master does not report")
    assert lines[1:] == ["partition 1: S2 CORRUPTED"]  # partition 2 was not asked
    assert value == {"started": 2, "reported": False, "cells": {"1": ["S2 CORRUPTED"]}}


def _parse(*args, partitions=4):
    from neozodb.ctl.neoctl import _parse_nid, _parse_offset, _parse_tid
    return parse_check_args(list(args), _parse_nid, _parse_tid, _parse_offset,
                            lambda: partitions)


def test_check_arguments_ours_and_neos():
    everything = dict.fromkeys(range(4))
    assert _parse() == (everything, None, None)
    assert _parse("2", "3:s1") == ({2: None, 3: 1}, None, None)
    # NEO's: ":" is every partition, ":NID" with that reference, "P:" one
    assert _parse(":") == (everything, None, None)
    assert _parse(":S2") == (dict.fromkeys(range(4), 2), None, None)
    assert _parse("0:", "1:S1") == ({0: None, 1: 1}, None, None)
    assert _parse("1:", "tid:0x10", "tid:32") == ({1: None}, 0x10, 32)
    assert _parse("tid:7") == (everything, 7, None)
    with pytest.raises(CtlError):
        _parse("tid:1", "2")       # partitions come first
    with pytest.raises(CtlError):
        _parse("tid:1", "tid:2", "tid:3")
    with pytest.raises(CtlError):
        _parse("x:")


def test_check_report_counts_partitions_left_to_neo_storages():
    status = dict(STATUS, checked=1, unfollowed={"1": "S1"}, results={
        "0": "ok: S1 S3 agree",
        "1": "checked by S1, NEO's storage, which reports differences only: none reported"})
    assert check_report(status)[-1] == ("1 partitions checked, 0 corrupted copies found,"
                                        " 0 repaired; 1 left to NEO's storages, which report"
                                        " differences only")
    assert check_report(STATUS)[-1] == "2 partitions checked, 0 corrupted copies found, 0 repaired"


def test_tid_dates_as_neo_prints_them():
    """NEO's neoctl prints a datetime: microseconds truncated (ZODB's
    TimeStamp rounds them), none at all when zero."""
    from neozodb.tid import format_tid_time, neo_tid_time
    assert neo_tid_time(0) == "1900-01-01 00:00:00"
    assert neo_tid_time(0x40d4debbfcdf855) == "2026-11-27 20:59:44.954196"  # the reference
    tid = 0x40d6bdcb7935b88
    seconds, rest = divmod((tid & 0xFFFFFFFF) * 60, 1 << 32)
    micro = rest * 1000000 // (1 << 32)
    assert neo_tid_time(tid).endswith(":%02d.%06d" % (seconds, micro))
    # a TID where rounding and truncation differ: NEO's is one less
    tid = next(t for t in range(0x40d6bdcb7935b88, 0x40d6bdcb7935b88 + 100)
               if format_tid_time(t) != neo_tid_time(t))
    assert float(format_tid_time(tid)[-9:]) - float(neo_tid_time(tid)[-9:]) == pytest.approx(1e-6)
    assert neo_tid_time((40000 << 32)) == str(datetime.datetime(1900, 1, 28, 18, 40))


# -- the admin --------------------------------------------------------------------------------

def _cluster(states):
    from neozodb.nodes import Node, NodeManager
    from neozodb.pt import PartitionTable
    nm = NodeManager()
    for nid, state in states.items():
        nm.add(Node(NodeTypes.STORAGE, nid, state=state))
    pt = PartitionTable(3, 1)
    pt.make(sorted(states))
    return pt, nm


def test_print_summary_as_neos_admin():
    from neozodb.admin.app import monitor_summary
    pt, nm = _cluster({1: NodeStates.RUNNING, 2: NodeStates.RUNNING})
    tid = p64(0x40d4debbfcdf855)
    assert monitor_summary(ClusterStates.RUNNING, pt, nm, tid) == (
        [], [], b"RUNNING; UP_TO_DATE=6; ltid=040d4debbfcdf855 (2026-11-27 20:59:44.954196)")
    nm.get(2).state = NodeStates.DOWN
    pt.apply_changes(2, 1, [(0, 2, CellStates.OUT_OF_DATE.value)])
    assert monitor_summary(ClusterStates.RUNNING, pt, nm, tid) == (
        [], [None], b"RUNNING; OUT_OF_DATE=1, UP_TO_DATE=5; DOWN=1; ltid=040d4debbfcdf855"
                    b" (2026-11-27 20:59:44.954196)")
    nm.get(2).state = NodeStates.RUNNING
    assert monitor_summary(ClusterStates.RUNNING, pt, nm, tid)[:2] == ([None], [])
    assert monitor_summary(ClusterStates.RECOVERING, pt, nm, None)[1:] == (
        [None], b"RECOVERING; OUT_OF_DATE=1, UP_TO_DATE=5")


def test_admin_does_not_forward_to_neo_master_what_it_does_not_expect():
    """NEO's master drops an admin that sends it AskPackOrders."""
    from neozodb.admin.app import unforwardable
    from neozodb.protocol.features import FEATURES, NO_FEATURES
    assert unforwardable(Packets.AskPackOrders, NO_FEATURES) == \
        "the master does not report pack status (NEO's master)"
    assert unforwardable(Packets.AskPackOrders, FEATURES) is None
    assert unforwardable(Packets.CheckReplicas, NO_FEATURES) is None
