"""The benchmark scripts of issue 12 run, print their table and exit 0, in
their smallest mode.  No timing is checked: the numbers are whatever the
machine gives."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "bench")


def run(script: str, *args: str, timeout: float = 60) -> str:
    result = subprocess.run([sys.executable, os.path.join(BENCH, script), *args],
                            capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.timeout(90)
def test_concurrency_quick():
    out = run("concurrency.py", "--quick", "--seconds", "0.3", "--procs", "2",
              "--load-procs", "2", "--objects", "300")
    assert "commits/s, 2 client processes" in out
    assert "loads/s, 2 client processes" in out
    assert "neo / ZEO" in out and "peak RSS" in out


@pytest.mark.timeout(90)
def test_scale_quick():
    out = run("scale.py", "--quick", "--sizes", "200,400", "--loads", "20", "--commits", "5",
              "--batch", "100", "--builders", "1")
    assert "growth (1.00: flat)" in out
    assert "S1 RSS/peak MB" in out


@pytest.mark.timeout(90)
def test_shootout_quick():
    pytest.importorskip("zodbshootout")
    out = run("shootout.py", "--quick", "--concurrency", "1", "--benchmarks", "add,cold",
              timeout=80)
    assert "c=1: add 200 objects" in out
    assert "ZEO / neo 1S r0" in out


@pytest.mark.timeout(90)
def test_cpu_quick():
    out = run("cpu.py", "--commits", "20", "--rounds", "1", "--loads", "20", "--objects", "200")
    for measure in ("one-object commit", "commit of 1000 new objects", "update of 1000 objects",
                    "cold load (storage API)"):
        for backend in ("neo 1S r0", "neo 2S r1", "ZEO"):
            assert any(measure in line and backend in line for line in out.splitlines()), (
                measure, backend, out)


@pytest.mark.timeout(90)
def test_ab_of_the_work_tree_against_itself():
    # a directory holding the neozodb package: the work tree's own
    src = os.path.join(BENCH, os.pardir, "src")
    out = run("ab.py", src, "--blocks", "2", "--block", "5")
    assert "A/B of the nodes' code, 1S r0, 2 blocks of 5" in out
    assert "B faster in" in out
