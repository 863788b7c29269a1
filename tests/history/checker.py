"""A history checker in the spirit of Jepsen's Elle (list-append), for the
histories ``workload.py`` records and the final state a fresh client reads.

``check(records, final_state)`` returns problems, one sentence each naming
the transactions involved (``client:seq``); none means that none of the
anomalies below was found: not a proof that the execution was
serializable (or snapshot-isolated), but every violation these histories
can show (through the lists) and that is listed is looked for.
The core is pure; ``load`` and ``main`` (the command line) do the I/O::

    python tests/history/checker.py --final final.json c1.jsonl c2.jsonl

Keys holding an int are counters (writes: increments), keys holding a list
are append-only lists (writes: the elements appended, unique); every key
starts at 0 or empty.  Outcomes: "ok" (committed), "conflict" and "error"
(certainly not committed), "unknown" and "pending" (either).  A
transaction is taken as committed when "ok", or "unknown" with an
element it appended in the final state.

What is checked:

- lost commit: an element of an "ok" transaction is not in the final list;
  a counter ends below its "ok" increments (or above "ok" plus "unknown");
  lost update: two "ok" increments of a counter read the same value;
- aborted write / aborted read: an element of a "conflict"/"error"
  transaction is in the final state / was read;
- partial unknown: an "unknown" transaction with some elements in the final
  state and not others;
- duplicate element, unexplained element (written by no transaction),
  element written twice (by two records);
- incompatible order: a read of a list that is not a prefix of its final
  list (the final list gives each list's version order);
- intermediate read: a read ending between two elements one transaction
  appended to the same list;
- cycle (G0: ww edges only; G1c: ww and wr; G-single: one rw; G2: more rw)
  in the dependency graph of committed transactions: ww (an element
  follows another's in a list), wr (a read's last element was written by
  another), rw (a read did not see the element following its prefix);
  strongly connected components by Tarjan's algorithm, one cycle shown per
  component, the most severe kind found; with ``isolation="snapshot"``
  (ZODB without readCurrent) a component with G2 cycles only is allowed;
- tid order: an edge ww or wr between "ok" transactions goes from a TID to
  a lower one, or two "ok" transactions were given the same TID;
- non-monotonic read: a transaction of a client reads a shorter prefix of a
  list, or a lower counter, than an earlier transaction of the same client
  read (whatever its outcome), or than an earlier "ok" one wrote.

Not checked: real-time order between clients (strict serializability),
reads of counters against the graph (counters carry no order), and
committed transactions that only incremented counters (they cannot be
told from uncommitted ones, and stay out of the graph).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import deque
from dataclasses import dataclass, field

OUTCOMES = ("ok", "conflict", "error", "unknown", "pending")
ABORTED = ("conflict", "error")
ISOLATIONS = ("serializable", "snapshot")


@dataclass
class Txn:
    client: str
    seq: int
    outcome: str
    reads: dict
    writes: dict
    tid: str | None = None
    error: str | None = None
    committed: bool = False
    pending: bool = False  # no outcome recorded: the process died in the commit

    @property
    def name(self) -> str:
        return "%s:%s" % (self.client, self.seq)

    def describe(self) -> str:
        tid = ", tid %s" % self.tid if self.tid else ""
        return "%s (%s%s)" % (self.name, "pending" if self.pending else self.outcome, tid)


@dataclass
class _Problems:
    cap: int
    kinds: dict[str, list[str]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, message: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        found = self.kinds.setdefault(kind, [])
        if len(found) < self.cap:
            found.append("%s: %s" % (kind, message))

    def result(self) -> list[str]:
        out = []
        for kind, messages in self.kinds.items():
            out += messages
            if self.counts[kind] > len(messages):
                out.append("%s: %d more" % (kind, self.counts[kind] - len(messages)))
        return out


def _txns(records, problems: _Problems) -> list[Txn]:
    txns, seen = [], set()
    for record in records:
        try:
            txn = Txn(str(record["client"]), int(record["seq"]), record["outcome"],
                      dict(record.get("reads") or {}), dict(record.get("writes") or {}),
                      record.get("tid"), record.get("error"))
            if txn.tid is not None:
                int(txn.tid, 16)
        except (KeyError, TypeError, ValueError) as e:
            problems.add("malformed record", "%r (%s)" % (record, e))
            continue
        if txn.outcome not in OUTCOMES:
            problems.add("malformed record", "%s: outcome %r" % (txn.name, txn.outcome))
            continue
        if (txn.client, txn.seq) in seen:
            problems.add("malformed record", "%s recorded twice" % txn.name)
            continue
        seen.add((txn.client, txn.seq))
        if txn.outcome == "pending":
            txn.outcome, txn.pending = "unknown", True
        txns.append(txn)
    return txns


def _level(value) -> int:
    return len(value) if isinstance(value, list) else value


def check(histories, final_state: dict, isolation: str = "serializable",
          max_per_kind: int = 20) -> list[str]:
    """Problems of ``histories`` (records of every client, as ``load``
    returns them) given ``final_state`` ({key: int or list}); [] if none.
    ``isolation``: "serializable" (no cycle at all) or "snapshot" (cycles
    of G2 only, write skew, are allowed).  At most ``max_per_kind``
    messages of each kind, then a count."""
    if isolation not in ISOLATIONS:
        raise ValueError("isolation: %r, not one of %s" % (isolation, ISOLATIONS))
    problems = _Problems(max_per_kind)
    txns = _txns(histories, problems)
    lists = {k: v for k, v in final_state.items() if isinstance(v, list)}
    counters = {k: v for k, v in final_state.items() if isinstance(v, int)}

    # who appended what: (key, element) -> (txn, index among its appends)
    writer: dict[tuple[str, str], tuple[Txn, int]] = {}
    for txn in txns:
        for key, wrote in txn.writes.items():
            if isinstance(wrote, list):
                if key not in lists:
                    problems.add("missing key", "%s appended to %s, not a list in the final"
                                 " state" % (txn.describe(), key))
                for i, element in enumerate(wrote):
                    other = writer.get((key, element))
                    if other is not None:
                        problems.add("element written twice", "%r in %s by %s and %s" % (
                            element, key, other[0].name, txn.name))
                    writer[key, element] = (txn, i)
            elif key not in counters:
                problems.add("missing key", "%s incremented %s, not a counter in the final"
                             " state" % (txn.describe(), key))

    position = _final_lists(lists, writer, problems)
    _outcomes(txns, lists, position, problems)
    _counters(txns, counters, problems)
    valid_reads = _reads(txns, lists, writer, problems)
    edges = _graph(txns, lists, writer, valid_reads)
    _tid_order(txns, edges, problems)
    _cycles(txns, edges, problems, isolation)
    _monotonic(txns, lists, position, problems)
    return problems.result()


def _final_lists(lists, writer, problems) -> dict[tuple[str, str], int]:
    position = {}
    for key, final in lists.items():
        for i, element in enumerate(final):
            if (key, element) in position:
                problems.add("duplicate element", "%r twice in the final %s (at %d and %d)" % (
                    element, key, position[key, element], i))
                continue
            position[key, element] = i
            if (key, element) not in writer:
                problems.add("unexplained element", "%r in the final %s, appended by no"
                             " recorded transaction" % (element, key))
    return position


def _outcomes(txns, lists, position, problems) -> None:
    """What each transaction's outcome says of its elements in the final state."""
    for txn in txns:
        present, absent = [], []
        for key, wrote in txn.writes.items():
            if isinstance(wrote, list) and key in lists:
                for element in wrote:
                    if (key, element) in position:
                        present.append((key, element))
                    else:
                        absent.append((key, element))
        if txn.outcome == "ok":
            for key, element in absent:
                problems.add("lost commit", "%s appended %r to %s: absent from its final list"
                             % (txn.describe(), element, key))
        elif txn.outcome in ABORTED:
            for key, element in present:
                problems.add("aborted write", "%s appended %r to %s: present in the final"
                             " list at %d" % (txn.describe(), element, key, position[key, element]))
        elif present and absent:
            problems.add("partial unknown", "%s: %s in the final state, %s not" % (
                txn.describe(), _pairs(present), _pairs(absent)))
        txn.committed = txn.outcome == "ok" or (txn.outcome == "unknown" and bool(present))


def _pairs(pairs) -> str:
    return ", ".join("%r in %s" % (element, key) for key, element in pairs)


def _counters(txns, counters, problems) -> None:
    ok = dict.fromkeys(counters, 0)
    maybe = dict.fromkeys(counters, 0)
    by_read: dict[tuple[str, int], Txn] = {}
    for txn in txns:
        for key, inc in txn.writes.items():
            if key not in counters or not isinstance(inc, int):
                continue
            if txn.outcome == "ok":
                ok[key] += inc
                read = txn.reads.get(key)
                if isinstance(read, int):
                    other = by_read.get((key, read))
                    if other is not None:
                        problems.add("lost update", "%s and %s both read %s = %d and"
                                     " incremented it" % (other.describe(), txn.describe(),
                                                          key, read))
                    by_read[key, read] = txn
            elif txn.outcome == "unknown":
                maybe[key] += inc
    for key, final in counters.items():
        if final < ok[key]:
            problems.add("lost commit", "counter %s is %d, below its %d acknowledged"
                         " increments" % (key, final, ok[key]))
        elif final > ok[key] + maybe[key]:
            problems.add("counter too high", "counter %s is %d, above its %d acknowledged"
                         " plus %d unknown increments" % (key, final, ok[key], maybe[key]))
    for txn in txns:
        for key, value in txn.reads.items():
            if key in counters and isinstance(value, int) \
                    and not 0 <= value <= ok[key] + maybe[key]:
                problems.add("impossible read", "%s read counter %s = %d, outside 0..%d" % (
                    txn.describe(), key, value, ok[key] + maybe[key]))


def _reads(txns, lists, writer, problems) -> set[tuple[int, str]]:
    """Check every read of a list; returns (txn index, key) of the reads
    that are prefixes of the final list."""
    # a read that is a prefix of its final list holds elements of aborted
    # transactions, or twice the same, only past where the final list does
    # first: only such reads, and the others, are looked at element by element
    suspect = {}
    for key, final in lists.items():
        seen: set = set()
        for i, element in enumerate(final):
            w = writer.get((key, element))
            if element in seen or (w is not None and w[0].outcome in ABORTED):
                suspect[key] = i
                break
            seen.add(element)
    valid = set()
    for index, txn in enumerate(txns):
        for key, read in txn.reads.items():
            if not isinstance(read, list) or key not in lists:
                continue
            final = lists[key]
            prefix = final[:len(read)] == read
            if not prefix or len(read) > suspect.get(key, len(read)):
                _elements(txn, key, read, writer, problems)
            elif isinstance(txn.writes.get(key), list):
                _future(txn, key, set(read), problems)
            if not prefix:
                i = next((i for i, (a, b) in enumerate(zip(read, final, strict=False))
                          if a != b),
                         min(len(read), len(final)))
                problems.add("incompatible order", "%s read %s = %s, not a prefix of the final"
                             " list (at %d: read %r, final %r)" % (
                                 txn.describe(), key, _short(read), i,
                                 read[i] if i < len(read) else None,
                                 final[i] if i < len(final) else None))
                continue
            valid.add((index, key))
            if read:
                w = writer.get((key, read[-1]))
                if w is not None and w[0] is not txn and w[1] + 1 < len(w[0].writes[key]):
                    problems.add("intermediate read", "%s read %s ending with %r, but %s"
                                 " appended %s" % (txn.describe(), key, read[-1],
                                                   w[0].describe(), w[0].writes[key]))
    return valid


def _elements(txn, key, read, writer, problems) -> None:
    """Duplicates and elements of aborted transactions in one read."""
    if len(set(read)) != len(read):
        dups = sorted({e for e in read if read.count(e) > 1})
        problems.add("duplicate element", "%s read %s with %s more than once" % (
            txn.describe(), key, dups))
    for element in read:
        w = writer.get((key, element))
        if w is not None and w[0].outcome in ABORTED:
            problems.add("aborted read", "%s read %r in %s, appended by %s" % (
                txn.describe(), element, key, w[0].describe()))
    if isinstance(txn.writes.get(key), list):
        _future(txn, key, set(read), problems)


def _future(txn, key, read: set, problems) -> None:
    for element in txn.writes[key]:
        if element in read:
            problems.add("future read", "%s read %r in %s, which it appends itself"
                         % (txn.describe(), element, key))


def _short(values: list, keep: int = 6) -> str:
    if len(values) <= keep:
        return repr(values)
    return "[%s, ... %d more]" % (", ".join(map(repr, values[:keep])), len(values) - keep)


# -- the dependency graph ---------------------------------------------------------------

def _graph(txns, lists, writer, valid_reads) -> dict[int, dict[int, set[tuple[str, str]]]]:
    """The dependency graph of committed transactions (indexes in txns):
    {a: {b: {(kind, key)...}}} for each edge a -> b."""
    edges: dict[int, dict[int, set[tuple[str, str]]]] = {}
    index = {id(txn): i for i, txn in enumerate(txns)}

    def edge(a: Txn, b: Txn, kind: str, key: str) -> None:
        if a is not b and a.committed and b.committed:
            edges.setdefault(index[id(a)], {}).setdefault(index[id(b)], set()).add((kind, key))

    for key, final in lists.items():
        previous = None
        for element in final:
            w = writer.get((key, element))
            if w is not None:
                if previous is not None:
                    edge(previous, w[0], "ww", key)
                previous = w[0]
    for i, key in valid_reads:
        txn = txns[i]
        if not txn.committed:
            continue
        read, final = txn.reads[key], lists[key]
        if read:
            w = writer.get((key, read[-1]))
            if w is not None:
                edge(w[0], txn, "wr", key)
        if len(read) < len(final):
            w = writer.get((key, final[len(read)]))
            if w is not None:
                edge(txn, w[0], "rw", key)
    return edges


def _tid_order(txns, edges, problems) -> None:
    """ww and wr edges between acknowledged transactions follow their
    TIDs (a reader commits after what it saw); no TID is given twice."""
    tids: dict[str, Txn] = {}
    for txn in txns:
        if txn.outcome == "ok" and txn.tid:
            other = tids.setdefault(txn.tid, txn)
            if other is not txn:
                problems.add("tid order", "%s and %s were both given tid %s" % (
                    other.name, txn.name, txn.tid))
    for a, targets in edges.items():
        for b, labels in targets.items():
            ta, tb = txns[a], txns[b]
            if ta.outcome != "ok" or tb.outcome != "ok" or not (ta.tid and tb.tid):
                continue
            forward = sorted(label for label in labels if label[0] != "rw")
            if forward and int(ta.tid, 16) >= int(tb.tid, 16):
                problems.add("tid order", "%s -[%s]-> %s goes back in TIDs" % (
                    ta.describe(), ", ".join("%s %s" % label for label in forward),
                    tb.describe()))


def _cycles(txns, edges, problems, isolation) -> None:
    def succ(kinds, within):
        def next_nodes(u):
            for v, labels in edges.get(u, {}).items():
                if v in within and any(kind in kinds for kind, _ in labels):
                    yield v
        return next_nodes

    every = set(edges) | {v for targets in edges.values() for v in targets}
    all_kinds = ("ww", "wr", "rw")
    for component in tarjan(sorted(every), succ(all_kinds, every)):
        if len(component) < 2:
            continue
        name, cycle = _worst_cycle(set(component), succ)
        if isolation == "snapshot" and name == "G2":
            continue  # write skew: snapshot isolation allows it
        shown = _show_cycle(cycle, txns, edges) if cycle else "not searched to the end, among %s" % (
            ", ".join(txns[i].name for i in sorted(component)[:10]))
        problems.add("cycle", "%s: %s (a strongly connected component of %d transactions)" % (
            name, shown, len(component)))


def _worst_cycle(component: set[int], succ) -> tuple[str, list[int] | None]:
    """The most severe kind of cycle in a strongly connected component,
    and one such cycle (None: the G-single search gave up)."""
    for name, kinds in (("G0", ("ww",)), ("G1c", ("ww", "wr"))):
        for sub in tarjan(sorted(component), succ(kinds, component)):
            if len(sub) > 1:
                return name, _cycle_through(sub[0], succ(kinds, set(sub)))
    # G-single: an rw edge u -> v and a path back from v to u without rw;
    # one search from each v reached by rw edges
    clean = succ(("ww", "wr"), component)
    anti = succ(("rw",), component)
    sources: dict[int, list[int]] = {}
    for u in sorted(component):
        for v in anti(u):
            sources.setdefault(v, []).append(u)
    budget = G_SINGLE_BUDGET
    for v, us in sources.items():
        parent = _reach(v, clean)
        budget -= len(parent)
        for u in us:
            if u in parent:
                return "G-single", [u] + _back(u, parent)[:-1]
        if budget < 0:
            return "G-single or G2", None
    return "G2", _cycle_through(min(component), succ(("ww", "wr", "rw"), component))


# nodes the search for G-single visits in one component before giving up
G_SINGLE_BUDGET = 5_000_000


def _reach(source: int, next_nodes) -> dict:
    """BFS from source: {node reached: its parent}."""
    parent = {source: None}
    queue = deque([source])
    while queue:
        u = queue.popleft()
        for v in next_nodes(u):
            if v not in parent:
                parent[v] = u
                queue.append(v)
    return parent


def _back(u, parent) -> list[int]:
    path = []
    while u is not None:
        path.append(u)
        u = parent[u]
    return path[::-1]


def _cycle_through(start: int, next_nodes) -> list[int]:
    """A shortest cycle through ``start`` (in a strongly connected set):
    its nodes from ``start``, the last one's edge going back to it."""
    parent = {start: None}
    queue = deque([start])
    while queue:
        u = queue.popleft()
        for v in next_nodes(u):
            if v == start:
                return _back(u, parent)
            if v not in parent:
                parent[v] = u
                queue.append(v)
    raise AssertionError("not strongly connected")


def _show_cycle(cycle: list[int], txns, edges) -> str:
    parts = []
    for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True):
        labels = ", ".join("%s %s" % label for label in sorted(edges[a][b]))
        parts.append("%s -[%s]->" % (txns[a].describe(), labels))
    return " ".join(parts) + " " + txns[cycle[0]].name


def tarjan(nodes, next_nodes) -> list[list]:
    """Strongly connected components (Tarjan, iterative: no recursion
    limit), each a list of nodes."""
    index: dict = {}
    low: dict = {}
    stack: list = []
    on_stack: set = set()
    components = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        work = [(root, iter(next_nodes(root)))]
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(next_nodes(w))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    components.append(component)
    return components


# -- sessions ---------------------------------------------------------------------------

def _monotonic(txns, lists, position, problems) -> None:
    by_client: dict[str, list[Txn]] = {}
    for txn in txns:
        by_client.setdefault(txn.client, []).append(txn)
    for client_txns in by_client.values():
        client_txns.sort(key=lambda t: t.seq)
        floor: dict[str, tuple[int, str]] = {}  # key -> (level, what set it)
        for txn in client_txns:
            for key, value in txn.reads.items():
                if not isinstance(value, int | list):
                    continue
                level = _level(value)
                known = floor.get(key)
                if known is not None and level < known[0]:
                    problems.add("non-monotonic read", "%s read %s at %d, after %s" % (
                        txn.describe(), key, level, known[1]))
            for key, value in txn.reads.items():
                if isinstance(value, int | list) and _level(value) > floor.get(key, (-1,))[0]:
                    floor[key] = (_level(value), "%s read it at %d" % (txn.name, _level(value)))
            if txn.outcome != "ok":
                continue
            for key, wrote in txn.writes.items():
                if isinstance(wrote, list):
                    places = [position[key, e] for e in wrote if (key, e) in position]
                    level = max(places) + 1 if places else None
                elif isinstance(txn.reads.get(key), int):
                    level = txn.reads[key] + wrote
                else:
                    level = None
                if level is not None and level > floor.get(key, (-1,))[0]:
                    floor[key] = (level, "%s wrote it to %d" % (txn.name, level))


# -- I/O --------------------------------------------------------------------------------

def load(paths) -> tuple[list[dict], int]:
    """The records of history files: the last line of each transaction
    (client, seq) wins.  Returns (records, lines that did not parse: a
    line cut short when a process died)."""
    records: dict[tuple, dict] = {}
    bad = 0
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    records[record["client"], record["seq"]] = record
                except (ValueError, KeyError, TypeError):
                    bad += 1
    return list(records.values()), bad


def summary(records) -> dict[str, dict[str, int]]:
    """{client: {outcome: count}}."""
    out: dict[str, dict[str, int]] = {}
    for record in records:
        tally = out.setdefault(str(record.get("client")), {})
        tally[record.get("outcome")] = tally.get(record.get("outcome"), 0) + 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="checker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--final", required=True,
                        help="final state, JSON {key: int or list} (workload.py final)")
    parser.add_argument("--isolation", choices=ISOLATIONS, default="serializable",
                        help="what the transactions promise (default serializable;"
                             " snapshot: a workload without --read-current)")
    parser.add_argument("--max", type=int, default=20, help="messages per kind (default 20)")
    parser.add_argument("histories", nargs="+", help="history files (JSON lines)")
    args = parser.parse_args(argv)
    records, bad = load(args.histories)
    with open(args.final, encoding="utf-8") as f:
        final = json.load(f)
    for client, tally in sorted(summary(records).items()):
        print("%s: %s" % (client, ", ".join("%d %s" % (n, o) for o, n in sorted(tally.items()))))
    if bad:
        print("%d history lines did not parse (cut short?)" % bad)
    problems = check(records, final, args.isolation, args.max)
    print("\n".join(problems) if problems else "no problem found")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
