"""ZODB's storage conformance suite through NEO's client, against a NEO
cluster and against a neozodb cluster: every test that passes on NEO's
passes on ours.

The suite is neo_client_suite.py (the mixins of tests/zodb/test_conformance.py:
BasicStorage, SynchronizedStorage, MTStorage, RevisionStorage,
PersistentStorage, ReadOnlyStorage, ConflictResolvingStorage,
HistoryStorage, IteratorStorage, ExtendedIteratorStorage,
TransactionalUndoStorage, ConflictResolvingTransUndoStorage,
PackableStorageWithOptionalGC, PackableUndoStorage, and RecoveryStorage
from one cluster into a second one), one cluster per test: masters,
storages and admin all NEO's (``neo``) or all ours (``neozodb``), 2
storages, replicas 1, 12 partitions.  NEO's client patches ZODB when
imported, so each kind runs in its own pytest subprocess (both at once),
and the outcomes are read from its JUnit XML report.

As in NEO's own tests/zodb, the client waits for pack() to be applied
(``wait_for_pack``) and its undo log leaves out the transactions that
carry pack orders.

Left out (skipped in both runs):

- ``test_tid_ordering_w_commit``: expects lastTransaction() to block
  during tpc_finish, which ZODB 5.6 stopped requiring (ZODB PR #316);
  NEO's suite skips it too;
- ``test_race_external_invalidate_vs_disconnect``: a long test (ZODB's
  level 2) whose 64 workers each open 12 NEO clients; it does not end
  within its 120 s on either cluster;
- RecoveryStorage's ``testRestoreAcrossPack``: calls restore(), and NEO's
  client has none (no IStorageRestoreable: copyTransactionsFrom goes
  through tpc_begin(tid) and store);
- RecoveryStorage's ``testPackWithGCOnDestinationAfterRestore``: needs a
  pack with garbage collection, and NEO's client packs without (it ignores
  referencesf).

Expected to fail on both, for the same reasons (so not required): the
pack tests that expect garbage collection (``testPackAllRevisions``), or a
``gc`` argument to pack() (``testPackAllRevisionsNoGC``), and
``testPackUndoLog``, whose faked clock puts the pack time after every
transaction.  A failure on ours of a test that passed on NEO's is run once
more (NEO's client sometimes dies closing, in its own poll thread): it
must pass then, and is reported.
"""
from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor

import pytest
from neopeer import NEO_SRC

import neozodb

pytestmark = pytest.mark.timeout(1200)

HERE = os.path.dirname(os.path.abspath(__file__))
SUITE = os.path.join(HERE, "neo_client_suite.py")
SRC = os.path.dirname(os.path.dirname(os.path.abspath(neozodb.__file__)))
# whole runs: each test also has its own 120 s timeout inside
RUN_TIMEOUT = 1100


def run_suite(kind: str, directory: str, *pytest_args: str) -> dict[str, tuple[str, str]]:
    """Run the suite through NEO's client against a ``kind`` cluster:
    {test name: (outcome, message)}, outcome one of passed, failed,
    skipped."""
    os.makedirs(directory, exist_ok=True)
    report = os.path.join(directory, "report.xml")
    env = dict(os.environ, NEO_CLIENT_SUITE_CLUSTER=kind,
               PYTHONPATH=os.pathsep.join([NEO_SRC, SRC, HERE]))
    with open(os.path.join(directory, "output.txt"), "wb") as out:
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "--junitxml", report, SUITE, *pytest_args],
                       stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                       env=env, cwd=directory, timeout=RUN_TIMEOUT)
    outcomes = {}
    for case in ET.parse(report).iter("testcase"):
        name = "%s.%s" % (case.get("classname").rsplit(".", 1)[-1], case.get("name"))
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", child.get("message") or ""
                break
            if child.tag == "skipped":
                outcome, message = "skipped", child.get("message") or ""
        outcomes[name] = outcome, message
    return outcomes


def _counts(outcomes: dict) -> str:
    values = [outcome for outcome, _ in outcomes.values()]
    return ", ".join("%d %s" % (values.count(o), o) for o in ("passed", "failed", "skipped"))


def test_neo_client_passes_on_neozodb_what_it_passes_on_neo(tmp_path):
    with ThreadPoolExecutor(2) as pool:
        runs = {kind: pool.submit(run_suite, kind, str(tmp_path / kind))
                for kind in ("neo", "neozodb")}
        neo, ours = (runs[kind].result() for kind in ("neo", "neozodb"))
    print("NEO's client on a NEO cluster:", _counts(neo))
    print("NEO's client on a neozodb cluster:", _counts(ours))
    assert set(neo) == set(ours)
    # the harness works: most of ZODB's suite passes on NEO's cluster
    assert sum(outcome == "passed" for outcome, _ in neo.values()) > 70, neo
    regressions = sorted(name for name, (outcome, _) in neo.items()
                         if outcome == "passed" and ours[name][0] != "passed")
    if regressions:
        again = run_suite("neozodb", str(tmp_path / "neozodb-again"), "-k",
                          " or ".join(name.split(".")[1] for name in regressions))
        flaky = [name for name in regressions if again.get(name, ("",))[0] == "passed"]
        if flaky:
            print("failed once on neozodb, then passed:",
                  "; ".join("%s: %s" % (name, ours[name][1]) for name in flaky))
        regressions = [name for name in regressions if name not in flaky]
    assert not regressions, "\n".join("%s: %s" % (name, ours[name][1]) for name in regressions)
