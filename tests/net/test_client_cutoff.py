"""A client cut off between its vote and its tpc_finish (3 masters, 3
storages, replicas 1, keep-alive 6 s; the client in host c1 driven step by
step by tests/net/stepclient.py, a history workload in host c2 all along):

- cut both ways from the masters before tpc_finish is sent: the finish
  never reaches a master, which aborts the transaction when it finds the
  client gone; the client, healed, asks whether it was committed and is
  told it was not;
- only the masters' packets to the client dropped, tpc_finish sent: the
  master commits, its answer is lost; the client finds its connection
  dead (keep-alive), reconnects once healed and learns its TID
  (AskFinalTID) or that it was not committed, never both.

Either way the outcome is definite after healing: the checker finds the
transaction wholly there or wholly absent (and there when the finish
reached the master), the client's next transactions commit, and the
history of both clients passes the checker with replicas identical.
NEOZODB_NET_SEED replays the transactions (seed printed)."""
from __future__ import annotations

import time

import pytest
from histnet import NetWorkloads, Stepper, clients, net_cluster, present, verdict

from neozodb.cli.cluster import wait_until
from seeds import replay_seed

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("netns_ok")]

MASTERS = ("m1", "m2", "m3")


def held_commit(cluster, step: Stepper, cut, what: str) -> dict:
    """A transaction of ``step`` held after its vote, ``cut()`` applied,
    then its tpc_finish let go; the network healed once the master dropped
    the client (the admin lists it no more).  Its record."""
    _, _, nid = step.hold()
    assert nid in clients(cluster)
    cut()
    start = time.monotonic()
    step.release()
    wait_until(lambda: nid not in clients(cluster), cluster.keepalive * 4,
               "the master to drop the client cut off")
    dropped = time.monotonic() - start
    cluster.net.heal()
    record, took = step.outcome(120)
    print("%s: the master dropped the client after %.1fs, healed; outcome %s after %.1fs:"
          " %s" % (what, dropped, record["outcome"], took, record["error"]))
    assert record["outcome"] in ("ok", "unknown"), record
    after = step.run(5)
    assert after.get("ok", 0) >= 1, "the client's next transactions: %s" % after
    return record


def test_client_cut_between_vote_and_finish(tmp_path):
    seed = replay_seed("NEOZODB_NET_SEED", "client cut-off")
    with net_cluster(tmp_path, ["c1", "c2"]) as cluster:
        net = cluster.net
        load = NetWorkloads(cluster, tmp_path, ["c2"], seed)
        try:
            step = Stepper(cluster, "c1", tmp_path, seed + 100)
            assert step.run(5).get("ok", 0) >= 1
            wait_until(load.more(5), 30, "the c2 workload's first commits")
            unsent = held_commit(cluster, step, lambda: net.partition(["c1"], MASTERS),
                                 "cut both ways before the finish")

            def answer_lost() -> None:
                for master in MASTERS:
                    net.cut(master, "c1")
            lost = held_commit(cluster, step, answer_lost, "the finish's answer lost")
            wait_until(load.more(3), 60, "the c2 workload's commits after the heals")
            step.quit()
            result = verdict(cluster, load, extra=[step.path])
        finally:
            load.kill()
    # the checker found each wholly there or absent; which one is known here
    assert not any(present(result.final, unsent)), unsent
    assert all(present(result.final, lost)), lost
    assert lost["outcome"] == "ok" or "not committed" not in (lost["error"] or ""), lost
