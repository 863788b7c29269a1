"""Options of the server nodes (neozodb.cli.config)."""

import importlib.util
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from neozodb.cli.config import (
    format_address,
    format_nid,
    parse_address,
    parse_masters,
    parse_nid,
    parse_options,
)
from neozodb.cli.logs import setup_logging

pytestmark = pytest.mark.timeout(60)

SRC = str(Path(__file__).resolve().parents[2] / "src")


def fails(capsys, node, argv):
    """Run parse_options expecting exit status 2; return the stderr text."""
    with pytest.raises(SystemExit) as exc:
        parse_options(node, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"neo{node}: error: "), err
    return lines[0]


# -- addresses ----------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:10000", ("127.0.0.1", 10000)),
        ("localhost:1", ("localhost", 1)),
        (":2000", ("127.0.0.1", 2000)),
        ("2000", ("127.0.0.1", 2000)),
        ("  example.com:0 ", ("example.com", 0)),
        ("[::1]:10000", ("::1", 10000)),
        ("[fe80::1]:5", ("fe80::1", 5)),
    ],
)
def test_parse_address(text, expected):
    assert parse_address(text) == expected


def test_parse_address_default_host_and_port():
    assert parse_address(":7", default_host="0.0.0.0") == ("0.0.0.0", 7)
    assert parse_address("somehost", default_port=9) == ("somehost", 9)
    assert parse_address("[::1]", default_port=9) == ("::1", 9)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("host", "missing port"),
        ("host:abc", "bad port"),
        ("host:70000", "out of range"),
        ("host:-1", "bad port"),
        ("::1:10000", "brackets"),
        ("[::1:10000", "missing ']'"),
        ("[nothex]:1", "not an IPv6"),
        ("[::1]x", "':PORT'"),
        ("bad host:1", "bad host name"),
    ],
)
def test_parse_address_errors(text, fragment):
    with pytest.raises(ValueError, match=None) as exc:
        parse_address(text)
    assert fragment in str(exc.value)


def test_parse_masters():
    assert parse_masters("127.0.0.1:10000 127.0.0.1:10001") == [
        ("127.0.0.1", 10000),
        ("127.0.0.1", 10001),
    ]
    assert parse_masters(" a:1,b:2 ,\t[::1]:3  a:1 ") == [("a", 1), ("b", 2), ("::1", 3)]
    assert parse_masters("[2001:db8::7]:10000 [::1]:10001") == [
        ("2001:db8::7", 10000),
        ("::1", 10001),
    ]
    assert parse_masters("") == []
    assert parse_masters(None) == []
    with pytest.raises(ValueError, match="port 0"):
        parse_masters("a:1 b:0")
    with pytest.raises(ValueError, match="missing port"):
        parse_masters("a:1 b")


def test_format_address():
    assert format_address(("127.0.0.1", 10000)) == "127.0.0.1:10000"
    assert format_address(("::1", 5)) == "[::1]:5"
    for text in ("h:1", "[::1]:2", "10.0.0.1:0"):
        assert format_address(parse_address(text)) == text


def test_nid():
    assert parse_nid("S1") == 1
    assert parse_nid("s12") == 12
    assert parse_nid("M1") == -(0x10 << 24) + 1
    assert parse_nid("A2") == -(0x30 << 24) + 2
    assert parse_nid("C3") == -(0x20 << 24) + 3
    assert parse_nid("7") == 7
    assert parse_nid(str(-(0x10 << 24) + 4)) == -(0x10 << 24) + 4
    for text in ("S1", "M2", "C3", "A4"):
        assert format_nid(parse_nid(text)) == text
    for bad in ("X1", "S0", "", "1.5", str(1 << 31)):
        with pytest.raises(ValueError):
            parse_nid(bad)


# -- defaults -----------------------------------------------------------------


def test_master_defaults():
    o = parse_options("master", ["-c", "test"])
    assert o.node == "master"
    assert o.cluster == "test"
    assert o.masters == []
    assert o.bind == ("127.0.0.1", 10000)
    assert (o.partitions, o.replicas, o.autostart) == (100, 0, 0)
    assert o.loglevel == "INFO"
    assert o.logfile is None and o.nid is None and o.file is None
    assert o.keepalive == 30.0
    assert not hasattr(o, "database")


def test_storage_defaults():
    o = parse_options("storage", ["-c", "test", "-m", "127.0.0.1:10000", "-d", "db.sqlite"])
    assert o.node == "storage"
    assert o.bind == ("127.0.0.1", 0)
    assert o.masters == [("127.0.0.1", 10000)]
    assert o.adapter == "SQLite"
    assert o.database == "db.sqlite"
    assert o.wait == 0.0
    assert o.reset is False
    assert not hasattr(o, "partitions")


def test_admin_defaults():
    o = parse_options("admin", ["--cluster", "test", "--masters", "h:1 h:2"])
    assert o.bind == ("127.0.0.1", 9999)
    assert o.masters == [("h", 1), ("h", 2)]
    assert not hasattr(o, "adapter") and not hasattr(o, "partitions")


def test_command_line_values():
    o = parse_options(
        "master",
        ["-c", "x", "-b", "[::1]:0", "-p", "12", "-r", "2", "-A", "3", "-m", "m2:1",
         "--loglevel", "debug", "-l", "/tmp/m.log", "-i", "M2"],
    )
    assert o.bind == ("::1", 0)
    assert (o.partitions, o.replicas, o.autostart) == (12, 2, 3)
    assert o.masters == [("m2", 1)]
    assert o.loglevel == "DEBUG"
    assert o.logfile == "/tmp/m.log"
    assert o.nid == parse_nid("M2")
    o = parse_options(
        "storage",
        ["-c", "x", "-m", "h:1", "-d", "d", "-a", "sqlite", "-w", "2.5", "--reset", "-i", "3",
         "-b", "4000"],
    )
    assert o.adapter == "SQLite" and o.wait == 2.5 and o.reset is True and o.nid == 3
    assert o.bind == ("127.0.0.1", 4000)
    o = parse_options("storage", ["-c", "x", "-m", "h:1", "-d", "d", "-w", "-1"])
    assert o.wait == -1
    assert o.replication_rate == 0


@pytest.mark.parametrize("node, argv", [
    ("master", ["-c", "x"]),
    ("storage", ["-c", "x", "-m", "h:1", "-d", "d"]),
    ("admin", ["-c", "x", "-m", "h:1"]),
])
def test_keepalive(node, argv, tmp_path, capsys):
    assert parse_options(node, argv).keepalive == 30.0
    assert parse_options(node, argv + ["--keepalive", "2.5"]).keepalive == 2.5
    assert parse_options(node, argv + ["--keepalive", "0"]).keepalive == 0  # none
    path = tmp_path / "k.ini"
    path.write_text(f"[DEFAULT]\nkeepalive = 7\n[{node}]\n")
    assert parse_options(node, argv + ["-f", str(path)]).keepalive == 7.0
    assert parse_options(node, argv + ["-f", str(path), "--keepalive", "3"]).keepalive == 3.0
    for bad in ("-1", "soon", "nan", "inf"):
        line = fails(capsys, node, argv + ["--keepalive", bad])
        assert "--keepalive" in line and bad in line, line
    path.write_text(f"[{node}]\nkeepalive = -5\n")
    line = fails(capsys, node, argv + ["-f", str(path)])
    assert "keepalive" in line and "-5" in line, line


STORAGE = ["-c", "x", "-m", "h:1", "-d", "d"]  # what a storage needs


@pytest.mark.parametrize("text, rate", [
    ("500000", 500000), ("300K", 300 << 10), ("20M", 20 << 20), ("1.5g", int(1.5 * (1 << 30))),
    ("10MB/s", 10 << 20), ("0", 0)])
def test_replication_rate(text, rate):
    o = parse_options("storage", STORAGE + ["--replication-rate", text])
    assert o.replication_rate == rate


@pytest.mark.parametrize("text", ["fast", "-1", "10X", ""])
def test_replication_rate_errors(text, capsys):
    assert "rate" in fails(capsys, "storage", STORAGE + ["--replication-rate", text])


@pytest.mark.parametrize("text, rate", [
    ("5000", 5000), ("20K", 20000), ("1.5m", 1500000), ("300/s", 300), ("0", 0)])
def test_pack_rate(text, rate):
    o = parse_options("storage", STORAGE + ["--pack-rate", text])
    assert o.pack_rate == rate


@pytest.mark.parametrize("text", ["fast", "-1", "10G", ""])
def test_pack_rate_errors(text, capsys):
    assert "rate" in fails(capsys, "storage", STORAGE + ["--pack-rate", text])


# -- config file --------------------------------------------------------------


@pytest.fixture
def ini(tmp_path):
    path = tmp_path / "neo.conf"
    path.write_text(
        textwrap.dedent(
            """\
            [DEFAULT]
            cluster = filecluster
            masters = 127.0.0.1:10000 [::1]:10001
            loglevel = warning
            database = /default/db

            [master]
            partitions = 12
            replicas = 1
            autostart = 2

            [storage]
            database = /var/s1.sqlite
            wait = 3
            reset = yes
            bind = 127.0.0.2:0

            [storage2]
            database = /var/s2.sqlite
            bind = :20000
            adapter = sqlite

            [admin]
            bind = 0.0.0.0:9998
            """
        )
    )
    return str(path)


def test_file_master(ini):
    o = parse_options("master", ["-f", ini])
    assert o.cluster == "filecluster"
    assert o.masters == [("127.0.0.1", 10000), ("::1", 10001)]
    assert (o.partitions, o.replicas, o.autostart) == (12, 1, 2)
    assert o.loglevel == "WARNING"
    assert o.bind == ("127.0.0.1", 10000)
    assert o.section == "master"
    # "database" from [DEFAULT] is meant for storages: ignored here.
    assert not hasattr(o, "database")


def test_file_storage_sections_and_override(ini):
    o = parse_options("storage", ["-f", ini])
    assert o.database == "/var/s1.sqlite"
    assert o.wait == 3.0 and o.reset is True
    assert o.bind == ("127.0.0.2", 0)
    o = parse_options("storage", ["-f", ini, "-s", "storage2"])
    assert o.section == "storage2"
    assert o.database == "/var/s2.sqlite"
    assert o.bind == ("127.0.0.1", 20000)
    assert o.wait == 0.0 and o.reset is False
    assert o.cluster == "filecluster"
    # command line wins over the file
    o = parse_options(
        "storage",
        ["-f", ini, "-c", "cmdline", "-d", "/other", "-m", "h:5", "--loglevel", "INFO",
         "-b", ":1"],
    )
    assert o.cluster == "cmdline"
    assert o.database == "/other"
    assert o.masters == [("h", 5)]
    assert o.loglevel == "INFO"
    assert o.bind == ("127.0.0.1", 1)


def test_file_admin(ini):
    o = parse_options("admin", ["--file", ini])
    assert o.bind == ("0.0.0.0", 9998)
    assert o.masters == [("127.0.0.1", 10000), ("::1", 10001)]


def test_file_only_default_section(tmp_path):
    path = tmp_path / "c.ini"
    path.write_text("[DEFAULT]\ncluster = c\nmasters = h:1\n[storage]\ndatabase = x\nloglevel = DEBUG\n")
    o = parse_options("storage", ["-f", str(path)])
    assert (o.cluster, o.database, o.loglevel) == ("c", "x", "DEBUG")
    # no [admin] section but a [DEFAULT] one: the shared values are used
    o = parse_options("admin", ["-f", str(path)])
    assert o.cluster == "c"


# -- errors -------------------------------------------------------------------


def test_error_bad_port(capsys):
    line = fails(capsys, "master", ["-c", "x", "-b", "127.0.0.1:99999"])
    assert "-b/--bind" in line and "99999" in line
    line = fails(capsys, "admin", ["-c", "x", "-m", "h:1", "-b", "h:port"])
    assert "bad port" in line


def test_error_missing_cluster(capsys):
    line = fails(capsys, "master", [])
    assert "cluster" in line


def test_error_missing_masters(capsys):
    line = fails(capsys, "storage", ["-c", "x", "-d", "db"])
    assert "masters" in line
    line = fails(capsys, "admin", ["-c", "x"])
    assert "masters" in line


def test_error_missing_database(capsys):
    line = fails(capsys, "storage", ["-c", "x", "-m", "h:1"])
    assert "database" in line


def test_error_unknown_adapter(capsys):
    line = fails(capsys, "storage", ["-c", "x", "-m", "h:1", "-d", "d", "-a", "Oracle"])
    assert "unknown adapter" in line and "Oracle" in line


def test_error_missing_file(capsys, tmp_path):
    missing = str(tmp_path / "nope.conf")
    line = fails(capsys, "master", ["-c", "x", "-f", missing])
    assert "cannot read config file" in line and "nope.conf" in line


def test_error_bad_values(capsys):
    assert "partitions" in fails(capsys, "master", ["-c", "x", "-p", "0"])
    assert "replicas" in fails(capsys, "master", ["-c", "x", "-r", "-1"])
    assert "level" in fails(capsys, "master", ["-c", "x", "--loglevel", "LOUD"])
    assert "brackets" in fails(capsys, "master", ["-c", "x", "-m", "::1:10000"])
    assert "port 0" in fails(capsys, "storage", ["-c", "x", "-m", "h:0", "-d", "d"])
    assert "wait" in fails(capsys, "storage", ["-c", "x", "-m", "h:1", "-d", "d", "-w", "-2"])
    assert "not a master id" in fails(capsys, "master", ["-c", "x", "-i", "S1"])
    assert "unrecognized" in fails(capsys, "master", ["-c", "x", "--database", "d"])
    assert "requires -f" in fails(capsys, "master", ["-c", "x", "-s", "master"])


def test_error_file_contents(capsys, tmp_path, ini):
    line = fails(capsys, "storage", ["-f", ini, "-s", "nosuchsection"])
    assert "no section [nosuchsection]" in line
    bad = tmp_path / "bad.ini"
    bad.write_text("[master]\ncluster = c\npartitions = many\n")
    line = fails(capsys, "master", ["-f", str(bad)])
    assert "partitions" in line and "many" in line
    bad.write_text("[master]\ncluster = c\nheartbeat = 5\n")
    assert "unknown option 'heartbeat'" in fails(capsys, "master", ["-f", str(bad)])
    bad.write_text("[storage]\ncluster = c\nmasters = h:1\ndatabase = d\nreset = maybe\n")
    assert "not a boolean" in fails(capsys, "storage", ["-f", str(bad)])
    bad.write_text("no section header\n")
    assert "invalid config file" in fails(capsys, "master", ["-f", str(bad)])
    bad.write_text("[admin]\nmasters = h:1\n")
    assert "cluster" in fails(capsys, "master", ["-f", str(bad), "-s", "admin"])


def test_error_in_subprocess_is_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=SRC)
    proc = subprocess.run(
        [sys.executable, "-m", "neozodb.cli.config", "storage", "-c", "x", "-m", "h:1",
         "-f", str(tmp_path / "missing.ini")],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("neostorage: error: cannot read config file")
    assert "Traceback" not in proc.stderr
    ok = subprocess.run(
        [sys.executable, "-m", "neozodb.cli.config", "master", "-c", "x", "-b", "[::1]:0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert ok.returncode == 0, ok.stderr
    assert '"bind": "[::1]:0"' in ok.stdout


# -- logging ------------------------------------------------------------------


def test_setup_logging(tmp_path):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logfile = tmp_path / "node.log"
    label = ["S1"]
    try:
        setup_logging(lambda: label[0], str(logfile), "DEBUG")
        logging.getLogger("neozodb.test").debug("hello %s", "world")
        label[0] = None
        logging.getLogger("neozodb.test").warning("bye")
        # a second call replaces our handler instead of adding one
        h = setup_logging(None, None, "WARNING")
        ours = [x for x in root.handlers if getattr(x, "_neozodb_handler", False)]
        assert ours == [h]
        assert root.level == logging.WARNING
        with pytest.raises(ValueError):
            setup_logging(None, None, "NOPE")
    finally:
        for x in root.handlers[:]:
            if getattr(x, "_neozodb_handler", False):
                root.removeHandler(x)
                x.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = logfile.read_text().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(" DEBUG neozodb.test [S1] hello world")
    assert lines[1].endswith(" WARNING neozodb.test bye")


def test_tls_files_from_ini(tmp_path):
    """ca, cert and key are INI keys like any option; the files are checked
    when the options are parsed (a node exits with status 2 at start)."""
    from neozodb.net import certs
    ca = certs.make_ca(str(tmp_path))
    cert, key, _ = certs.make_cert(ca, str(tmp_path), "S1")
    path = tmp_path / "tls.ini"
    path.write_text("[DEFAULT]\ncluster = c\nmasters = h:1\nca = %s\ncert = %s\nkey = %s\n"
                    "[storage]\ndatabase = x\n" % (ca.path, cert, key))
    o = parse_options("storage", ["-f", str(path)])
    assert (o.ca, o.cert, o.key) == (ca.path, cert, key)
    assert o.tls is not None and o.tls.files == (ca.path, cert, key)
    assert parse_options("storage", ["-c", "c", "-m", "h:1", "-d", "x"]).tls is None


def test_tls_files_errors(tmp_path, capsys):
    line = fails(capsys, "master", ["-c", "x", "--ca", str(tmp_path / "missing.crt")])
    assert "TLS" in line and "missing" in line


# -- event loop ---------------------------------------------------------------


def test_event_loop_option(capsys, monkeypatch):
    assert parse_options("master", ["-c", "x"]).event_loop == "auto"
    assert parse_options("master", ["-c", "x", "--event-loop", "AsyncIO"]).event_loop == "asyncio"
    assert "unknown event loop 'tokio'" in fails(capsys, "admin",
                                                 ["-c", "x", "--event-loop", "tokio"])
    # uvloop asked for where it is not installed: one line at start, not a
    # traceback once the node runs
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "uvloop" else real_find_spec(name, *a))
    assert "uvloop is not installed" in fails(capsys, "storage",
                                              ["-c", "x", "--event-loop", "uvloop"])
