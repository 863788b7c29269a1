"""The history workload (tests/history) on a NetCluster: one workload
process per client host, each with the cluster's keep-alive, running
read-modify-write transactions with ``readCurrent`` (serializable), and
the verdict once the network healed:

    workloads = NetWorkloads(cluster, directory, ["c1", "c2"], seed)
    wait_until(workloads.more(5), 30, "first commits")
    ...faults..., net.heal()
    result = verdict(cluster, workloads)      # asserts, returns numbers

``verdict`` waits until every cell is UP_TO_DATE, stops the workloads,
reads the final state with a fresh client (in a client host), runs the
checker (no lost acknowledged commit, failed transactions without effect,
unknown outcomes all-or-nothing, serializable), stops the cluster cleanly
and compares the replicas of every partition row by row (raw SQL,
tests/replicas.py), with no transaction left voted or locked.

Times are the processes' CLOCK_MONOTONIC, the same in every namespace:
a record's ``end`` compares with the test's ``time.monotonic()``."""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from history.checker import check, load, summary  # noqa: E402
from history.workload import workload_argv  # noqa: E402
from neozodb.cli.cluster import wait_until  # noqa: E402
from neozodb.ctl.neoctl import CtlError  # noqa: E402
from replicas import pending_rows, raw_contents  # noqa: E402

WORKLOAD = os.path.join(TESTS, "history", "workload.py")
STEPCLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stepclient.py")
GAP = 1.0  # seconds without a successful commit that count as unavailability


@contextmanager
def net_cluster(directory, clients: list[str], keepalive: float = 6, **kw):
    """A running NetCluster (3 masters, 3 storages, replicas 1, 12
    partitions) in a Network that also has the client hosts ``clients``;
    torn down however the block ends.  NEOZODB_NET_LOGLEVEL (e.g. DEBUG)
    sets the nodes' log level."""
    from netcluster import NetCluster
    from netns import Network
    with Network(NetCluster.host_names(3, 3) + list(clients)) as net:
        cluster = NetCluster(net, os.path.join(str(directory), "cluster"), masters=3,
                             storages=3, replicas=1, partitions=12, keepalive=keepalive,
                             loglevel=os.environ.get("NEOZODB_NET_LOGLEVEL", "INFO"), **kw)
        try:
            cluster.start(wait=60)
            yield cluster
        finally:
            cluster.kill()


class NetWorkloads:
    """Workload processes, one per client host, stopped by a stop file."""

    def __init__(self, cluster, directory, hosts: list[str], seed: int,
                 think: float = 0.0) -> None:
        self.cluster = cluster
        self.directory = str(directory)
        self.stop_file = os.path.join(self.directory, "stop")
        if os.path.exists(self.stop_file):  # histories carried on after a stop
            os.unlink(self.stop_file)
        self.clients = list(hosts)
        self.paths = [os.path.join(self.directory, c + ".jsonl") for c in self.clients]
        self.procs: list[subprocess.Popen] = []
        self.started = time.monotonic()
        for i, (client, path) in enumerate(zip(self.clients, self.paths, strict=True)):
            argv = workload_argv(cluster.masters, cluster.name, client, path, seed + i,
                                 stop_file=self.stop_file, read_current=True, think=think,
                                 keepalive=cluster.keepalive)
            with open(self._output(client), "a") as out:
                self.procs.append(cluster.net[client].run(argv, stdout=out,
                                                          stderr=subprocess.STDOUT))

    def _output(self, client: str) -> str:
        return os.path.join(self.directory, client + ".out")

    def output(self, client: str) -> str:
        with open(self._output(client)) as f:
            return f.read()[-3000:]

    def records(self) -> list[dict]:
        return load([p for p in self.paths if os.path.exists(p)])[0]

    def acknowledged(self) -> list[int]:
        """Commits acknowledged so far, per client; a workload that exited
        fails the test."""
        for client, proc in zip(self.clients, self.procs, strict=True):
            if proc.poll() is not None and not os.path.exists(self.stop_file):
                raise AssertionError("workload %s exited: %s" % (client, self.output(client)))
        tally = summary(self.records())
        return [tally.get(c, {}).get("ok", 0) for c in self.clients]

    def more(self, n: int, clients: list[str] | None = None):
        """A condition: each client (of ``clients``, default all)
        acknowledged n more commits."""
        start = dict(zip(self.clients, self.acknowledged(), strict=True))
        chosen = clients or self.clients

        def done() -> bool:
            now = dict(zip(self.clients, self.acknowledged(), strict=True))
            return all(now[c] >= start[c] + n for c in chosen)
        return done

    def stop(self, timeout: float = 60) -> None:
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


class Stepper:
    """stepclient.py in a client host: transactions one at a time, one
    held between its vote and tpc_finish.  Its history is ``path``."""

    def __init__(self, cluster, host: str, directory, seed: int) -> None:
        self.host = host
        self.path = os.path.join(str(directory), host + ".jsonl")
        self.errors = os.path.join(str(directory), host + ".err")
        with open(self.errors, "a") as err:
            self.proc = cluster.net[host].run(
                [sys.executable, STEPCLIENT, cluster.masters, cluster.name,
                 "%g" % cluster.keepalive, host, self.path, str(seed)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)

    def _say(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _answer(self, timeout: float) -> list[str]:
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise AssertionError("%s said nothing in %gs: %s" % (
                self.host, timeout, self.stderr()))
        line = self.proc.stdout.readline()
        assert line, "%s exited (%s): %s" % (self.host, self.proc.poll(), self.stderr())
        return line.split(" ", 1)

    def stderr(self) -> str:
        with open(self.errors) as f:
            return f.read()[-3000:]

    def run(self, n: int, timeout: float = 60) -> dict[str, int]:
        """Transactions until n committed (or too many failed); their
        outcomes {outcome: count}."""
        self._say("run %d" % n)
        word, rest = self._answer(timeout)
        assert word == "done", rest
        return json.loads(rest)

    def hold(self, timeout: float = 60) -> tuple[int, list[bytes], int]:
        """A transaction up to its vote: (its seq, the oids it stored, the
        client's node id)."""
        self._say("hold")
        word, rest = self._answer(timeout)
        assert word == "voted", rest
        seq, oids, nid = rest.split()
        return int(seq), [bytes.fromhex(o) for o in oids.split(",")], int(nid)

    def release(self) -> None:
        """Let the held transaction call tpc_finish."""
        self._say("finish")

    def outcome(self, timeout: float = 120) -> tuple[dict, float]:
        """The held transaction's record and the seconds its tpc_finish
        took."""
        word, rest = self._answer(timeout)
        assert word == "done", rest
        record, after = rest.rsplit(" after ", 1)
        return json.loads(record), float(after)

    def quit(self) -> None:
        self._say("quit")
        assert self.proc.wait(30) == 0, self.stderr()


def clients(cluster) -> set[int]:
    """The node ids of the clients the admin lists as running."""
    from neozodb.protocol import NodeStates, NodeTypes
    ctl = cluster.ctl()
    try:
        return {node[2] for node in ctl.nodes(NodeTypes.CLIENT) if node[3] is NodeStates.RUNNING}
    finally:
        ctl.close()


def present(final: dict, record: dict) -> list[bool]:
    """For each list element a transaction appended: is it in ``final``?"""
    return [element in final.get(key, []) for key, wrote in record["writes"].items()
            if isinstance(wrote, list) for element in wrote]


def cells_of(cluster, oid: bytes) -> list[str]:
    """The storages with an UP_TO_DATE cell of ``oid``'s partition."""
    p = int.from_bytes(oid, "big") % cluster.partitions
    return sorted(name for name, row in cluster.cells().items() if row[p] == "U")


def commit_times(records, since: float = 0.0) -> list[float]:
    """When each acknowledged commit returned, sorted."""
    return sorted(r["end"] for r in records if r["outcome"] == "ok" and r["end"] >= since)


def windows(times: list[float], start: float, end: float, gap: float = GAP) -> list[float]:
    """Lengths of the periods of at least ``gap`` seconds between ``start``
    and ``end`` without a successful commit (``times``: commit times)."""
    marks = [start] + [t for t in times if start < t < end] + [end]
    return [b - a for a, b in zip(marks, marks[1:], strict=False) if b - a >= gap]


def final_state(cluster, host: str, directory) -> dict:
    """The workload's keys as a fresh client in ``host`` reads them."""
    out = os.path.join(str(directory), "final.json")
    done = cluster.net[host].call(
        [sys.executable, WORKLOAD, "final", "--masters", cluster.masters, "--cluster",
         cluster.name, "--keepalive", "%g" % cluster.keepalive, "--out", out],
        timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out, encoding="utf-8") as f:
        return json.load(f)


def compare_replicas(cluster, cells: dict[str, str]) -> int:
    """Every partition's cells hold the same rows (raw SQL, the cluster
    stopped) and no storage kept a transaction voted or locked; returns
    the count of transactions compared."""
    contents = {name: raw_contents(cluster.database(int(name[1:]))) for name in cells}
    compared = 0
    for name in cells:
        left = pending_rows(cluster.database(int(name[1:])))
        assert not any(left.values()), "%s kept %s" % (name, left)
    for p in range(cluster.partitions):
        holders = [name for name, row in sorted(cells.items()) if row[p] == "U"]
        assert len(holders) == cluster.replicas + 1, (p, cells)
        first = contents[holders[0]][p]
        for other in holders[1:]:
            assert contents[other][p] == first, "partition %d differs: %s and %s" % (
                p, holders[0], other)
        compared += len(first[0])
    return compared


@dataclass
class Verdict:
    tally: dict
    attempted: int
    acknowledged: int
    unknown: int
    problems: list[str]
    transactions_compared: int
    records: list[dict] = field(repr=False)
    final: dict = field(repr=False)

    def line(self) -> str:
        return ("%d transactions attempted, %d acknowledged, %d unknown, %d lost; replicas"
                " identical (%d transactions)" % (
                    self.attempted, self.acknowledged, self.unknown,
                    sum(p.startswith("lost commit") for p in self.problems),
                    self.transactions_compared))


def verdict(cluster, workloads: NetWorkloads, reader: str | None = None,
            extra: list[str] = (), up_to_date: float = 60, strict: bool = True) -> Verdict:
    """Once the network healed: wait for every cell UP_TO_DATE, stop the
    workloads, check the histories (also those in ``extra`` files)
    against the final state read from host ``reader`` (default: the first
    client's), stop the cluster and compare its replicas.  Asserts; the
    numbers are returned (with ``strict=False``, problems are returned,
    not asserted, the replicas' differences among them)."""
    start = time.monotonic()
    try:
        wait_until(lambda: _up_to_date(cluster), up_to_date, "every cell UP_TO_DATE")
    except TimeoutError:
        diagnose(cluster)
        raise
    print("every cell UP_TO_DATE %.1fs after the heal" % (time.monotonic() - start))
    workloads.stop()
    records, cut = load([p for p in [*workloads.paths, *extra] if os.path.exists(p)])
    assert cut == 0, "%d history lines cut short" % cut
    final = final_state(cluster, reader or workloads.clients[0], workloads.directory)
    problems = check(records, final, isolation="serializable")
    tally = summary(records)
    cells = cluster.cells()
    cluster.stop(timeout=60)
    try:
        compared = compare_replicas(cluster, cells)
    except AssertionError as e:
        if strict:
            raise
        problems.append("replicas: %s" % e)
        compared = 0
    count = {o: sum(t.get(o, 0) for t in tally.values()) for o in
             ("ok", "unknown", "pending")}
    result = Verdict(tally, len(records), count["ok"], count["unknown"] + count["pending"],
                     problems, compared, records, final)
    print("outcomes:", tally)
    if strict:
        assert problems == [], "\n".join(problems)
        print(result.line())
    return result


def diagnose(cluster) -> None:
    """Print the table and have every storage log its transactions, locks
    and delayed requests (SIGUSR1): where a catch-up is stuck."""
    import signal
    try:
        print("\n".join(cluster.pt_lines()))
    except (CtlError, OSError) as e:
        print("no table: %s" % e)
    for name, node in cluster.nodes.items():
        if name.startswith("S") and node.running:
            node.signal(signal.SIGUSR1)


def _up_to_date(cluster) -> bool:
    try:
        return cluster.cluster_state() == "RUNNING" and cluster.all_up_to_date()
    except (CtlError, OSError):  # the admin not following a primary yet
        return False
