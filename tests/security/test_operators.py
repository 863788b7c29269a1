"""Operators' mistakes: one line on stderr and a status, never a
traceback, and nothing sent to the cluster (no cluster runs here: a
command that connected would fail with "cannot connect" instead)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from neozodb.cli.cluster import free_port

pytestmark = pytest.mark.timeout(60)


def _run(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                          timeout=30, env=env)


def _neoctl(*words: str) -> subprocess.CompletedProcess:
    return _run("neozodb.ctl.neoctl", "-a", "127.0.0.1:%d" % free_port(), *words)


@pytest.mark.parametrize("words", [
    ["--timeout", "nan", "print", "cluster"],
    ["--timeout", "inf", "print", "cluster"],
    ["--timeout", "-1", "print", "cluster"],
    ["--timeout", "0", "print", "cluster"],
])
def test_bad_options_are_usage_errors(words):
    out = _neoctl(*words)
    assert (out.returncode, out.stdout) == (2, "")
    assert len(out.stderr.splitlines()) == 1 and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize("words, error", [
    (["print", "pt", "99999999999999999999"], "too large"),
    (["print", "pt", "0", "4294967296"], "too large"),
    (["tweak", "99999999999999999999"], "invalid node id"),
    (["set", "cluster", "FROZEN"], "invalid cluster state"),
    (["set", "replicas", "-1"], "invalid number of replicas"),
    (["set", "replicas", "99999999999999"], "too large"),
    (["truncate", "99999999999999999999999"], "out of range"),
    (["check", "99999999999999999999"], "too large"),
    (["kill", "S99999999999"], "out of range"),
    (["frobnicate"], "invalid command"),
])
def test_bad_commands_are_refused_before_connecting(words, error):
    """Checked whole before connecting (the admin address is closed: had
    it connected, the error would be "cannot connect"); the status stays
    1 as tests/cluster/test_neoctl.py pins it for command errors."""
    out = _neoctl(*words)
    assert (out.returncode, out.stdout) == (1, "")
    assert len(out.stderr.splitlines()) == 1 and "Traceback" not in out.stderr, out.stderr
    assert error in out.stderr and "cannot connect" not in out.stderr, out.stderr


@pytest.mark.parametrize("node, args", [
    ("neozodb.cli.master", ["-b", "127.0.0.1:0"]),
    ("neozodb.cli.storage", ["-m", "127.0.0.1:1", "-d", "db.sqlite"]),
    ("neozodb.cli.admin", ["-m", "127.0.0.1:1", "-b", "127.0.0.1:0"]),
])
def test_log_in_a_missing_directory_is_one_line(tmp_path, node, args):
    args = [a.replace("db.sqlite", str(tmp_path / "db.sqlite")) for a in args]
    out = _run(node, "-c", "x", *args, "-l", str(tmp_path / "missing" / "node.log"))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert "cannot open log file" in out.stderr


def test_memory_database_is_refused_outside_tests(monkeypatch):
    monkeypatch.delenv("NEOZODB_ALLOW_MEMORY_DATABASE", raising=False)
    out = _run("neozodb.cli.storage", "-c", "x", "-m", "127.0.0.1:1", "-d", ":memory:")
    assert out.returncode == 2
    assert len(out.stderr.splitlines()) == 1 and "NEOZODB_ALLOW_MEMORY_DATABASE" in out.stderr


def test_memory_database_allowed_when_tests_opt_in(monkeypatch):
    from neozodb.storage.backends import open_backend
    monkeypatch.setenv("NEOZODB_ALLOW_MEMORY_DATABASE", "1")
    backend = open_backend("sqlite", ":memory:")
    backend.close()
