"""Options of the server nodes: argparse plus an optional INI file.

``parse_options(node, argv)`` returns an :class:`argparse.Namespace` for a
``'master'``, ``'storage'`` or ``'admin'`` node.  Options read from the file
named by ``-f/--file`` (section ``-s/--section``, default the node type;
``[DEFAULT]`` is shared) become defaults that the command line overrides.

Every error (bad value, missing option, unreadable file, unknown section)
is reported as the single line ``prog: error: <what is wrong>`` on stderr
and exits with status 2.

The address helpers (``parse_address``, ``parse_masters``,
``format_address``) and ``parse_nid``/``format_nid`` are shared with the
rest of the package.

``python -m neozodb.cli.config NODE [options]`` prints the parsed options
as JSON (handy to check a configuration file).
"""

from __future__ import annotations

import argparse
import configparser
import importlib.util
import json
import math
import sys
from collections.abc import Callable

from neozodb.cli.addresses import (
    DEFAULT_HOST,
    NID_NAMESPACES,
    format_address,
    format_nid,
    parse_address,
    parse_masters,
    parse_nid,
)
from neozodb.net.threaded import DEFAULT_KEEPALIVE
from neozodb.net.tls import TLSConfigError, from_options

__all__ = [
    "ADAPTERS",
    "DEFAULT_BIND",
    "LOG_LEVELS",
    "NODE_TYPES",
    "OptionParser",
    "format_address",
    "format_nid",
    "parse_address",
    "parse_masters",
    "parse_nid",
    "parse_options",
]

NODE_TYPES = ("master", "storage", "admin")
DEFAULT_BIND = {
    "master": (DEFAULT_HOST, 10000),
    "storage": (DEFAULT_HOST, 0),
    "admin": (DEFAULT_HOST, 9999),
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING")
ADAPTERS = ("SQLite", "PostgreSQL", "MariaDB", "MySQL", "Importer")
_NODE_NID_PREFIX = {"master": "M", "storage": "S", "admin": "A"}

def _type(func: Callable, name: str) -> Callable:
    """Wrap *func* so that ValueError becomes an argparse type error."""

    def convert(value):
        try:
            return func(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = name
    return convert


def _int_min(minimum: int) -> Callable:
    def conv(value):
        try:
            n = int(str(value).strip())
        except ValueError:
            raise ValueError(f"invalid integer {value!r}") from None
        if n < minimum:
            raise ValueError(f"{n} is less than {minimum}")
        return n

    return _type(conv, "int")


def _cluster(value: str) -> str:
    s = value.strip()
    if not s or any(c.isspace() for c in s):
        raise ValueError(f"invalid cluster name {value!r}")
    return s


def _bind(value: str) -> tuple[str, int]:
    return parse_address(value)


def _masters(value: str) -> list[tuple[str, int]]:
    return parse_masters(value)


def _loglevel(value: str) -> str:
    s = value.strip().upper()
    if s not in LOG_LEVELS:
        raise ValueError(f"invalid log level {value!r} (choose from {', '.join(LOG_LEVELS)})")
    return s


def _adapter(value: str) -> str:
    s = value.strip()
    for name in ADAPTERS:
        if s.lower() == name.lower():
            return name
    raise ValueError(f"unknown adapter {value!r} (available: {', '.join(ADAPTERS)})")


EVENT_LOOPS = ("auto", "asyncio", "uvloop")


def _event_loop(value: str) -> str:
    s = value.strip().lower()
    if s not in EVENT_LOOPS:
        raise ValueError(f"unknown event loop {value!r} (choose from {', '.join(EVENT_LOOPS)})")
    if s == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ValueError("uvloop is not installed (pip install 'neozodb[fast]')")
    return s


def _seconds(value: str) -> float:
    try:
        return float(str(value).strip())
    except ValueError:
        raise ValueError(f"invalid number of seconds {value!r}") from None


def _wait(value: str) -> float:
    w = _seconds(value)
    if w != w or (w < 0 and w != -1):
        raise ValueError(f"invalid wait {value!r}: seconds >= 0, or -1 for no limit")
    return w


def _keepalive(value: str) -> float:
    k = _seconds(value)
    if not (k >= 0 and math.isfinite(k)):
        raise ValueError(f"invalid keep-alive {value!r}: seconds >= 0 (0 = none)")
    return k


def _scaled_rate(value: str, suffixes: tuple[str, ...], units: dict[str, int],
                 hint: str) -> int:
    """A non-negative number, then maybe a unit letter (a key of *units*),
    then maybe *suffixes* (removed in that order); any case."""
    s = str(value).strip().upper()
    for suffix in suffixes:
        s = s.removesuffix(suffix)
    unit = s[-1:] if s[-1:] in units else ""
    try:
        n = float(s[:len(s) - len(unit)])
    except ValueError:
        raise ValueError(f"invalid rate {value!r} ({hint})") from None
    if not n >= 0:
        raise ValueError(f"invalid rate {value!r}: must not be negative")
    return int(n * units[unit])


def _rate(value: str) -> int:
    return _scaled_rate(value, ("/S", "B"), {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30},
                        "bytes per second, e.g. 500000 or 20M")


def _object_rate(value: str) -> int:
    return _scaled_rate(value, ("/S",), {"": 1, "K": 1000, "M": 1000000},
                        "objects per second, e.g. 5000 or 20K")


def _nonempty(value: str) -> str:
    if not value.strip():
        raise ValueError("empty value")
    return value


# -- parser -------------------------------------------------------------------


class OptionParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line: ``prog: error: message``."""

    def error(self, message):
        message = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {message}\n")


class _Spec:
    """What the INI reader needs to know about one option."""

    __slots__ = ("dest", "convert", "flag", "display")

    def __init__(self, dest, convert, flag, display):
        self.dest = dest
        self.convert = convert
        self.flag = flag
        self.display = display


def _build_parser(node: str, prog: str | None):
    parser = OptionParser(
        prog=prog or f"neo{node}",
        description=f"NEO {node} node",
        allow_abbrev=False,
    )
    specs: dict[str, _Spec] = {}

    def add(*flags, file_ok=True, **kw):
        action = parser.add_argument(*flags, **kw)
        if file_ok:
            specs[action.dest] = _Spec(
                action.dest,
                kw.get("type"),
                kw.get("action") == "store_true",
                "/".join(flags),
            )
        return action

    add("-f", "--file", metavar="PATH", file_ok=False, help="INI configuration file")
    add(
        "-s",
        "--section",
        metavar="NAME",
        file_ok=False,
        help=f"section of the configuration file (default: {node})",
    )
    add("-c", "--cluster", metavar="NAME", type=_type(_cluster, "name"), help="cluster name")
    add(
        "-m",
        "--masters",
        metavar='"H:P H:P"',
        type=_type(_masters, "masters"),
        help="space-separated list of master addresses"
        + (" (the other masters)" if node == "master" else ""),
    )
    add(
        "-b",
        "--bind",
        metavar="H:P",
        type=_type(_bind, "address"),
        default=DEFAULT_BIND[node],
        help="address to listen on (default: %s; port 0 = any free port)"
        % format_address(DEFAULT_BIND[node]),
    )
    add("-l", "--logfile", metavar="PATH", type=_type(_nonempty, "path"), help="log file")
    add(
        "--loglevel",
        metavar="LEVEL",
        type=_type(_loglevel, "level"),
        default="INFO",
        help="DEBUG, INFO or WARNING (default: INFO)",
    )
    add("-i", "--nid", metavar="NID", type=_type(parse_nid, "nid"), help="node id (int or S1 style)")
    add(
        "--keepalive",
        metavar="SECONDS",
        type=_type(_keepalive, "seconds"),
        default=DEFAULT_KEEPALIVE,
        help="a peer silent this long is considered dead: it is pinged after half of it,"
        " its connection closed after all of it (default: %g; 0 = never)" % DEFAULT_KEEPALIVE,
    )
    add(
        "--identify-timeout",
        metavar="SECONDS",
        type=_type(_keepalive, "seconds"),
        help="close an accepted connection that has not identified after this long"
        " (default: 20, or $NEOZODB_IDENTIFY_TIMEOUT; 0 = never)",
    )
    add(
        "--max-connections",
        metavar="N",
        type=_int_min(0),
        help="most accepted connections at a time; more are refused (default: 1000, or the"
        " file descriptor limit minus 100 if lower, or $NEOZODB_MAX_CONNECTIONS; 0 = no cap)",
    )
    add(
        "--event-loop",
        metavar="LOOP",
        type=_type(_event_loop, "event loop"),
        default="auto",
        help="asyncio, uvloop (the extra 'fast': half of asyncio's own cost per message),"
        " or auto: uvloop if installed (default)",
    )
    for flag, what in (("--ca", "the cluster's CA certificate"),
                       ("--cert", "this node's certificate, signed by the CA"),
                       ("--key", "this node's private key")):
        add(flag, metavar="PEM", type=_type(_nonempty, "path"),
            help="TLS: %s (PEM file; --ca, --cert and --key go together)" % what)
    if node == "master":
        add(
            "-p",
            "--partitions",
            metavar="N",
            type=_int_min(1),
            default=100,
            help="number of partitions (default: 100)",
        )
        add(
            "-r",
            "--replicas",
            metavar="N",
            type=_int_min(0),
            default=0,
            help="number of replicas (default: 0)",
        )
        add(
            "-A",
            "--autostart",
            metavar="N",
            type=_int_min(0),
            default=0,
            help="start the cluster once N storages are up (default: 0 = never)",
        )
        add("--read-only", action="store_true",
            help="refuse every write of every client (the cluster serves reads only)")
    elif node == "storage":
        add(
            "-a",
            "--adapter",
            metavar="NAME",
            type=_type(_adapter, "adapter"),
            default="SQLite",
            help="database adapter (default: SQLite)",
        )
        add("-d", "--database", metavar="PATH", type=_type(_nonempty, "database"), help="database")
        add(
            "-w",
            "--wait",
            metavar="SECONDS",
            type=_type(_wait, "seconds"),
            default=0.0,
            help="seconds to wait for the database (default: 0; -1 = no limit)",
        )
        add("--reset", action="store_true", help="erase the database and exit")
        # -- MariaDB adapter options (NEO's); other adapters refuse them
        add("--engine", metavar="NAME", type=_type(_nonempty, "engine"),
            help="MariaDB: storage engine of new tables, InnoDB (default) or RocksDB")
        add("--dedup", action="store_true", default=None,
            help="MariaDB: a unique index on data hashes, as NEO's --dedup;"
            " SQLite: a new database reuses identical data rows (docs/backends.md)")
        add(
            "--replication-rate",
            metavar="BYTES",
            type=_type(_rate, "rate"),
            default=0,
            help="cap on the object data this node replicates, in bytes per second"
            " (K, M, G suffixes; default: 0 = no cap)",
        )
        add(
            "--pack-rate",
            metavar="OBJECTS",
            type=_type(_object_rate, "rate"),
            default=0,
            help="cap on the objects this node visits per second when it packs"
            " (K = 1000, M = 1000000; default: 0 = no cap, packing still yields to"
            " other requests between chunks)",
        )
        add("--read-only", action="store_true",
            help="refuse writes from clients (replication still updates this node)")
    elif node == "admin":
        add(
            "--allow-anonymous-ctl",
            action="store_true",
            help="serve neoctl connections that do not identify with the cluster name, as"
            " NEO's neoctl does (unsafe beyond a trusted host: anyone reaching the port"
            " can then operate the cluster)",
        )
    return parser, specs


def _read_file(parser, specs, path, section, explicit_section):
    """Read the INI file and return converted values keyed by option dest."""
    # Make [DEFAULT] an ordinary section so that keys of the node's own section
    # can be told apart from shared ones (unknown shared keys are ignored:
    # they are meant for other node types).
    cp = configparser.ConfigParser(interpolation=None, default_section="\0")
    try:
        with open(path, encoding="utf-8") as f:
            cp.read_file(f)
    except OSError as e:
        parser.error(f"cannot read config file {path!r}: {e.strerror or e}")
    except (configparser.Error, UnicodeDecodeError) as e:
        parser.error(f"invalid config file {path!r}: {e}")
    sources = []
    if cp.has_section("DEFAULT"):
        sources.append(("DEFAULT", True))
    if cp.has_section(section):
        sources.append((section, False))
    elif explicit_section or not sources:
        parser.error(f"no section [{section}] in config file {path!r}")
    values = {}
    for sec, shared in sources:
        for key, raw in cp.items(sec):
            dest = key.replace("-", "_")
            spec = specs.get(dest)
            if spec is None:
                if shared:
                    continue
                parser.error(f"{path}: [{sec}] unknown option {key!r}")
            raw = raw.strip()
            if not raw:
                values.pop(dest, None)
                continue
            where = f"{path}: [{sec}] {key}"
            if spec.flag:
                flag = cp.BOOLEAN_STATES.get(raw.lower())
                if flag is None:
                    parser.error(f"{where}: not a boolean: {raw!r}")
                values[dest] = flag
                continue
            try:
                values[dest] = spec.convert(raw) if spec.convert else raw
            except (argparse.ArgumentTypeError, ValueError) as e:
                parser.error(f"{where}: {e}")
    return values


def parse_options(
    node: str, argv: list[str] | None = None, prog: str | None = None
) -> argparse.Namespace:
    """Parse the options of a *node* ('master', 'storage' or 'admin').

    Exits with status 2 and a one-line message on any error.  The result has
    ``node``, ``cluster``, ``masters`` (list of (host, port)), ``bind``
    ((host, port)), ``logfile``, ``loglevel``, ``nid`` (int or None),
    ``keepalive`` (seconds), ``file``, ``section`` and the node-specific
    options.
    """
    if node not in NODE_TYPES:
        raise ValueError(f"unknown node type {node!r}")
    parser, specs = _build_parser(node, prog)
    argv = sys.argv[1:] if argv is None else list(argv)
    first = parser.parse_args(argv)
    if first.section is not None and first.file is None:
        parser.error("-s/--section requires -f/--file")
    if first.file is not None:
        section = first.section or node
        values = _read_file(parser, specs, first.file, section, first.section is not None)
        parser.set_defaults(**values)
        options = parser.parse_args(argv)
        options.section = section
    else:
        options = first
    if options.cluster is None:
        parser.error("missing cluster name: use -c/--cluster or 'cluster' in the config file")
    if options.masters is None:
        options.masters = []
    if node != "master" and not options.masters:
        parser.error("missing master addresses: use -m/--masters or 'masters' in the config file")
    if node == "storage" and options.database is None:
        parser.error("missing database: use -d/--database or 'database' in the config file")
    if options.nid is not None:
        prefix = _NODE_NID_PREFIX[node]
        if options.nid >> 24 != NID_NAMESPACES[prefix]:
            parser.error(
                f"node id {format_nid(options.nid)} is not a {node} id (expected e.g. {prefix}1)"
            )
    try:
        options.tls = from_options(options)
    except TLSConfigError as e:
        parser.error(f"TLS: {e}")
    options.node = node
    return options


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in NODE_TYPES:
        sys.stderr.write(
            "usage: python -m neozodb.cli.config {master,storage,admin} [options]\n"
        )
        return 2
    options = parse_options(argv[0], argv[1:], prog=f"neo{argv[0]}")
    out = {}
    for key, value in sorted(vars(options).items()):
        if key == "bind":
            value = format_address(value)
        elif key == "masters":
            value = [format_address(a) for a in value]
        elif key == "tls":
            value = value is not None
        out[key] = value
    print(json.dumps(out, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
