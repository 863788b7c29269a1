"""The history checker (tests/history/checker.py) on synthetic histories:
one per anomaly, each must be flagged and named, and valid ones, serial
or concurrent (simulated executions under serializability or snapshot
isolation), that must pass."""
from __future__ import annotations

import bisect
import json
import random
import time

import pytest

from history.checker import check, load, main, tarjan

pytestmark = pytest.mark.timeout(60)


def txn(name: str, outcome: str = "ok", reads=None, writes=None, tid=None) -> dict:
    client, seq = name.split(":")
    return {"client": client, "seq": int(seq), "outcome": outcome, "reads": reads or {},
            "writes": writes or {}, "tid": tid}


def flagged(problems: list[str], kind: str, *words: str) -> str:
    """The problem of ``kind`` naming every word in ``words``."""
    for problem in problems:
        if problem.startswith(kind + ":") and all(w in problem for w in words):
            return problem
    raise AssertionError("no %r problem naming %s in %s" % (kind, words, problems))


# -- valid histories --------------------------------------------------------------------

def test_serial_history_passes():
    history = [
        txn("c1:1", reads={"lst0": [], "ctr0": 0}, writes={"lst0": ["c1-1"], "ctr0": 1},
            tid="01"),
        txn("c2:1", reads={"lst0": ["c1-1"]}, writes={"lst0": ["c2-1", "c2-1.1"]}, tid="02"),
        txn("c1:2", "conflict", reads={"lst0": ["c1-1"]}, writes={"lst0": ["c1-2"]}),
        txn("c1:3", "error", reads={"ctr0": 1}, writes={"ctr0": 1}),
        txn("c2:2", reads={"lst0": ["c1-1", "c2-1", "c2-1.1"], "ctr0": 1},
            writes={"ctr0": 1}, tid="03"),
    ]
    final = {"lst0": ["c1-1", "c2-1", "c2-1.1"], "ctr0": 2}
    assert check(history, final) == []


@pytest.mark.parametrize("applied", [True, False])
def test_unknown_wholly_applied_or_absent_passes(applied):
    history = [
        txn("c1:1", reads={"lst0": []}, writes={"lst0": ["c1-1"]}, tid="01"),
        txn("c2:1", "unknown", reads={"lst0": ["c1-1"], "ctr0": 0},
            writes={"lst0": ["c2-1"], "lst1": ["c2-1"], "ctr0": 1}),
        txn("c3:1", "pending", reads={"lst1": []}, writes={"lst1": ["c3-1"]}),
        txn("c1:2", reads={"lst0": ["c1-1", "c2-1"] if applied else ["c1-1"]},
            writes={"ctr0": 1}, tid="03"),
    ]
    final = {"lst0": ["c1-1", "c2-1"] if applied else ["c1-1"],
             "lst1": ["c2-1"] if applied else ["c3-1"], "ctr0": 2 if applied else 1}
    assert check(history, final) == []


def test_concurrent_serializable_interleaving_passes():
    # c2 did not see c1's append but wrote elsewhere: serial order c2, c1, c3
    history = [
        txn("c1:1", reads={"lst0": []}, writes={"lst0": ["c1-1"]}, tid="02"),
        txn("c2:1", reads={"lst0": []}, writes={"lst1": ["c2-1"]}, tid="01"),
        txn("c3:1", reads={"lst0": ["c1-1"], "lst1": ["c2-1"]}, writes={"lst1": ["c3-1"]},
            tid="03"),
    ]
    final = {"lst0": ["c1-1"], "lst1": ["c2-1", "c3-1"]}
    assert check(history, final) == []


def write_skew() -> tuple[list[dict], dict]:
    """Each read the list the other appended to, before it did: G2."""
    history = [
        txn("c1:1", reads={"lst0": []}, writes={"lst1": ["c1-1"]}, tid="01"),
        txn("c2:1", reads={"lst1": []}, writes={"lst0": ["c2-1"]}, tid="02"),
    ]
    return history, {"lst0": ["c2-1"], "lst1": ["c1-1"]}


def test_write_skew_is_a_g2_cycle_allowed_by_snapshot_isolation():
    history, final = write_skew()
    problems = check(history, final)
    assert len(problems) == 1
    flagged(problems, "cycle", "G2", "c1:1", "c2:1", "rw lst0", "rw lst1")
    assert check(history, final, isolation="snapshot") == []


def simulate(n: int, seed: int, isolation: str = "serializable", clients: int = 3,
             counters: int = 4, lists: int = 6, lag: int = 4) -> tuple[list[dict], dict]:
    """A concurrent execution: each transaction reads a snapshot up to
    ``lag`` commits old (never older than its client's last one), and
    commits unless a key it writes (serializable: or reads) changed since;
    some are told error or unknown, applied or not.  Returns (records,
    final state)."""
    rng = random.Random(seed)
    keys = ["ctr%d" % i for i in range(counters)] + ["lst%d" % i for i in range(lists)]
    current = {k: 0 if k.startswith("ctr") else [] for k in keys}
    levels = {k: ([0], [0]) for k in keys}  # commits, value (or length) after each
    last_write = dict.fromkeys(keys, 0)
    floor = dict.fromkeys(range(clients), 0)
    seqs = dict.fromkeys(range(clients), 0)
    commits = 0
    records = []
    for _ in range(n):
        c = rng.randrange(clients)
        seqs[c] += 1
        name = "c%d:%d" % (c, seqs[c])
        snap = floor[c] = rng.randint(max(floor[c], commits - lag), commits)
        touched = rng.sample(keys, rng.randint(1, 3))
        written = rng.sample(touched, rng.randint(1, min(2, len(touched))))
        reads, writes = {}, {}
        for k in touched:
            at, values = levels[k]
            level = values[bisect.bisect_right(at, snap) - 1]
            reads[k] = current[k][:level] if k.startswith("lst") else level
        for k in written:
            element = name.replace(":", "-")
            writes[k] = 1 if k.startswith("ctr") else (
                [element, element + ".1"] if rng.random() < 0.1 else [element])
        checked = touched if isolation == "serializable" else written
        if any(last_write[k] > snap for k in checked):
            outcome, applied = "conflict", False
        else:
            outcome, applied = rng.choices(
                [("ok", True), ("error", False), ("unknown", True), ("unknown", False)],
                [85, 5, 5, 5])[0]
        tid = None
        if applied:
            commits += 1
            for k, w in writes.items():
                if k.startswith("ctr"):
                    current[k] += w
                else:
                    current[k].extend(w)
                levels[k][0].append(commits)
                levels[k][1].append(_level(current[k]))
                last_write[k] = commits
            tid = "%016x" % commits
            if outcome == "ok":
                floor[c] = commits  # it reads its own writes from then on
        records.append(txn(name, outcome, reads, writes, tid if outcome == "ok" else None))
    return records, {k: list(v) if isinstance(v, list) else v for k, v in current.items()}


def _level(value) -> int:
    return len(value) if isinstance(value, list) else value


@pytest.mark.parametrize("seed", range(5))
def test_simulated_executions_pass(seed):
    records, final = simulate(600, seed)
    assert check(records, final) == []
    records, final = simulate(600, seed, isolation="snapshot")
    assert check(records, final, isolation="snapshot") == []
    # the same snapshot-isolated executions are seldom serializable: what
    # the checker says of them then is write skew, nothing else
    assert all(p.startswith("cycle: G2: ") for p in check(records, final))


def test_large_history_is_checked_fast():
    records, final = simulate(20000, 7, counters=10, lists=40, lag=6)
    start = time.monotonic()
    assert check(records, final) == []
    elapsed = time.monotonic() - start
    print("20000 transactions checked in %.2f s" % elapsed)
    assert elapsed < 20
    lost = next(r for r in reversed(records) if r["outcome"] == "ok"
                and any(isinstance(w, list) for w in r["writes"].values()))
    key, elements = next((k, w) for k, w in lost["writes"].items() if isinstance(w, list))
    final[key] = [e for e in final[key] if e not in elements]
    flagged(check(records, final), "lost commit", "%s:%s" % (lost["client"], lost["seq"]))


# -- anomalies --------------------------------------------------------------------------

def test_lost_commit_of_a_list_element():
    history = [txn("c1:1", reads={"lst0": []}, writes={"lst0": ["c1-1"]}, tid="01"),
               txn("c2:1", reads={"lst0": ["c1-1"]}, writes={"lst0": ["c2-1"]}, tid="02")]
    problems = check(history, {"lst0": ["c1-1"]})
    assert flagged(problems, "lost commit", "c2:1", "'c2-1'", "lst0")


def test_lost_increment_and_too_many():
    history = [txn("c1:%d" % i, reads={"ctr0": i - 1}, writes={"ctr0": 1}, tid="%02x" % i)
               for i in range(1, 4)] + [txn("c2:1", "unknown", writes={"ctr0": 1}),
                                        txn("c2:2", "conflict", writes={"ctr0": 1})]
    assert check(history, {"ctr0": 3}) == check(history, {"ctr0": 4}) == []
    flagged(check(history, {"ctr0": 2}), "lost commit", "ctr0 is 2", "3 acknowledged")
    flagged(check(history, {"ctr0": 5}), "counter too high", "ctr0 is 5", "1 unknown")


def test_lost_update_of_a_counter():
    history = [txn("c1:1", reads={"ctr0": 4}, writes={"ctr0": 1}, tid="01"),
               txn("c2:1", reads={"ctr0": 4}, writes={"ctr0": 1}, tid="02")]
    flagged(check(history, {"ctr0": 5}), "lost update", "c1:1", "c2:1", "ctr0 = 4")


def test_impossible_counter_read():
    history = [txn("c1:1", reads={"ctr0": 7}, writes={"lst0": ["c1-1"]}, tid="01")]
    flagged(check(history, {"ctr0": 0, "lst0": ["c1-1"]}), "impossible read", "c1:1", "ctr0 = 7")


@pytest.mark.parametrize("outcome", ["conflict", "error"])
def test_aborted_write_visible(outcome):
    history = [txn("c1:1", outcome, reads={"lst0": []}, writes={"lst0": ["c1-1"]}),
               txn("c2:1", reads={"lst0": ["c1-1"]}, writes={"ctr0": 1}, tid="01")]
    problems = check(history, {"lst0": ["c1-1"], "ctr0": 1})
    flagged(problems, "aborted write", "c1:1 (%s)" % outcome, "'c1-1'")
    flagged(problems, "aborted read", "c2:1", "'c1-1'")


def test_aborted_read():
    history = [txn("c1:1", "conflict", reads={"lst0": []}, writes={"lst0": ["c1-1"]}),
               txn("c2:1", reads={"lst0": ["c1-1"]}, writes={"lst1": ["c2-1"]}, tid="01")]
    problems = check(history, {"lst0": [], "lst1": ["c2-1"]})
    flagged(problems, "aborted read", "c2:1", "'c1-1'", "c1:1 (conflict)")
    flagged(problems, "incompatible order", "c2:1")


def test_partially_applied_unknown():
    history = [txn("c1:1", "unknown", reads={"lst0": []},
                   writes={"lst0": ["c1-1"], "lst1": ["c1-1"]})]
    problems = check(history, {"lst0": ["c1-1"], "lst1": []})
    flagged(problems, "partial unknown", "c1:1", "'c1-1' in lst0", "'c1-1' in lst1")


def test_duplicates_in_final_state_and_in_a_read():
    history = [txn("c1:1", reads={"lst0": []}, writes={"lst0": ["c1-1"]}, tid="01"),
               txn("c2:1", reads={"lst0": ["c1-1", "c1-1"]}, writes={"ctr0": 1}, tid="02")]
    problems = check(history, {"lst0": ["c1-1", "c1-1"], "ctr0": 1})
    flagged(problems, "duplicate element", "'c1-1' twice in the final lst0")
    flagged(problems, "duplicate element", "c2:1", "lst0")


def test_unexplained_element():
    flagged(check([], {"lst0": ["x-1"]}), "unexplained element", "'x-1'", "lst0")


def test_element_written_twice():
    history = [txn("c1:1", writes={"lst0": ["e"]}, tid="01"),
               txn("c2:1", writes={"lst0": ["e"]}, tid="02")]
    flagged(check(history, {"lst0": ["e"]}), "element written twice", "c1:1", "c2:1")


def test_incompatible_order():
    history = [txn("c1:1", reads={"lst0": []}, writes={"lst0": ["c1-1"]}, tid="01"),
               txn("c2:1", reads={"lst0": []}, writes={"lst0": ["c2-1"]}, tid="02"),
               txn("c3:1", reads={"lst0": ["c2-1"]}, writes={"ctr0": 1}, tid="03")]
    problems = check(history, {"lst0": ["c1-1", "c2-1"], "ctr0": 1})
    flagged(problems, "incompatible order", "c3:1", "read 'c2-1', final 'c1-1'")


def test_future_read():
    history = [txn("c1:1", reads={"lst0": ["c1-1"]}, writes={"lst0": ["c1-1"]}, tid="01")]
    flagged(check(history, {"lst0": ["c1-1"]}), "future read", "c1:1", "'c1-1'")


def test_intermediate_read():
    history = [txn("c1:1", reads={"lst0": []}, writes={"lst0": ["c1-1", "c1-1.1"]}, tid="01"),
               txn("c2:1", reads={"lst0": ["c1-1"]}, writes={"ctr0": 1}, tid="02")]
    problems = check(history, {"lst0": ["c1-1", "c1-1.1"], "ctr0": 1})
    flagged(problems, "intermediate read", "c2:1", "c1:1")


def test_g0_write_cycle():
    # c1 then c2 in lst0, c2 then c1 in lst1
    history = [txn("c1:1", writes={"lst0": ["c1-1"], "lst1": ["c1-1"]}, tid="01"),
               txn("c2:1", writes={"lst0": ["c2-1"], "lst1": ["c2-1"]}, tid="02")]
    problems = check(history, {"lst0": ["c1-1", "c2-1"], "lst1": ["c2-1", "c1-1"]})
    flagged(problems, "cycle", "G0", "c1:1", "c2:1", "ww lst0", "ww lst1")
    flagged(check(history, {"lst0": ["c1-1", "c2-1"], "lst1": ["c2-1", "c1-1"]},
                  isolation="snapshot"), "cycle", "G0")


def test_g1c_circular_information_flow():
    # c2 appended after c1 in lst0, yet c1 read c2's element of lst1
    history = [txn("c1:1", reads={"lst1": ["c2-1"]}, writes={"lst0": ["c1-1"]}, tid="01"),
               txn("c2:1", reads={"lst0": []}, writes={"lst0": ["c2-1"], "lst1": ["c2-1"]},
                   tid="02")]
    problems = check(history, {"lst0": ["c1-1", "c2-1"], "lst1": ["c2-1"]}, isolation="snapshot")
    flagged(problems, "cycle", "G1c", "c1:1", "c2:1", "wr lst1")


def test_g_single_lost_append():
    # both read lst0 empty and appended: one of them should have conflicted
    history = [txn("c1:1", reads={"lst0": []}, writes={"lst0": ["c1-1"]}, tid="01"),
               txn("c2:1", reads={"lst0": []}, writes={"lst0": ["c2-1"]}, tid="02")]
    problems = check(history, {"lst0": ["c1-1", "c2-1"]}, isolation="snapshot")
    flagged(problems, "cycle", "G-single", "rw lst0", "ww lst0")


def test_g_single_read_skew_in_a_longer_cycle():
    # c3 saw c2's append to lst1 but not c1's earlier append to lst0,
    # which c2 had read: c3 -rw-> c1 -wr-> c2 -wr-> c3
    history = [txn("c1:1", reads={"lst0": []}, writes={"lst0": ["c1-1"]}, tid="01"),
               txn("c2:1", reads={"lst0": ["c1-1"]}, writes={"lst1": ["c2-1"]}, tid="02"),
               txn("c3:1", reads={"lst0": [], "lst1": ["c2-1"]}, writes={"ctr0": 1},
                   tid="03")]
    final = {"lst0": ["c1-1"], "lst1": ["c2-1"], "ctr0": 1}
    # c3 wrote no list: it is committed but only its reads give edges
    problem = flagged(check(history, final), "cycle", "G-single", "c1:1", "c2:1", "c3:1")
    assert "(a strongly connected component of 3 transactions)" in problem


def test_non_monotonic_reads_of_a_client():
    history = [txn("c1:1", reads={"lst0": ["c2-1", "c2-2"]}, writes={"ctr0": 1}, tid="03"),
               txn("c1:2", "conflict", reads={"lst0": ["c2-1"]}, writes={"ctr0": 1}),
               txn("c2:1", reads={"lst0": []}, writes={"lst0": ["c2-1"]}, tid="01"),
               txn("c2:2", reads={"lst0": ["c2-1"]}, writes={"lst0": ["c2-2"]}, tid="02")]
    problems = check(history, {"lst0": ["c2-1", "c2-2"], "ctr0": 1})
    flagged(problems, "non-monotonic read", "c1:2", "lst0 at 1", "c1:1 read it at 2")


def test_client_does_not_see_its_own_committed_write():
    history = [txn("c1:1", reads={"lst0": [], "ctr0": 3}, writes={"lst0": ["c1-1"], "ctr0": 1},
                   tid="01"),
               txn("c1:2", reads={"lst0": []}, writes={"lst1": ["c1-2"]}, tid="02"),
               txn("c1:3", reads={"ctr0": 3}, writes={"lst1": ["c1-3"]}, tid="03")]
    problems = check(history, {"lst0": ["c1-1"], "lst1": ["c1-2", "c1-3"], "ctr0": 4})
    flagged(problems, "non-monotonic read", "c1:2", "lst0 at 0", "c1:1 wrote it to 1")
    flagged(problems, "non-monotonic read", "c1:3", "ctr0 at 3", "c1:1 wrote it to 4")


def test_tid_order_and_duplicate_tids():
    history = [txn("c1:1", reads={"lst0": []}, writes={"lst0": ["c1-1"]}, tid="05"),
               txn("c2:1", reads={"lst0": ["c1-1"]}, writes={"lst0": ["c2-1"]}, tid="04"),
               txn("c3:1", writes={"ctr0": 1}, tid="04")]
    problems = check(history, {"lst0": ["c1-1", "c2-1"], "ctr0": 1})
    flagged(problems, "tid order", "c1:1", "c2:1", "goes back")
    flagged(problems, "tid order", "c2:1", "c3:1", "both given tid 04")


def test_malformed_records():
    problems = check([{"client": "c1"}, txn("c1:1", "maybe"), txn("c2:1", tid="xyz")], {})
    assert len([p for p in problems if p.startswith("malformed record:")]) == 3, problems


def test_messages_are_capped_per_kind():
    history = [txn("c1:%d" % i, reads={"lst0": []}, writes={"lst0": ["c1-%d" % i]},
                   tid="%02x" % i) for i in range(1, 31)]
    problems = check(history, {"lst0": []}, max_per_kind=5)
    assert len(problems) == 6 and problems[-1] == "lost commit: 25 more"


# -- parts --------------------------------------------------------------------------------

def test_tarjan_components():
    graph = {1: [2], 2: [3], 3: [1, 4], 4: [5], 5: [4], 6: []}
    components = tarjan(sorted(graph), lambda u: graph[u])
    assert sorted(sorted(c) for c in components) == [[1, 2, 3], [4, 5], [6]]
    chain = {i: [i + 1] for i in range(100000)}
    chain[100000] = [0]  # one long cycle: no recursion limit
    assert len(tarjan(range(100001), lambda u: chain[u])) == 1


def test_load_keeps_the_last_line_and_the_command_line(tmp_path, capsys):
    path = tmp_path / "c1.jsonl"
    pending = txn("c1:1", "pending", reads={"lst0": []}, writes={"lst0": ["c1-1"]})
    done = dict(pending, outcome="ok", tid="01")
    path.write_text(json.dumps(pending) + "\n" + json.dumps(done) + "\n"
                    + json.dumps(txn("c1:2", "pending", writes={"ctr0": 1}))
                    + "\n" + '{"client": "c1", "se')
    records, bad = load([str(path)])
    assert bad == 1
    assert sorted((r["seq"], r["outcome"]) for r in records) == [(1, "ok"), (2, "pending")]
    final = tmp_path / "final.json"
    final.write_text(json.dumps({"lst0": ["c1-1"], "ctr0": 0}))
    assert main(["--final", str(final), str(path)]) == 0
    final.write_text(json.dumps({"lst0": [], "ctr0": 0}))
    assert main(["--final", str(final), str(path)]) == 1
    assert "lost commit: c1:1 (ok, tid 01)" in capsys.readouterr().out
