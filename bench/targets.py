"""Issue 12's targets, each against what a ``bench.py --all`` run measured:
met or not.  ``bench.py --all`` prints this table last.

The issue measured at 1 master, 2 storages, replicas 0 (``neo 2S r0``),
unless a target names another set-up; a target "with replicas 0" is
checked at every such configuration of the run (1S r0 and 2S r0)."""
from __future__ import annotations

import re

R0 = ("neo 1S r0", "neo 2S r0")
R1 = ("neo 2S r1",)

# bench.py's measures: key, label, the configurations, target (ZEO / neozodb)
BENCH = (
    ("commit_new", "commit {n} new objects", ("neo 2S r0",), 2.0),
    ("update", "update {n} objects", ("neo 2S r0",), 2.0),
    ("cold_read", "{n} cold reads", ("neo 2S r0",), 2.0),
    ("small_median", "1-object commit, median", R0, 1.2),
    ("small_median", "1-object commit, median", R1, 1.0),
)
REPLICATION_MB_S = 40.0
MIGRATION = 1.0  # zodbconvert FS -> FS time / neomigrate's

MIGRATE_ROW = re.compile(r"^(FS -> \S+(?: \S+ \S+)?, \w+)\s+([\d.]+)\s")
MIGRATE_REFERENCE = "FS -> FS, zodbconvert"


def migration_times(e: dict) -> dict[str, float]:
    """migrate.py's rows in the run's output: label -> seconds."""
    text = e["migrate"].get("output", "")
    return {m.group(1): float(m.group(2))
            for m in map(MIGRATE_ROW.match, text.splitlines()) if m}


def checks(e: dict) -> list[tuple[str, str, float | None, float, str]]:
    """(measure, neozodb configuration, value, target, unit) for every
    target of the issue that the run measured; value None: not measured."""
    out = []
    b = e["bench"]
    n = b["objects"]
    for measure, text, configs, target in BENCH:
        for key, result in b["results"].items():
            label = result.get("label", key)
            if label in configs:
                ratio = (b["ratios"].get(key, {}).get("zeo") or {}).get(measure)
                out.append((text.format(n=n) + ", ZEO / neozodb", label, ratio, target, "x"))
    for row in e["concurrency"].get("summary", []):
        loads = row["measure"].startswith("loads")
        if loads or row["neo"] in R0:
            # concurrency.py's own targets (its TARGETS): neozodb's rate / ZEO's
            out.append((row["measure"] + ", neozodb / ZEO", row["neo"], row["ratio"],
                        row["target"], "x"))
    throughput = (e["replication"].get("results") or {}).get("throughput")
    if throughput:
        out.append(("replication of %d objects to an empty storage" % throughput["objects"],
                    "", throughput["mb_per_s"], REPLICATION_MB_S, "MB/s"))
    times = migration_times(e)
    reference = times.get(MIGRATE_REFERENCE)
    for label, seconds in times.items():
        if "neomigrate" in label:
            out.append(("%s against %s" % (label, MIGRATE_REFERENCE), "",
                        reference / seconds if reference and seconds else None, MIGRATION, "x"))
    return out


def target_rows(e: dict) -> tuple[list[list[str]], list[str]]:
    """The table's rows (measure, neozodb, value, target, met) and the
    measures whose target was not met."""
    rows, missed = [], []
    for measure, config, value, target, unit in checks(e):
        met = value is not None and value >= target
        fmt = "%.2f" if unit == "x" else "%.1f " + unit
        rows.append([measure, config or "-", fmt % value if value is not None else "-",
                     (">= " + fmt) % target, "yes" if met else "NO"])
        if not met:
            missed.append("%s%s" % (measure, " (%s)" % config if config else ""))
    return rows, missed


def summary(rows: list[list[str]], missed: list[str]) -> str:
    if not missed:
        return "every target met (%d)" % len(rows)
    return "\n".join(["%d of %d targets met; not met:" % (len(rows) - len(missed), len(rows))]
                     + ["  " + measure for measure in missed])
