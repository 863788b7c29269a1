"""``neoctl check`` on the master: who checks which partition, what was
found, and the repair of the copies found corrupted.

For each partition, one storage with a readable copy compares it with the
other readable copies (``CheckPartition``, see ``storage/checker.py``) and
reports the odd ones (``NotifyPartitionCorrupted``, an empty list when all
agree).  A reported cell becomes CORRUPTED, then at once OUT_OF_DATE: its
node erases it and replicates it again from the good copies.  The run's
state is kept until the next check, for ``neoctl`` to poll (a
``CheckReplicas`` with no partition answers the status as JSON).
"""
from __future__ import annotations

import json
import logging
import time

from neozodb.net.connection import Denied
from neozodb.protocol import CellStates, NodeTypes, Packets, nid_str

log = logging.getLogger("neozodb.master")

_CORRUPTED = CellStates.CORRUPTED.value
_OUT_OF_DATE = CellStates.OUT_OF_DATE.value
_UP_TO_DATE = CellStates.UP_TO_DATE.value


class CheckRun:
    def __init__(self) -> None:
        self.started = time.time()
        self.checking: dict[int, int] = {}          # partition -> checker nid
        self.copies: dict[int, list[int]] = {}      # partition -> nids compared
        self.results: dict[int, str] = {}           # partition -> outcome
        self.repairing: dict[int, set[int]] = {}    # partition -> nids being rebuilt

    def status(self, app) -> dict:
        """Progress and findings, repairs followed in the partition table."""
        repairs = {}
        for partition, nids in self.repairing.items():
            cells = dict(app.pt.cells(partition))
            repairs[partition] = {nid_str(nid): _repair_state(app, cells, nid)
                                  for nid in sorted(nids)}
        pending = sorted(self.checking)
        return {
            "partitions": len(self.copies),
            "checked": len(self.results),
            "checking": pending,
            "results": {str(p): r for p, r in sorted(self.results.items())},
            "repairs": {str(p): r for p, r in sorted(repairs.items())},
            "done": not pending and all(
                s != "repairing" for r in repairs.values() for s in r.values()),
        }


def _repair_state(app, cells: dict, nid: int) -> str:
    if cells.get(nid) == _UP_TO_DATE:
        return "repaired"
    node = app.nm.get(nid)
    if node is None or not node.running:
        return "not repaired: node is not running"
    return "repairing"


def start_check(app, partitions: dict[int, int | None], min_tid: bytes,
                max_tid: bytes | None) -> str:
    """Send CheckPartition for each partition (``{offset: reference nid or
    None}``; empty: every partition); return the acknowledgement text."""
    pt = app.pt
    run = app.check_run
    if run is not None and run.checking:
        raise Denied("a check is already running (partitions %s)" % sorted(run.checking))
    if not partitions:
        partitions = dict.fromkeys(range(pt.num_partitions))
    ready = {nid for nid in app.running_storage_nids() if nid in app.ready_storages}
    plan = {}
    for partition, reference in sorted(partitions.items()):
        if not 0 <= partition < pt.num_partitions:
            raise Denied("invalid partition %d (the table has %d)" % (partition, pt.num_partitions))
        copies = [nid for nid in pt.readable_nids(partition) if nid in ready]
        if reference is not None:
            node = app.nm.get(reference)
            if node is None or node.type is not NodeTypes.STORAGE:
                raise Denied("unknown node %s" % nid_str(reference))
            if reference not in copies:
                raise Denied("%s has no readable copy of partition %d" % (node.label, partition))
        plan[partition] = (reference, copies)
    run = app.check_run = CheckRun()
    load: dict[int, int] = {}
    max_tid = max_tid if max_tid is not None else b"\x7f" + b"\xff" * 7
    for partition, (reference, copies) in plan.items():
        run.copies[partition] = copies
        if len(copies) < 2:
            run.results[partition] = "skipped: only %d readable copy" % len(copies)
            continue
        # the reference is compared, not comparing; spread the work
        candidates = [nid for nid in copies if nid != reference] or copies
        checker = min(candidates, key=lambda nid: (load.get(nid, 0), nid))
        load[checker] = load.get(checker, 0) + 1
        run.checking[partition] = checker
        source = (b"", None)
        if reference is not None:
            host, port = app.nm.get(reference).address
            source = (b"", (host.encode(), port))
        app.nm.get(checker).conn.notify(Packets.CheckPartition, partition, source, min_tid,
                                        max_tid)
    log.info("%s: checking %d partitions", app.label, len(run.checking))
    return "checking %d partitions" % len(run.checking)


def partition_checked(app, node, partition: int, nids: list[int]) -> None:
    """NotifyPartitionCorrupted from the node that checked ``partition``."""
    run = app.check_run
    if run is None or run.checking.get(partition) != node.nid:
        log.warning("%s: unexpected check result for partition %d from %s", app.label,
                    partition, node.label)
        return
    del run.checking[partition]
    copies = run.copies[partition]
    odd = sorted(set(nids) & set(copies))
    if not odd:
        run.results[partition] = "ok: %s agree" % " ".join(nid_str(n) for n in copies)
        return
    good = [nid for nid in copies if nid not in odd]
    if not good:
        run.results[partition] = ("copies on %s differ and none is a majority:"
                                  " check again naming a reference" %
                                  " ".join(nid_str(n) for n in copies))
        log.warning("%s: partition %d: %s", app.label, partition, run.results[partition])
        return
    run.results[partition] = "%s differed from %s" % (
        " ".join(nid_str(n) for n in odd), " ".join(nid_str(n) for n in good))
    log.warning("%s: partition %d: %s: repairing", app.label, partition, run.results[partition])
    run.repairing[partition] = set(odd)
    app.apply_pt_changes([(partition, nid, _CORRUPTED) for nid in odd])
    app.apply_pt_changes([(partition, nid, _OUT_OF_DATE) for nid in odd])


def checker_lost(app, nid: int) -> None:
    run = app.check_run
    if run is None:
        return
    for partition, checker in list(run.checking.items()):
        if checker == nid:
            del run.checking[partition]
            run.results[partition] = "failed: %s was lost" % nid_str(nid)


def check_status(app) -> str:
    """The status of the last check, and under "import" what storages
    importing a ZODB reported (by storage label)."""
    run = app.check_run
    if run is None:
        status = {"partitions": 0, "checked": 0, "checking": [], "results": {},
                  "repairs": {}, "done": True}
    else:
        status = run.status(app)
    status["import"] = app.import_status
    return json.dumps(status)
