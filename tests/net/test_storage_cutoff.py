"""A storage cut off, under history workloads in hosts c1 and c2 (3
masters, 3 storages, replicas 1, 12 partitions, keep-alive 6 s):

- from the masters only (the clients still reach it): the primary finds
  it gone after about a keep-alive, marks it DOWN and its cells
  OUT_OF_DATE, the clients stop using it, and commits go on without it;
- from the clients only (the masters still reach it): each client finds
  its connection dead after a keep-alive, reports it (FailedVote) and
  commits go on;
- mid-commit: a transaction held between its vote and tpc_finish
  (tests/net/stepclient.py in host c3), then a storage holding one of its
  objects cut off (and, a second time, another one frozen): the master's
  lock request to it gets no answer until the keep-alive drops it, then
  the commit completes without it; then cuts of random storages for
  random lengths (some shorter than the keep-alive, some longer) under
  the workloads, so that they land in the middle of commits.

After each: heal, every cell UP_TO_DATE, the checker's verdict on every
history (no lost acknowledged commit, failed transactions without
effect, unknown outcomes all-or-nothing, serializable) and the replicas
compared row by row.  Seeds printed; NEOZODB_NET_SEED replays one."""
from __future__ import annotations

import random
import time

import pytest
from histnet import NetWorkloads, Stepper, cells_of, commit_times, net_cluster, verdict, windows

from neozodb.cli.cluster import wait_until
from neozodb.protocol import NodeStates
from seeds import replay_seed

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("netns_ok")]

MASTERS = ["m1", "m2", "m3"]
CLIENTS = ["c1", "c2"]


def cut_storage(tmp_path, what: str, cut, detected) -> None:
    """Under the workloads: ``cut(net)``, wait for ``detected(cluster)``
    (bounded by 4 keep-alives), commits of every client without the
    storage, heal, the verdict."""
    seed = replay_seed("NEOZODB_NET_SEED", what)
    with net_cluster(tmp_path, CLIENTS) as cluster:
        load = NetWorkloads(cluster, tmp_path, CLIENTS, seed)
        try:
            wait_until(load.more(5), 30, "first commits")
            start = time.monotonic()
            cut(cluster.net)
            wait_until(lambda: detected(cluster), cluster.keepalive * 4, what + " detected")
            found = time.monotonic() - start
            print("\n".join(cluster.pt_lines()))  # what an operator sees then
            wait_until(load.more(5), 60, "commits without S2")
            resumed = time.monotonic() - start
            # the storage stays cut as long again: commits go on meanwhile
            wait_until(load.more(5), 60, "more commits without S2")
            cluster.net.heal()
            healed = time.monotonic()
            gaps = windows(commit_times(load.records()), start, healed)
            print("%s: detected after %.1fs; every client committed 5 more after %.1fs;"
                  " healed after %.1fs; no commit for %s s" % (
                      what, found, resumed, healed - start, ["%.1f" % g for g in gaps]))
            wait_until(load.more(3), 60, "commits after the heal")
            verdict(cluster, load)
        finally:
            load.kill()


def test_storage_cut_from_the_masters(tmp_path):
    cut_storage(tmp_path, "S2 cut from the masters",
                lambda net: net.partition(["s2"], MASTERS),
                lambda cluster: cluster.storage_state("S2") is not NodeStates.RUNNING)


def test_storage_cut_from_the_clients(tmp_path):
    def out_of_date(cluster) -> bool:
        return "O" in cluster.cells().get("S2", "")
    cut_storage(tmp_path, "S2 cut from the clients",
                lambda net: net.partition(["s2"], CLIENTS), out_of_date)


def held_commit(cluster, step: Stepper, fault, what: str) -> str:
    """A transaction held after its vote, ``fault(storage)`` on a storage
    holding one of its objects, then its tpc_finish: it commits, after
    about a keep-alive.  Returns the storage."""
    _, oids, _ = step.hold()
    storage = cells_of(cluster, oids[0])[-1]
    fault(storage)
    step.release()
    record, took = step.outcome(cluster.keepalive * 6)
    print("%s %s between the vote and tpc_finish: %s after %.1fs" % (
        storage, what, record["outcome"], took))
    assert record["outcome"] == "ok", record
    return storage


def test_storage_cut_mid_commit(tmp_path):
    seed = replay_seed("NEOZODB_NET_SEED", "storages cut mid-commit")
    rng = random.Random(seed)
    with net_cluster(tmp_path, [*CLIENTS, "c3"]) as cluster:
        net = cluster.net
        load = NetWorkloads(cluster, tmp_path, CLIENTS, seed)
        try:
            step = Stepper(cluster, "c3", tmp_path, seed + 100)
            assert step.run(3).get("ok", 0) >= 1
            wait_until(load.more(5), 30, "first commits")
            cut = held_commit(cluster, step, lambda s: net.isolate(s.lower()), "cut off")
            net.heal()
            wait_until(lambda: cluster.all_up_to_date(), 60, "%s back UP_TO_DATE" % cut)

            def freeze(storage: str) -> None:
                net.freeze(cluster.nodes[storage])
            frozen = held_commit(cluster, step, freeze, "frozen")
            net.heal()
            wait_until(lambda: cluster.all_up_to_date(), 60, "%s back UP_TO_DATE" % frozen)
            assert step.run(3).get("ok", 0) >= 1
            step.quit()
            # cuts landing wherever the commits of the workloads are
            for _ in range(3):
                victim = rng.choice(["s1", "s2", "s3"])
                length = rng.uniform(0.5, cluster.keepalive * 1.5)
                net.isolate(victim)
                start = time.monotonic()
                wait_until(load.more(1, [rng.choice(CLIENTS)]), 60, "a commit")
                # the cut lasts ``length`` at least: its effect is the test
                time.sleep(max(0.0, length - (time.monotonic() - start)))
                net.heal()
                print("%s cut for %.1fs" % (victim, time.monotonic() - start))
                wait_until(lambda: cluster.all_up_to_date(), 60, "every cell UP_TO_DATE")
            wait_until(load.more(3), 60, "commits after the cuts")
            verdict(cluster, load, extra=[step.path])
        finally:
            load.kill()
