"""zodbshootout on neozodb, ZEO, RelStorage/SQLite and FileStorage, at
concurrency 1 and 4 (see bench/README.md, "zodbshootout").

Starts the servers (a neozodb cluster, a ZEO server over FileStorage),
writes one ZConfig file naming every database, runs ``zodbshootout`` on it
once per concurrency (client processes, its default), reads its pyperf
JSON output and prints the mean time of each benchmark and the ratios
other / neozodb.  zodbshootout runs FileStorage only at concurrency 1 (a
FileStorage cannot be shared by processes; it reports such runs as
"disabled"), so the FileStorage column is empty at 4.

Every process started here is stopped and the temporary directory removed
on exit, error, Ctrl-C or SIGTERM.

Usage: .venv/bin/python bench/shootout.py [--quick] [--concurrency 1,4] [--objects N]
       [--benchmarks add,update,...] [--json FILE]
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time

from common import (
    FileStorageBackend,
    NeoBackend,
    PeakMemory,
    ZEOBackend,
    format_table,
    measure_and_report,
    relstorage_backends,
    say,
    start_backends,
    stop_process,
    temporary_directory,
)

# zodbshootout's benchmark names, in its order; its descriptions
BENCHMARKS = {
    "add": "add {n} objects",
    "update": "update {n} objects",
    "cold": "read {n} cold objects",
    "warm": "write/read {n} objects",
    "hot": "read {n} hot objects",
    "steamin": "read {n} steamin objects",
    "tpc": "tpc",
    "conflicts": "update {n} conflicting objects",
}
DEFAULT = "add,update,cold,warm,hot,steamin"
# pyperf: worker processes per benchmark, values per process, warm-ups
# and loops per value (-l 1: no calibration, which costs many more processes).  Above 100
# objects, zodbshootout repeats each benchmark 10 times per loop (100 times at 100 or fewer).
FULL = {"pyperf": ["-p", "1", "-n", "3", "-w", "1", "-l", "1"], "objects": 1000}
QUICK = {"pyperf": ["-p", "1", "-n", "1", "-w", "0", "-l", "1"], "objects": 200}
SHORT = {"zeo": "ZEO", "filestorage": "FS", "relstorage": "RS"}


def zodbshootout_command() -> list[str]:
    # zodbshootout's main, with neozodb's client cache where its "cold"
    # benchmarks clear caches (see zodbshootout_run.py)
    return [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                         "zodbshootout_run.py")]


def config(backends) -> str:
    imports = {"%import neozodb" for b in backends if b.key.startswith("neo")}
    imports |= {"%import relstorage" for b in backends if b.key == "relstorage"}
    sections = ["<zodb %s>\n%s\n</zodb>" % (b.key, "\n".join(
        line for line in b.zconfig().splitlines() if not line.startswith("%import")))
        for b in backends]
    return "\n".join(sorted(imports) + sections) + "\n"


NAME = re.compile(r"^\{c=(\d+) \w+, o=(\d+)\} (\S+): (.*)$")


def read_results(path: str) -> dict:
    """{db key: {benchmark description: mean seconds or None (disabled)}}"""
    import pyperf
    out: dict = {}
    suite = pyperf.BenchmarkSuite.load(path)
    for bench in suite.get_benchmarks():
        m = NAME.match(bench.get_name())
        if not m:
            continue
        what = m.group(4)
        disabled = what.endswith(" (disabled)")
        out.setdefault(m.group(3), {})[what.replace(" (disabled)", "")] = (
            None if disabled else bench.mean())
    return out


def measure(opts, peaks: PeakMemory, skipped: dict) -> dict:
    results: dict = {}
    with temporary_directory("shootout", opts.keep) as (cleanup, workdir):
        backends = [NeoBackend(s, r) for s, r in opts.neo] + [ZEOBackend()]
        backends += relstorage_backends(skipped)
        backends.append(FileStorageBackend())
        active = start_backends(cleanup, backends, workdir, skipped, peaks=peaks)
        results["labels"] = {b.key: b.label for b in active}
        for c in opts.concurrency:
            conf = os.path.join(workdir, "zodb-c%d.conf" % c)
            with open(conf, "w") as f:
                f.write(config(active))
            out = os.path.join(workdir, "c%d.json" % c)
            argv = [*zodbshootout_command(), *opts.pyperf, "-q", "-o", out,
                    "--include-mapping", "no", "--object-counts", str(opts.objects),
                    "-c", str(c), conf, *opts.benchmarks]
            t0 = time.perf_counter()
            say("  zodbshootout -c %d ..." % c)
            with open(os.path.join(workdir, "c%d.log" % c), "w") as log:
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, cwd=workdir)
                cleanup.callback(stop_process, proc)
                status = proc.wait()
            with open(os.path.join(workdir, "c%d.log" % c)) as log:
                text = log.read()
            if status != 0 or not os.path.exists(out):
                raise RuntimeError("zodbshootout -c %d failed (status %s):\n%s" % (
                    c, status, text[-3000:]))
            # a benchmark that raised is logged ("When running ...") and timed as 666 s
            errors = [line for line in text.splitlines() if "When running" in line]
            results[str(c)] = {"means": read_results(out), "errors": len(errors)}
            say("  zodbshootout -c %d: %.0fs%s" % (
                c, time.perf_counter() - t0,
                ", %d errors in its log" % len(errors) if errors else ""))
    return results


def describe(name: str, n: int) -> str:
    return BENCHMARKS[name].format(n=n)


def summary_rows(results: dict, opts) -> list[dict]:
    """Per concurrency, benchmark and neozodb configuration: neozodb's
    mean time and the others', ratio = other / neo."""
    rows = []
    labels = results["labels"]
    for c in opts.concurrency:
        means = results[str(c)]["means"]
        for name in opts.benchmarks:
            what = describe(name, opts.objects)
            for neo in [k for k in labels if k.startswith("neo")]:
                t = means.get(neo, {}).get(what)
                row = {"measure": "shootout c=%d: %s" % (c, what), "neo": labels[neo],
                       "value": t, "others": {}}
                for other in ("zeo", "relstorage", "filestorage"):
                    o = means.get(other, {}).get(what)
                    row["others"][other] = {"value": o, "ratio": o / t if o and t else None}
                rows.append(row)
    return rows


def report(results: dict, opts, skipped: dict) -> str:
    labels = results["labels"]
    out = []
    for c in opts.concurrency:
        means = results[str(c)]["means"]
        keys = [k for k in labels if k in means]
        rows = [["c=%d: %s" % (c, describe(name, opts.objects)),
                 *("-" if means[k].get(describe(name, opts.objects)) is None else
                   "%.2f" % (means[k][describe(name, opts.objects)] * 1e3) for k in keys)]
                for name in opts.benchmarks]
        out += [format_table(["mean ms (zodbshootout)", *(labels[k] for k in keys)], rows), ""]
    rows_in = summary_rows(results, opts)
    others = [o for o in ("zeo", "relstorage", "filestorage") if o in labels]
    neos = [k for k in labels if k.startswith("neo")]
    header = ["ratio (>1: neo faster)", *("%s / %s" % (SHORT[o], labels[n])
                                          for n in neos for o in others)]
    rows = []
    for measure in dict.fromkeys(r["measure"] for r in rows_in):
        cells = []
        for n in neos:
            row = next(r for r in rows_in if r["measure"] == measure and r["neo"] == labels[n])
            for o in others:
                ratio = row["others"][o]["ratio"]
                cells.append("-" if ratio is None else "%.2f" % ratio)
        rows.append([measure[len("shootout "):], *cells])
    out.append(format_table(header, rows))
    out.append("\n'-': not run (zodbshootout runs FileStorage at concurrency 1 only)")
    for c in opts.concurrency:
        if results[str(c)]["errors"]:
            out.append("zodbshootout -c %d logged %d errors (see --keep)" % (
                c, results[str(c)]["errors"]))
    for label, why in skipped.items():
        out.append("%s skipped: %s" % (label, why))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="100 objects, one pyperf process and value per benchmark")
    parser.add_argument("--concurrency", default="1,4", help="client processes (1,4)")
    parser.add_argument("--objects", type=int, help="objects per transaction (1000)")
    parser.add_argument("--benchmarks", default=DEFAULT,
                        help="zodbshootout benchmarks (%s); also: tpc, conflicts" % DEFAULT)
    parser.add_argument("--neo", default="1S r0",
                        help="neozodb configurations, e.g. '1S r0,2S r1' (1S r0)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    opts = parser.parse_args(argv)
    defaults = QUICK if opts.quick else FULL
    opts.pyperf = defaults["pyperf"]
    opts.objects = opts.objects or defaults["objects"]
    opts.concurrency = [int(x) for x in opts.concurrency.split(",")]
    opts.benchmarks = opts.benchmarks.split(",")
    if not set(opts.benchmarks) <= set(BENCHMARKS):
        parser.error("--benchmarks: choose among " + ",".join(BENCHMARKS))
    try:
        opts.neo = [(int(c.split()[0][:-1]), int(c.split()[1][1:]))
                    for c in opts.neo.split(",")]
    except (ValueError, IndexError):
        parser.error("--neo: e.g. '1S r0,2S r1'")
    title = "zodbshootout: %d objects per transaction, concurrency %s, %d CPUs, Python %s" % (
        opts.objects, ",".join(map(str, opts.concurrency)), os.cpu_count() or 0,
        platform.python_version())
    skipped: dict[str, str] = {}
    return measure_and_report(lambda opts, peaks: measure(opts, peaks, skipped), opts,
                              lambda results: report(results, opts, skipped), title,
                              lambda results: summary_rows(results, opts), skipped=skipped)


if __name__ == "__main__":
    sys.exit(main())
