"""``neoctl check`` on the master: who checks which partition, what was
found, and the repair of the copies found corrupted.

For each partition, one storage with a readable copy compares it with the
other readable copies (``CheckPartition``, see ``storage/checker.py``) and
reports the odd ones (``NotifyPartitionCorrupted``).  A reported cell
becomes CORRUPTED, then at once OUT_OF_DATE: its node erases it (NEO's
replicates it from scratch) and replicates it again from the good copies.

A neozodb storage (``check-report``) ends every check with a report, empty
when the copies agree: it is chosen whenever the partition has a copy on
one.  NEO's storage reports only differences, and nothing when the copies
agree: a partition whose copies are all on NEO's storages is checked by one
of them, its reports are acted upon whenever they come, but the master
cannot tell when it is over, so it does not wait for it.

The run's state is kept until the next check.  An admin with
``status-json`` gets it as JSON in the acknowledgement of every
``CheckReplicas`` (none for a check that starts nothing), with what
importing storages reported under "import"; NEO's admin gets NEO's empty
acknowledgement.
"""
from __future__ import annotations

import json
import logging
import time

from neozodb.net.connection import Denied
from neozodb.protocol import CellStates, ClusterStates, NodeTypes, Packets, nid_str, p64, u64
from neozodb.protocol.values import MAX_ID

log = logging.getLogger("neozodb.master")

_CORRUPTED = CellStates.CORRUPTED.value
_OUT_OF_DATE = CellStates.OUT_OF_DATE.value
_UP_TO_DATE = CellStates.UP_TO_DATE.value
STATUS_JSON = b"status-json"
CHECK_REPORT = b"check-report"


class CheckRun:
    def __init__(self) -> None:
        self.started = time.time()
        self.checking: dict[int, int] = {}          # partition -> checker nid
        # partition -> checker nid, for checkers that report only differences
        self.unfollowed: dict[int, int] = {}
        self.references: dict[int, int | None] = {}
        self.copies: dict[int, list[int]] = {}      # partition -> nids compared
        self.results: dict[int, str] = {}           # partition -> outcome
        self.repairing: dict[int, set[int]] = {}    # partition -> nids being rebuilt
        # partition -> what the checker could not do: {"error": str | None,
        # "not_compared": {label: why}}
        self.notes: dict[int, dict] = {}

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
            "checked": len(self.results) - len(self.unfollowed),
            "checking": pending,
            "unfollowed": {str(p): nid_str(n) for p, n in sorted(self.unfollowed.items())},
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


def reports(app, nid: int) -> bool:
    """Whether storage ``nid`` ends its checks with a report."""
    node = app.nm.get(nid)
    conn = node.conn if node is not None else None
    return conn is not None and CHECK_REPORT in conn.peer_features


def choose_checker(copies: list[int], reference: int | None, reporting, load: dict) -> int:
    """The copy that checks: one that reports the end of its check if there
    is one (a non-reference one first: the reference is compared, not
    comparing), the least loaded among equals."""
    def rank(nid):
        return (not reporting(nid), nid == reference, load.get(nid, 0), nid)
    return min(copies, key=rank)


def check_replicas(app, conn, msg_id: int, partitions: dict[int, int | None],
                   min_tid: bytes, max_tid: bytes | None) -> None:
    """``CheckReplicas`` from an admin: with partitions, start a check; JSON
    status in the acknowledgement only for an admin that expects it."""
    if partitions:
        start_check(app, partitions, min_tid, max_tid)
    conn.ack(msg_id, check_status(app) if STATUS_JSON in conn.peer_features else "")


def start_check(app, partitions: dict[int, int | None], min_tid: bytes,
                max_tid: bytes | None) -> str:
    """Send CheckPartition for each partition (``{offset: reference nid or
    None}``); return a summary."""
    if app.cluster_state is not ClusterStates.RUNNING:
        raise Denied("cluster is %s, not RUNNING" % app.cluster_state.name)
    pt = app.pt
    run = app.check_run
    if run is not None and run.checking:
        raise Denied("a check is already running (partitions %s)" % sorted(run.checking))
    if max_tid is None:  # as NEO: what is committed when the check starts
        max_tid = p64(app.tm.last_tid)
    for tid in (min_tid, max_tid):
        # the storages' backends keep 63 bits; refused, not a protocol
        # error: the admin forwarding it must keep its master connection
        if u64(tid) > MAX_ID:
            raise Denied("tid %s is out of range (more than 63 bits)" % tid.hex())
    if u64(min_tid) > u64(max_tid):
        raise Denied("nothing to check: min_tid %#x is after max_tid %#x" % (
            u64(min_tid), u64(max_tid)))
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
    for partition, (reference, copies) in plan.items():
        run.copies[partition] = copies
        run.references[partition] = reference
        if len(copies) < 2:
            run.results[partition] = "skipped: only %d readable copy" % len(copies)
            continue
        checker = choose_checker(copies, reference, lambda nid: reports(app, nid), load)
        load[checker] = load.get(checker, 0) + 1
        if reports(app, checker):
            run.checking[partition] = checker
        else:
            run.unfollowed[partition] = checker
            run.results[partition] = (
                "checked by %s, NEO's storage, which reports differences only: none reported"
                " so far" % nid_str(checker))
        source = (b"", None)
        if reference is not None:
            host, port = app.nm.get(reference).address
            source = (b"", (host.encode(), port))
        app.nm.get(checker).conn.notify(Packets.CheckPartition, partition, source, min_tid,
                                        max_tid)
    log.info("%s: checking %d partitions", app.label, len(run.checking) + len(run.unfollowed))
    return "checking %d partitions" % (len(run.checking) + len(run.unfollowed))


def partition_checked(app, node, partition: int, nids: list[int]) -> None:
    """NotifyPartitionCorrupted from the node that checked ``partition``."""
    run = app.check_run
    if run is not None and run.unfollowed.get(partition) == node.nid:
        _differences_reported(app, run, partition, nids)
        return
    if run is None or run.checking.get(partition) != node.nid:
        log.warning("%s: unexpected check result for partition %d from %s: %s", app.label,
                    partition, node.label, " ".join(nid_str(n) for n in nids) or "no difference")
        return
    del run.checking[partition]
    note = run.notes.get(partition, {})
    if note.get("error"):
        run.results[partition] = "failed on %s: %s" % (node.label, note["error"])
        log.warning("%s: partition %d: %s", app.label, partition, run.results[partition])
        return
    skipped = note.get("not_compared") or {}
    copies = [nid for nid in run.copies[partition] if nid_str(nid) not in skipped]
    described = ", ".join("%s (%s)" % item for item in sorted(skipped.items()))
    if len(copies) < 2:
        run.results[partition] = "not checked: could not compare %s" % described
        log.warning("%s: partition %d: %s", app.label, partition, run.results[partition])
        return
    _judge(app, run, partition, copies, set(nids) & set(copies))
    if skipped:
        run.results[partition] += "; not compared: " + described


def check_note(app, node, note: dict) -> None:
    """What the checker of a partition could not compare, before its
    report (storage/checker.py)."""
    run = app.check_run
    partition = note["partition"]
    if run is not None and run.checking.get(partition) == node.nid:
        run.notes[partition] = {"error": note.get("error"),
                                "not_compared": dict(note.get("not_compared") or {})}


def _differences_reported(app, run: CheckRun, partition: int, nids: list[int]) -> None:
    """A report from NEO's storage: the copies that differ from the
    reference, or every copy when there is none (it does not vote); there
    may be several for one partition, each about copies still compared."""
    copies = run.copies[partition]
    odd = set(nids) & set(copies)
    odd |= run.repairing.get(partition, set())
    _judge(app, run, partition, copies, odd)


def _judge(app, run: CheckRun, partition: int, copies: list[int], odd: set[int]) -> None:
    lost = [nid for nid in copies if nid not in odd and nid not in app.running_storage_nids()]
    if not odd:
        run.results[partition] = "ok: %s agree" % " ".join(nid_str(n) for n in copies)
        if lost:
            run.results[partition] += " (%s lost during the check)" % " ".join(map(nid_str, lost))
        return
    good = [nid for nid in copies if nid not in odd]
    if not good:
        run.results[partition] = ("copies on %s differ and none is a majority:"
                                  " check again naming a reference" %
                                  " ".join(nid_str(n) for n in copies))
        log.warning("%s: partition %d: %s", app.label, partition, run.results[partition])
        return
    run.results[partition] = "%s differed from %s" % (
        " ".join(nid_str(n) for n in sorted(odd)), " ".join(nid_str(n) for n in good))
    log.warning("%s: partition %d: %s: repairing", app.label, partition, run.results[partition])
    new = sorted(odd - run.repairing.get(partition, set()))
    run.repairing.setdefault(partition, set()).update(odd)
    if new:
        app.apply_pt_changes([(partition, nid, _CORRUPTED) for nid in new])
        app.apply_pt_changes([(partition, nid, _OUT_OF_DATE) for nid in new])


def checker_lost(app, nid: int) -> None:
    run = app.check_run
    if run is None:
        return
    for partition, checker in list(run.checking.items()):
        if checker == nid:
            del run.checking[partition]
            run.results[partition] = "failed: %s was lost" % nid_str(nid)
    for partition, checker in list(run.unfollowed.items()):
        if checker == nid:
            del run.unfollowed[partition]
            run.results[partition] = "failed: %s was lost" % nid_str(nid)


def check_status(app) -> str:
    """The status of the last check, and under "import" what storages
    importing a ZODB reported (by storage label)."""
    run = app.check_run
    if run is None:
        status = {"partitions": 0, "checked": 0, "checking": [], "unfollowed": {},
                  "results": {}, "repairs": {}, "done": True}
    else:
        status = run.status(app)
    status["import"] = app.import_status
    return json.dumps(status)
