"""Compare neozodb with FileStorage, ZEO and (when installed) RelStorage.

Measures, for each backend (see bench/README.md):

1. commit of N new objects in one transaction,
2. update of those N objects in one transaction,
3. N cold reads through a new storage client (empty caches),
4. latency of one-object commits (100 of them): median and p90;
5. latency of one-object requests (100): ``transaction.begin()`` (ZODB
   syncs the storage: a round trip to neozodb's master, with its default
   ``server_sync``; none with ZEO's default), one object changed, commit.
   With --no-server-sync, neozodb's clients sync as ZEO's by default.

Every process started here (neozodb nodes, the ZEO server) and every
temporary directory is cleaned up on exit, error or Ctrl-C.

With --all, then runs the other measures of issue 12, each script in its
own process (bench/concurrency.py, bench/cpu.py, bench/shootout.py, bench/scale.py,
bench/replication.py, bench/migrate.py; --quick is passed on), and prints
one table of every ratio.

With --postgresql, adds clusters whose storages use the PostgreSQL backend
and RelStorage on the same throw-away PostgreSQL server (bench/pg.py), then
the replication throughput of each adapter (bench/replication.py).  With
--mariadb, the same on a throw-away MariaDB server
(bench/mariadb_vs_relstorage.py); both options together measure the
three backends and RelStorage on both servers in one run.

Usage: .venv/bin/python bench/bench.py [--objects N] [--rounds R] [--quick] [--tls]
       [--asyncio] [--postgresql] [--mariadb] [--no-server-sync] [--json FILE]
       .venv/bin/python bench/bench.py --all [--quick] [--scale-sizes 10000,100000] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time

import common
import targets
import transaction
import ZODB
from common import (  # noqa: F401  (format_table, percentile: replication.py imports them here)
    INTERRUPTED,
    MB,
    PAYLOAD,
    Backend,
    FileStorageBackend,
    NeoBackend,
    PeakMemory,
    RelStorageBackend,
    ZEOBackend,
    format_table,
    interruptible,
    new_objects,
    payload,
    percentile,
    relstorage_backends,
    say,
    start_backends,
    stop_process,
    temporary_directory,
    write_json,
)

SMALL_COMMITS = 100  # one-object commits per round

MEASURES = [
    ("commit_new", "commit {n} new objects"),
    ("update", "update {n} objects"),
    ("cold_read", "{n} cold reads"),
    ("small_median", "1-object commit, median"),
    ("small_p90", "1-object commit, p90"),
    ("request_median", "1-object request, median"),
]
BEST_OF = ("commit_new", "update", "cold_read")  # best round kept; others pooled


# -- one round ---------------------------------------------------------------------------------
def run_round(backend: Backend, objects: int, name: str) -> dict:
    """One round on fresh data (a new container `name` in the root)."""
    result: dict = {}
    tm = transaction.TransactionManager()
    db = ZODB.DB(backend.open_storage())
    try:
        conn = db.open(tm)
        root = conn.root()
        objs = new_objects(root, tm, name, objects)

        t0 = time.perf_counter()
        tm.commit()
        result["commit_new"] = time.perf_counter() - t0

        for obj in objs:
            obj["data"] = payload()
        t0 = time.perf_counter()
        tm.commit()
        result["update"] = time.perf_counter() - t0

        expected = {i: obj["data"] for i, obj in enumerate(objs)}
        small = []
        for i in range(SMALL_COMMITS):
            obj = objs[i * 7 % objects]
            obj["data"] = value = payload()
            expected[i * 7 % objects] = value
            t0 = time.perf_counter()
            tm.commit()
            small.append(time.perf_counter() - t0)
        result["small"] = small
        requests = []
        for i in range(SMALL_COMMITS):
            t0 = time.perf_counter()
            tm.begin()  # what a web request does: ZODB syncs the storage
            obj = objs[i * 11 % objects]
            obj["data"] = value = payload()
            expected[i * 11 % objects] = value
            tm.commit()
            requests.append(time.perf_counter() - t0)
        result["requests"] = requests
        conn.close()
    finally:
        db.close()

    # cold reads: a new storage client and a new DB, so every cache is empty
    db = ZODB.DB(backend.open_storage())
    try:
        conn = db.open(tm)
        container = conn.root()[name]
        items = list(container.items())  # loads the BTree; the values stay ghosts
        ghosts = sum(1 for _, obj in items if obj._p_changed is None)
        if ghosts != objects:
            raise RuntimeError("%d of %d objects were not ghosts" % (objects - ghosts, objects))
        t0 = time.perf_counter()
        values = [obj["data"] for _, obj in items]  # unghosts each object
        result["cold_read"] = time.perf_counter() - t0
        if values != [expected[i] for i, _ in items]:
            raise RuntimeError("%s: cold reads returned wrong data" % backend.label)
        tm.abort()
        conn.close()
    finally:
        db.close()
    return result


def summarize(backend: Backend, per_round: list[dict]) -> dict:
    small = [t for r in per_round for t in r["small"]]
    ms = {key: min(r[key] for r in per_round) * 1e3 for key in BEST_OF}
    ms["small_median"] = statistics.median(small) * 1e3
    ms["small_p90"] = percentile(small, 90) * 1e3
    ms["request_median"] = statistics.median(t for r in per_round for t in r["requests"]) * 1e3
    return {
        "label": backend.label,
        "ms": ms,
        "rounds_ms": [{key: r[key] * 1e3 for key in BEST_OF} for r in per_round],
        "small_commits_ms": [t * 1e3 for t in small],
    }


# -- report ---------------------------------------------------------------------------------------
SHORT = {"zeo": "ZEO", "filestorage": "FS", "relstorage": "RS", "relstorage_pg": "RS-PG",
         "relstorage_mariadb": "RS-MariaDB"}


def ratios(results: dict) -> dict:
    """{neo key: {other key: {measure: other ms / neo ms}}}: a cluster on
    PostgreSQL (MariaDB) is compared with ZEO and RelStorage on PostgreSQL
    (MariaDB), the others with ZEO, FileStorage and RelStorage on SQLite."""
    out: dict = {}
    for neo_key, neo in results.items():
        if not neo_key.startswith("neo"):
            continue
        others = (("zeo", "relstorage_pg") if neo_key.endswith("_pg")
                  else ("zeo", "relstorage_mariadb") if neo_key.endswith("_mariadb")
                  else ("zeo", "filestorage", "relstorage"))
        for other_key in others:
            other = results.get(other_key)
            if other is None:
                continue
            out.setdefault(neo_key, {})[other_key] = {
                m: other["ms"][m] / neo["ms"][m] if neo["ms"][m] else None for m, _ in MEASURES}
    return out


def report(results: dict, skipped: dict, objects: int) -> str:
    names = [label.format(n=objects) for _, label in MEASURES]
    keys = list(results)
    header = ["times in ms", *(results[k]["label"] for k in keys), *skipped]
    rows = []
    for (m, _), name in zip(MEASURES, names, strict=True):
        rows.append([name, *("%.1f" % results[k]["ms"][m] for k in keys),
                     *("skipped" for _ in skipped)])
    out = [format_table(header, rows)]
    rat = ratios(results)
    columns = [(n, o) for n in rat for o in rat[n]]
    if columns:
        header = ["ratio (>1: neo faster)",
                  *("%s / %s" % (SHORT[o], results[n]["label"]) for n, o in columns)]
        rows = []
        for (m, _), name in zip(MEASURES, names, strict=True):
            cells = []
            for n, o in columns:
                value = rat[n][o][m]
                cells.append("-" if value is None else "%.2f" % value)
            rows.append([name, *cells])
        out += ["", format_table(header, rows)]
    for suffix, title in (("_tls", "TLS / plain (>1: TLS slower)"),
                          ("_asyncio", "asyncio / uvloop (>1: asyncio slower)"),
                          ("_pg", "PostgreSQL / SQLite (>1: PostgreSQL slower)"),
                          ("_mariadb", "MariaDB / SQLite (>1: MariaDB slower)")):
        pairs = [(k[:-len(suffix)], k) for k in keys
                 if k.endswith(suffix) and k[:-len(suffix)] in results]
        if pairs:
            header = [title, *("%s / %s" % (results[v]["label"], results[p]["label"])
                               for p, v in pairs)]
            rows = [[name, *("%.2f" % (results[v]["ms"][m] / results[p]["ms"][m])
                             if results[p]["ms"][m] else "-" for p, v in pairs)]
                    for (m, _), name in zip(MEASURES, names, strict=True)]
            out += ["", format_table(header, rows)]
    for label, why in skipped.items():
        out.append("\n%s skipped: %s" % (label, why))
    return "\n".join(out)


# -- --all: every measure of issue 12 in one run -------------------------------------------
HERE = os.path.dirname(os.path.abspath(__file__))


def run_script(name: str, args: list[str], tmp: str) -> tuple[dict | None, str]:
    """Run bench/NAME with ARGS (and --json when it takes it), echoing its
    output indented; (its JSON results or None, its output).  On Ctrl-C or
    SIGTERM it is terminated and waited for (it cleans up after itself)."""
    out_json = os.path.join(tmp, name + ".json")
    argv = [sys.executable, os.path.join(HERE, name + ".py"), *args]
    if name != "migrate":
        argv += ["--json", out_json]
    say("\n== bench/%s.py %s" % (name, " ".join(args)))
    lines = []
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        for line in proc.stdout:
            lines.append(line)
            print("   " + line, end="", flush=True)
        status = proc.wait()
    finally:
        stop_process(proc, 60)
    if status != 0:
        raise RuntimeError("bench/%s.py exited with status %s" % (name, status))
    data = None
    if os.path.exists(out_json):
        with open(out_json) as f:
            data = json.load(f)
    return data, "".join(lines)


def run_all(args, results: dict, peaks: PeakMemory) -> dict:
    quick = ["--quick"] if args.quick else []
    everything: dict = {"bench": {"results": results, "ratios": ratios(results),
                                  "peak_rss": peaks.peaks, "objects": args.objects}}
    with temporary_directory("bench-all") as (_cleanup, tmp):
        for name, extra in (("concurrency", []), ("cpu", []), ("shootout", []),
                            ("scale", [] if args.quick else ["--sizes", args.scale_sizes]),
                            ("replication", []), ("migrate", [])):
            data, text = run_script(name, quick + extra, tmp)
            everything[name] = data if data is not None else {"output": text}
    return everything


def replication_by_adapter(args) -> dict:
    """--postgresql, --mariadb: replication.py's throughput (S2 empty, started after
    N objects were written) on each adapter, one after the other."""
    objects = "2000" if args.quick else "20000"
    out = {}
    with temporary_directory("bench-replication") as (_cleanup, tmp):
        adapters = ["SQLite"] + ["PostgreSQL"] * bool(args.postgresql) + \
            ["MariaDB"] * bool(args.mariadb)
        for adapter in adapters:
            data, _ = run_script("replication", ["--only", "throughput", "--objects", objects,
                                                 "--adapter", adapter], tmp)
            out[adapter] = data["results"]["throughput"]
    return out


def replication_report(results: dict) -> str:
    rows = [[adapter, str(r["obj_records"]), "%.1f" % (r["data_bytes"] / MB),
             "%.2f" % r["time_to_all_up_s"], "%.2f" % r["mb_per_s"], "%.0f" % r["objects_per_s"]]
            for adapter, r in results.items()]
    return format_table(["replication to an empty S2", "records", "data MB", "all U (s)",
                         "MB/s", "objects/s"], rows)


def all_rows(e: dict) -> list[list[str]]:
    """measure, neozodb, neo value, reference value, ratio, target"""
    rows = []
    b = e["bench"]
    n = b["objects"]
    for neo in [k for k in b["results"] if k.startswith("neo")]:
        for m, label in MEASURES:
            neo_ms = b["results"][neo]["ms"][m]
            zeo = b["results"].get("zeo")
            r = b["ratios"].get(neo, {})
            rows.append([label.format(n=n) + " (ms)", b["results"][neo]["label"],
                         "%.1f" % neo_ms, "%.1f" % zeo["ms"][m] if zeo else "-",
                         *("%.2f" % r[o][m] if o in r and r[o][m] else "-"
                           for o in ("zeo", "relstorage", "filestorage")), ""])
    for row in e["concurrency"]["summary"]:
        rows.append([row["measure"], row["neo"], "%.0f" % row["value"],
                     "%.0f" % row["zeo"] if row["zeo"] else "-",
                     "%.2f" % row["ratio"] if row["ratio"] else "-", "-", "-",
                     ">= %.1f" % row["target"]])
    for row in e["shootout"]["summary"]:
        o = row["others"]
        rows.append([row["measure"] + " (ms)", row["neo"],
                     "%.1f" % (row["value"] * 1e3) if row["value"] else "-",
                     "%.1f" % (o["zeo"]["value"] * 1e3) if o["zeo"]["value"] else "-",
                     *("%.2f" % o[k]["ratio"] if o[k]["ratio"] else "-"
                       for k in ("zeo", "relstorage", "filestorage")), ""])
    return rows


def other_rows(e: dict) -> list[list[str]]:
    """Measures without a ZEO counterpart: measure, value, note."""
    rows = []
    for row in e["scale"]["summary"]:
        rows.append([row["measure"], "%.3f / %.3f" % (row["value"], row["reference"]),
                     "x%.2f (1.00: flat)" % row["ratio"] if row["ratio"] else "-"])
    rep = e["replication"].get("results", {})
    t = rep.get("throughput")
    if t:
        rows.append(["replication of %d objects to an empty storage" % t["objects"],
                     "%.2f MB/s" % t["mb_per_s"], "%.0f objects/s" % t["objects_per_s"]])
    for c in rep.get("catchup", []):
        rows.append(["catch-up after %.0f s down, %d objects" % (c["outage_s"], c["objects"]),
                     "%.2f s" % c["time_to_all_up_s"], "%d records written meanwhile"
                     % c["objects_written"]])
    lat = rep.get("latency") or {}
    if len(lat) == 2:
        (a, la), (b_, lb) = lat.items()
        rows.append(["1-object commit median, %s / %s" % (b_, a),
                     "%.2f / %.2f ms" % (lb["median_ms"], la["median_ms"]),
                     "x%.2f" % (lb["median_ms"] / la["median_ms"])])
    times = targets.migration_times(e)
    ref = times.get(targets.MIGRATE_REFERENCE)
    for label, seconds in times.items():
        if "neomigrate" in label and ref:
            rows.append([label + " (s)", "%.2f" % seconds,
                         "zodbconvert FS -> FS %.2f s: ratio %.2f" % (ref, ref / seconds)])
    return rows


def all_report(e: dict) -> str:
    out = ["== every measure of issue 12 in this run", "",
           format_table(["measure", "neozodb", "neo", "ZEO", "ZEO/neo", "RS/neo", "FS/neo",
                         "target"], all_rows(e)),
           "", "ratios: other's time / neozodb's (for rates: neozodb's / other's);"
           " > 1: neozodb faster", "",
           format_table(["measure (no ZEO counterpart)", "value", "note"], other_rows(e))]
    rows, missed = targets.target_rows(e)
    out += ["", "== issue 12's targets in this run", "",
            format_table(["measure", "neozodb", "value", "target", "met"], rows), "",
            targets.summary(rows, missed)]
    mem = []
    for name in ("bench", "concurrency", "shootout", "scale"):
        for label, nodes in (e[name].get("peak_rss") or {}).items():
            if nodes:
                mem.append(["%s: %s" % (name, label), ", ".join(
                    "%s %.1f" % (k, v / MB) for k, v in sorted(nodes.items()))])
    if mem:
        out += ["", format_table(["peak RSS (VmHWM) of the servers, MB", "per process"], mem)]
    return "\n".join(out)


# -- main -----------------------------------------------------------------------------------------
def measure(backends: list[Backend], skipped: dict, objects: int, rounds: int,
            peaks: PeakMemory) -> dict:
    """Run every backend; whatever happens, stop every process and remove
    the temporary directory before returning or raising.

    All backends run side by side and the rounds are interleaved (round 1 of
    each backend, then round 2...), so that a load spike on the machine hits
    one round of every backend rather than every round of one."""
    per_round: dict[str, list[dict]] = {}
    with temporary_directory("bench") as (cleanup, workdir):
        active = start_backends(cleanup, backends, workdir, skipped, peaks=peaks)
        for backend in active:
            per_round[backend.key] = []
        for r in range(rounds):
            print("  round %d/%d:" % (r + 1, rounds), end="", flush=True)
            for backend in list(active):
                t0 = time.perf_counter()
                try:
                    per_round[backend.key].append(run_round(backend, objects, "round%d" % r))
                except Exception as e:
                    if not isinstance(backend, RelStorageBackend):
                        print(" %s FAILED" % backend.label, flush=True)
                        raise
                    skipped[backend.label] = "failed: %r" % (e,)
                    active.remove(backend)
                    del per_round[backend.key]
                    backend.stop()
                    continue
                print(" %s %.1fs" % (backend.label, time.perf_counter() - t0), end="", flush=True)
            print(flush=True)
    return {b.key: summarize(b, per_round[b.key]) for b in backends if b.key in per_round}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=1000, help="objects per round (1000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per backend (3)")
    parser.add_argument("--quick", action="store_true", help="--objects 200 --rounds 1")
    parser.add_argument("--payload", choices=common.PAYLOADS, default="random",
                        help="the objects' data: base64 of random bytes (default) or words")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--tls", action="store_true",
                        help="add 'neo 1S r0 TLS', the same cluster with TLS everywhere, and"
                        " its TLS / plain ratios")
    parser.add_argument("--asyncio", action="store_true",
                        help="add 'neo 1S r0 asyncio' and 'neo 2S r1 asyncio', the same clusters"
                        " with the nodes on asyncio's event loop instead of uvloop's")
    parser.add_argument("--postgresql", action="store_true",
                        help="add 'neo 1S r0 PG' and 'neo 2S r1 PG' (storages on the PostgreSQL"
                        " backend) and RelStorage on the same throw-away PostgreSQL server,"
                        " then the replication throughput on each adapter")
    parser.add_argument("--mariadb", action="store_true",
                        help="add 'neo 1S r0 MariaDB' and 'neo 2S r1 MariaDB' and RelStorage"
                        " (history-free) on the same throw-away MariaDB server, then the"
                        " replication throughput on each adapter")
    parser.add_argument("--all", action="store_true",
                        help="then run concurrency.py, cpu.py, shootout.py, scale.py,"
                        " replication.py and migrate.py, and print one table of every ratio")
    parser.add_argument("--no-server-sync", action="store_true",
                        help="neozodb's clients with server_sync false: no round trip to the"
                        " master at transaction.begin(), as ZEO's default")
    parser.add_argument("--scale-sizes", default="10000,100000",
                        help="with --all: scale.py's --sizes (10000,100000; with --quick,"
                        " scale.py's own)")
    args = parser.parse_args(argv)
    common.payload_kind = args.payload
    if args.quick:
        args.objects, args.rounds = 200, 1
    if args.objects < 1 or args.rounds < 1:
        parser.error("--objects and --rounds must be positive")
    # warnings such as "lost the master: client closing" on close are expected noise
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")

    # 2S r0: the issue's own set-up (partitions spread over the storages)
    backends: list[Backend] = [NeoBackend(1, 0), NeoBackend(2, 0), NeoBackend(2, 1),
                               FileStorageBackend(), ZEOBackend()]
    if args.tls:
        backends.insert(1, NeoBackend(1, 0, tls=True))
    if args.asyncio:
        backends[2:2] = [NeoBackend(1, 0, event_loop="asyncio"),
                         NeoBackend(2, 1, event_loop="asyncio")]
    if args.no_server_sync:
        for backend in backends:
            if isinstance(backend, NeoBackend):
                backend.client_options["server_sync"] = False
    skipped: dict[str, str] = {}
    backends += relstorage_backends(skipped)
    if args.postgresql:
        from pg import postgresql_backends
        backends += postgresql_backends(skipped)
    if args.mariadb:
        from mariadb_vs_relstorage import SharedMariaDB, mariadb_backends
        backends += mariadb_backends(skipped, SharedMariaDB())

    started = time.perf_counter()
    print("objects=%d rounds=%d, %d one-object commits and requests per round, %d CPUs%s" % (
        args.objects, args.rounds, SMALL_COMMITS, os.cpu_count() or 0,
        ", neozodb without server_sync" if args.no_server_sync else ""), flush=True)
    peaks = PeakMemory()
    results = interruptible(measure, backends, skipped, args.objects, args.rounds, peaks,
                            stopped="every process stopped, temporary files removed")
    if INTERRUPTED:
        return 130

    print()
    print(report(results, skipped, args.objects))
    print()
    print(peaks.table("peak RSS (VmHWM) of the servers, MB"))
    print("\nbest of %d rounds for the first three rows; one-object commit and request latencies pooled "
          "over all rounds (%d commits); total %.0fs" % (
              args.rounds, SMALL_COMMITS * args.rounds, time.perf_counter() - started))
    replication = None
    if (args.postgresql and not any(k.endswith("_pg") for k in skipped)) or args.mariadb:
        replication = interruptible(replication_by_adapter, args,
                                    stopped="every process stopped, temporary files removed")
        if INTERRUPTED:
            return 130
        print()
        print(replication_report(replication))
    if args.all:
        everything = interruptible(run_all, args, results, peaks,
                                   stopped="every process stopped, temporary files removed")
        if INTERRUPTED:
            return 130
        print()
        print(all_report(everything))
        print("\ntotal of the whole run %.0fs" % (time.perf_counter() - started))
    if args.json:
        write_json(args.json, {"objects": args.objects, "rounds": args.rounds,
                               "small_commits_per_round": SMALL_COMMITS,
                               "payload_bytes": PAYLOAD},
                   results, ratios=ratios(results), skipped=skipped, peak_rss=peaks.peaks,
                   **({"all": everything} if args.all else {}),
                   **({"replication_by_adapter": replication} if replication else {}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
