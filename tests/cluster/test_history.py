"""Histories of real clients checked (tests/history): workload processes
run read-modify-write transactions on a cluster of 2 storages (replicas
1) while one storage is SIGKILLed and restarted; the history of every
transaction and the final state a fresh client reads must pass the
checker, and after a clean stop both storages hold the same committed
rows.  The workloads call readCurrent on what they only read, so their
transactions must be serializable (without it ZODB gives snapshot
isolation: write skew is allowed).

The seeds of the workloads come from one seed, printed;
NEOZODB_HISTORY_SEED=<seed> runs the same transactions again (the moments
of the kill are those of the run)."""
from __future__ import annotations

import os
import subprocess
import threading

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping
from ZODB.Connection import TransactionMetaData
from ZODB.POSException import ConflictError
from ZODB.utils import z64

from durability.checks import read_replica
from history.checker import check, load, summary
from history.workload import read_final, workload_argv
from neozodb.cli.cluster import wait_until
from neozodb.client import Storage
from neozodb.protocol import NodeStates, u64
from seeds import replay_seed

CLIENTS = 3


def pause(seconds: float) -> None:
    """A deliberate part of the schedule: the workloads run this long in
    each phase (before the kill, without S1, after it caught up)."""
    threading.Event().wait(seconds)


class Workloads:
    """Workload processes, one history file each, stopped by a stop file."""

    def __init__(self, cluster, directory, seed: int, clients: int = CLIENTS) -> None:
        self.directory = directory
        self.stop_file = str(directory / "stop")
        self.clients = ["c%d" % i for i in range(1, clients + 1)]
        self.paths = [str(directory / (c + ".jsonl")) for c in self.clients]
        self.procs = []
        for i, (client, path) in enumerate(zip(self.clients, self.paths, strict=True)):
            argv = workload_argv(cluster.masters, cluster.name, client, path, seed + i,
                                 duration=120, stop_file=self.stop_file, read_current=True,
                                 tls=cluster.credentials(client))
            out = open(directory / (client + ".out"), "w")
            self.procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT))
            out.close()

    def acknowledged(self) -> list[int]:
        """Commits acknowledged so far, per client; a workload that exited
        fails the test."""
        for client, proc in zip(self.clients, self.procs, strict=True):
            if proc.poll() is not None and not os.path.exists(self.stop_file):
                raise AssertionError("workload %s exited: %s" % (client, self.output(client)))
        records, _ = load([p for p in self.paths if os.path.exists(p)])
        tally = summary(records)
        return [tally.get(c, {}).get("ok", 0) for c in self.clients]

    def more(self, n: int):
        """A condition: every client acknowledged n more commits."""
        start = self.acknowledged()
        return lambda: all(a >= s + n for a, s in zip(self.acknowledged(), start, strict=True))

    def output(self, client: str) -> str:
        with open(self.directory / (client + ".out")) as f:
            return f.read()[-3000:]

    def stop(self, timeout: float) -> None:
        open(self.stop_file, "w").close()
        for client, proc in zip(self.clients, self.procs, strict=True):
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                raise AssertionError("workload %s did not stop: %s"
                                     % (client, self.output(client))) from None
            assert rc == 0, "workload %s: status %s: %s" % (client, rc, self.output(client))

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def run_history(cluster, directory, faults) -> list[dict]:
    """Workloads on ``cluster`` while ``faults()`` runs; their histories
    and the final state must pass the checker.  Returns the records."""
    seed = replay_seed("NEOZODB_HISTORY_SEED", "history")
    workloads = Workloads(cluster, directory, seed)
    try:
        wait_until(workloads.more(5), 30, "first commits")
        pause(3)
        faults()
        pause(3)
        wait_until(workloads.more(5), 30, "commits after the faults")
        workloads.stop(30)
    finally:
        workloads.kill()
    records, cut = load(workloads.paths)
    tally = summary(records)
    print("outcomes:", tally)
    assert cut == 0
    assert all(tally[c].get("ok", 0) > 0 for c in workloads.clients), tally
    final, _ = read_final(**cluster.client_kwargs())
    problems = check(records, final, isolation="serializable")
    assert problems == [], "seed %d:\n%s" % (seed, "\n".join(problems))
    return records


@pytest.mark.timeout(120)
def test_history_with_a_storage_killed(cluster, tmp_path):
    def faults():
        cluster.nodes["S1"].kill()
        wait_until(lambda: cluster.storage_state("S1") is NodeStates.DOWN, 30, "S1 down")
        pause(3)
        cluster.nodes["S1"].start()
        wait_until(cluster.all_up_to_date, 30, "S1 up to date")

    records = run_history(cluster, tmp_path, faults)
    # both replicas hold the same committed rows, every acknowledged one
    _, oids = read_final(**cluster.client_kwargs())
    cluster.stop()
    one, two = [read_replica(cluster.database(i), sorted([0, *map(u64, oids.values())]))
                for i in (1, 2)]
    assert one.meta and one.objs
    assert one.meta == two.meta
    assert one.objs == two.objs
    assert not one.voted and not two.voted and not one.tobjs and not two.tobjs
    assert all(state == "committed" for _, _, state in one.meta.values())
    acknowledged = {int(r["tid"], 16) for r in records if r["outcome"] == "ok"}
    assert acknowledged <= set(one.meta)


@pytest.mark.timeout(120)
def test_history_with_the_only_storage_killed(one_storage, tmp_path):
    """The cluster stops serving until its storage is back: transactions
    under way fail (error, or unknown), the workloads open a new client
    and go on."""
    cluster = one_storage

    def faults():
        cluster.nodes["S1"].kill()
        wait_until(lambda: cluster.cluster_state() != "RUNNING", 30, "the cluster to stop")
        cluster.nodes["S1"].start()
        cluster.wait_state("RUNNING", 30)

    run_history(cluster, tmp_path, faults)


@pytest.mark.timeout(60)
def test_read_current_deadlock(one_storage):
    """T1 (older) writes B then A; T2 (younger) checks A (readCurrent,
    which write-locks A on the storage) then writes B.  T2 waits for T1's
    B, T1 for T2's A: the storage asks T2 to give A back (NotifyDeadlock),
    as it would for a store, and T2's client relocks it (AskRelockObject),
    which lets T1 go on.  Then T1 votes and finishes, and T2 conflicts.
    Before the relock covered checked objects, neither vote ever returned
    (the history workload with ``--read-current`` hung within seconds)."""
    cluster = one_storage
    db = ZODB.DB(Storage(**cluster.client_kwargs()))
    try:
        conn = db.open()
        root = conn.root()
        root["A"], root["B"] = PersistentMapping(v=0), PersistentMapping(v=0)
        transaction.commit()
        a, b = root["A"], root["B"]
        oid_a, oid_b, serial_a, serial_b = a._p_oid, b._p_oid, a._p_serial, b._p_serial
        root_serial = root._p_serial
        data = db.storage.load(oid_a)[0]
    finally:
        db.close()
    s1, s2 = Storage(**cluster.client_kwargs()), Storage(**cluster.client_kwargs())
    t1, t2 = TransactionMetaData(), TransactionMetaData()
    # each TTID read before going on (tpc_begin does not wait for it): T1
    # gets the older one, and the stores leave as they are made
    s1.tpc_begin(t1)
    s1._commit(t1).known_ttid()
    s2.tpc_begin(t2)
    s2._commit(t2).known_ttid()
    # each step is settled on the (only) storage before the next one: a
    # load on the same connection is answered after it
    s1.store(oid_b, serial_b, data, "", t1)  # the first store leaves at once
    s1.loadSerial(z64, root_serial)
    s2.checkCurrentSerialInTransaction(oid_a, serial_a, t2)
    s2.loadSerial(z64, root_serial)
    s2.store(oid_b, serial_b, data, "", t2)  # waits for T1's lock on B
    s1.store(oid_a, serial_a, data, "", t1)  # sent with T1's vote
    outcome = {}

    def vote(name, storage, txn):
        try:
            storage.tpc_vote(txn)
            outcome[name] = "voted"
        except Exception as e:
            outcome[name] = e

    threads = {name: threading.Thread(target=vote, args=(name, s, t), daemon=True)
               for name, s, t in (("T1", s1, t1), ("T2", s2, t2))}
    try:
        threads["T2"].start()
        threads["T1"].start()
        threads["T1"].join(5)
        assert outcome.get("T1") == "voted", "T1's vote: %s after 5 s" % outcome.get("T1")
        s1.tpc_finish(t1)
        threads["T2"].join(5)
        assert isinstance(outcome.get("T2"), ConflictError), outcome
    finally:
        for s in (s1, s2):
            s.close()
