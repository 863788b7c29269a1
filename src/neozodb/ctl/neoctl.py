"""neoctl: operate a cluster through its admin node.

Prints what NEO's neoctl prints (see docs/operations.md); ``--json`` prints
the same information as JSON for scripts.  Every failure is one line on
stderr and a non-zero exit status.

Times are printed in UTC, without a zone suffix: the id timestamps of
``print node`` and the date of ``last_tid`` in ``print ids`` (a TID *is* a
UTC date).  NEO prints the id timestamps in the local time of the machine
running neoctl; we print UTC so that both columns use the same clock, output
does not depend on where neoctl runs, and it matches the servers' clocks
(our machines run UTC, where this is the same as NEO's output).

Options may come anywhere (``neoctl print pt --json``); an unknown option is
an error (exit status 2), never a command word.  Node ids are case-insensitive
(``S3``, ``s3``) or plain integers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import ssl
import sys

from neozodb.cli.config import format_address, parse_address, parse_nid
from neozodb.net.endpoint import ConnectionClosed, RemoteError
from neozodb.net.threaded import ThreadedConnection
from neozodb.net.tls import TLSConfigError, load_contexts
from neozodb.nodes import STATE_LETTER, address_from_wire
from neozodb.protocol import (
    ClusterStates,
    NodeStates,
    NodeTypes,
    Packets,
    nid_str,
    p64,
    u64,
)
from neozodb.protocol.features import ANNOUNCEMENT
from neozodb.pt import PartitionTable
from neozodb.tid import neo_tid_time, tid_from_user

from . import older, status
from .status import CtlError

USAGE = """\
commands:
  print cluster                 cluster state (None while the admin has no master)
  print ids                     last oid, last tid (UTC date) and last partition table id
  print node [TYPE]             nodes (TYPE: MASTER STORAGE CLIENT ADMIN), id times in UTC
  print pt [MIN [MAX [NODE]]]   partition table: partitions MIN (default 0) to MAX
                                excluded (default 0: to the end); NODE (e.g. S1):
                                only that storage's cells
  print primary                 primary master
  print summary                 health summary (NEO's): a commented JSON of the
                                severities, then cluster state and cell counts
  print check                   progress and findings of the last check
  print pack                    pack orders: up to which TID, GC or history,
                                which storages completed them
  print import                  progress of a storage importing a ZODB (Importer)
  print pt_history              older partition tables the storages present remember:
                                which could serve again, truncating after which TID
                                (print check, pack, import, pt_history: neozodb
                                master and admin only)
  start                         allow the cluster to leave RECOVERING
  add NID... | add all          accept pending storage nodes (NID e.g. S3)
  set cluster STATE             e.g. set cluster STOPPING
  set replicas N                wanted number of replicas per partition; cells
                                move at the next tweak
  tweak [-n] [NID...]           rebalance the partition table over the running
                                storages, draining the listed ones (a down
                                storage holding cells must be listed); prints
                                the resulting table; -n: dry run
  check [PARTITION[:NID]...]    compare the replicas of the partitions (default:
                                all; NEO's ":NID" or ":": all) chunk by chunk;
                                copies that differ from the majority, or from
                                the reference NID, are marked CORRUPTED and
                                replicated again from the good ones; waits for
                                the repairs, then reports (NEO's master reports
                                nothing: the check is only started); then
                                [MIN_TID [MAX_TID]] to check only those
  kill NID                      stop a running storage (its cells get OUT_OF_DATE)
  drop NID                      remove a storage from the cluster for good (it
                                erases its database if it is connected)
  truncate TID                  delete every transaction committed after TID
                                (tid:INT, tid:0xHEX or a UNIX time); the cluster
                                goes through recovery, which waits for every
                                storage of the table (or start)
  recover_pt PTID               while RECOVERING with a table that is not operational:
                                start from older table PTID (print pt_history),
                                deleting every transaction after its TID
  prune_orphan 0|1 NID...|all   storages delete the data no object revision uses
                                (1: dry run)
  flush_log                     ask every node to flush its log

NIDs are case-insensitive (S3 or s3) or plain integers.  Times are UTC.
"""

PT_USAGE = "usage: print pt [MIN [MAX [NODE]]]"


class _Silent:
    def dispatch(self, conn, msg_id, packet, args):
        pass

    def connection_lost(self, conn):
        pass


class NeoCtl:
    """A connection to an admin node.  With ``cluster``, it identifies
    with that name (what a neozodb admin requires); without, it sends its
    requests at once as NEO's neoctl does, which NEO's admin expects (it
    takes an identifying admin for a backup cluster's) and a neozodb admin
    serves only with ``--allow-anonymous-ctl``."""

    def __init__(self, address: tuple[str, int], timeout: float = 30.0,
                 cluster: str | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.address = address
        self.tls = tls  # client TLS context (net/tls.py); None: plain
        self.timeout = timeout
        self.cluster = cluster
        self.conn: ThreadedConnection | None = None

    def connect(self) -> None:
        conn = ThreadedConnection(self.address, _Silent(), "neoctl", tls=self.tls)
        try:
            conn.connect(timeout=self.timeout)
        except OSError as e:
            raise CtlError("cannot connect to admin at %s: %s" % (format_address(self.address),
                                                                   e.strerror or e)) from None
        self.conn = conn
        if self.cluster is not None:
            self.call(Packets.RequestIdentification, NodeTypes.ADMIN, None, None,
                      self.cluster.encode(), None, ANNOUNCEMENT)

    def call(self, packet, *args):
        try:
            return self.conn.call(packet, *args, timeout=self.timeout)
        except RemoteError as e:
            raise CtlError(e.message or e.code.name) from None
        except ConnectionClosed as e:
            raise CtlError("connection to admin lost: %s" % e) from None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    # -- queries --------------------------------------------------------------
    def nodes(self, node_type: NodeTypes | None = None) -> list[tuple]:
        types = [node_type] if node_type is not None else list(NodeTypes)
        result = []
        for t in types:
            (nodes,) = self.call(Packets.AskNodeList, t)
            result.extend(nodes)
        return sorted(result, key=lambda n: (nid_str(n[2])[0], n[2] & 0xffffff))

    def partition_table(self, min_offset: int = 0, max_offset: int = 0,
                        nid: int | None = None) -> PartitionTable:
        """Partitions ``min_offset`` to ``max_offset`` excluded (0: to the
        end), with only the cells of ``nid`` if given; row 0 of the returned
        table is partition ``min_offset``."""
        ptid, replicas, rows = self.call(Packets.AskPartitionList, min_offset, max_offset, nid)
        if nid is not None:  # NEO's admin ignores the node: filter here
            rows = [[cell for cell in row if cell[0] == nid] for row in rows]
        pt = PartitionTable(len(rows), replicas)
        pt.load(ptid, replicas, rows)
        return pt


def _node_dict(node) -> dict:
    node_type, addr, nid, state, id_ts = node
    address = address_from_wire(addr)
    return {"nid": nid_str(nid), "type": node_type.name,
            "address": format_address(address) if address else None,
            "state": state.name, "id_timestamp": id_ts}


def format_utc(timestamp: float | None) -> str:
    """UNIX time -> ``'2026-11-27 20:59:44.526992'`` in UTC (see the module docstring)."""
    if timestamp is None:
        return "None"
    when = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    return when.strftime("%Y-%m-%d %H:%M:%S.%f")


def _parse_nid(text: str) -> int:
    try:
        return parse_nid(text)
    except ValueError as e:
        raise CtlError(str(e)) from None


def _parse_tid(text: str) -> int:
    try:
        return tid_from_user(text)
    except ValueError as e:
        hint = " (write a TID as tid:%s)" % text if text.lower().startswith("0x") else ""
        raise CtlError("%s%s" % (e, hint)) from None


def _parse_offset(name: str, text: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise CtlError("invalid %s %r: expected a partition number (0, 1, ...)" % (name, text))
    if len(text) > 10 or int(text) > 0xFFFFFFFF:  # a wire int; long digit strings are slow
        raise CtlError("invalid %s %r: too large" % (name, text))
    return int(text)


def _print_pt(ctl: NeoCtl, args: list[str]) -> tuple[list[str], object]:
    if len(args) > 3:
        raise CtlError(PT_USAGE)
    min_offset = _parse_offset("MIN", args[0]) if args else 0
    max_offset = _parse_offset("MAX", args[1]) if len(args) > 1 else 0
    if max_offset and max_offset <= min_offset:
        raise CtlError("invalid partition range: MAX (%d) must be greater than MIN (%d),"
                       " or 0 for the end" % (max_offset, min_offset))
    nid = None
    if len(args) > 2:
        nid = _parse_nid(args[2])
        if not nid_str(nid).startswith("S"):
            raise CtlError("not a storage node: %s" % nid_str(nid))
    pt = ctl.partition_table(min_offset, max_offset, nid)
    storages = ctl.nodes(NodeTypes.STORAGE)
    if nid is not None:
        storages = [n for n in storages if n[2] == nid]
        if not storages and nid not in pt.nids():
            raise CtlError("unknown node: %s" % nid_str(nid))
    letters = {n[2]: STATE_LETTER.get(n[3], "U") for n in storages}
    lines = [pt.header()] + pt.grid(letters)
    return lines, {"ptid": pt.ptid, "replicas": pt.num_replicas, "min_offset": min_offset,
                   "rows": [[[nid_str(n), CELL_NAMES[s]] for n, s in row] for row in pt.rows()],
                   "nodes": {nid_str(n[2]): n[3].name for n in storages}}


def _parse_replicas(text: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise CtlError("invalid number of replicas %r: expected 0, 1, 2, ..." % text)
    if int(text) >= 1 << 31:
        raise CtlError("invalid number of replicas %r: too large" % text)
    return int(text)


def _tweak(ctl: NeoCtl, args: list[str]) -> tuple[list[str], object]:
    """``tweak [-n] [NID...]``: the grid of the resulting (with -n: would-be)
    table, without header (the master does not answer its ptid), or NEO's
    "No change done."."""
    dry_run = "-n" in args
    nids = [_parse_nid(a) for a in args if a != "-n"]
    changed, rows = ctl.call(Packets.TweakPartitionTable, dry_run, nids)
    pt = PartitionTable(len(rows), 0)
    pt.load(None, 0, rows)
    storages = ctl.nodes(NodeTypes.STORAGE)
    letters = {n[2]: STATE_LETTER.get(n[3], "U") for n in storages}
    return pt.grid(letters) if changed else ["No change done."], {
        "changed": changed, "dry_run": dry_run,
        "rows": [[[nid_str(n), CELL_NAMES[s]] for n, s in row] for row in pt.rows()],
        "nodes": {nid_str(n[2]): n[3].name for n in storages}}


def _format_nodes(nodes) -> list[str]:
    rows = [_node_dict(n) for n in nodes]
    width = max((len(r["address"] or "") for r in rows), default=0)
    lines = []
    for r in rows:
        when = format_utc(r["id_timestamp"])
        lines.append("%s | %-7s | %-*s | %s | %s" % (
            r["nid"], r["type"], width, r["address"] or "", r["state"], when))
    return lines


def run_command(ctl: NeoCtl, words: list[str], progress=lambda line: None
                ) -> tuple[list[str], object]:
    """Execute one command: (text lines, JSON-able value).  Long commands
    report progress through ``progress(line)``."""
    if not words:
        raise CtlError("no command")
    cmd, args = words[0], words[1:]
    if cmd == "print":
        if not args:
            raise CtlError("print what? (cluster, ids, node, pt, primary, summary, check, pack,"
                           " import, pt_history)")
        what, rest = args[0], args[1:]
        if what == "cluster":
            (state,) = ctl.call(Packets.AskClusterState)
            name = state.name if state is not None else "None"
            return [name], {"cluster": name}
        if what == "ids":
            last_tid, last_oid, _ = ctl.call(Packets.AskLastIDs)
            ptid, _, truncate_tid = ctl.call(Packets.AskRecovery)
            oid = u64(last_oid) if last_oid else 0
            lines = ["last_oid = %#x" % oid]
            if last_tid is None:
                lines.append("last_tid = None")
            else:
                lines.append("last_tid = %#x (%s)" % (u64(last_tid), neo_tid_time(u64(last_tid))))
            lines.append("last_ptid = %s" % ptid)
            if truncate_tid is not None:  # a truncation is pending
                lines.append("truncate_tid = %#x (%s)" % (
                    u64(truncate_tid), neo_tid_time(u64(truncate_tid))))
            return lines, {"last_oid": oid, "last_tid": None if last_tid is None else u64(last_tid),
                           "last_ptid": ptid,
                           "truncate_tid": None if truncate_tid is None else u64(truncate_tid)}
        if what == "node":
            node_type = None
            if rest:
                try:
                    node_type = NodeTypes[rest[0].upper()]
                except KeyError:
                    raise CtlError("invalid node type: %s" % rest[0]) from None
            nodes = ctl.nodes(node_type)
            return _format_nodes(nodes), [_node_dict(n) for n in nodes]
        if what == "pt":
            return _print_pt(ctl, rest)
        if what == "check":
            state = status.check_status(ctl)
            return status.check_report(state), state
        if what == "pack":
            state = status.pack_status(ctl)
            return status.pack_report(state), state
        if what == "import":
            return status.import_report(ctl)
        if what == "pt_history":
            return older.print_history(ctl, rest)
        if what == "summary":
            return _summary(ctl)
        if what == "primary":
            (nid,) = ctl.call(Packets.AskPrimary)
            return [nid_str(nid)], {"primary": nid_str(nid)}
        raise CtlError("invalid command: print %s" % what)
    if cmd == "start":
        ctl.call(Packets.SetClusterState, ClusterStates.VERIFYING)
        return [], {"ok": True}
    if cmd == "set":
        if len(args) == 2 and args[0] == "replicas":
            num_replicas = _parse_replicas(args[1])
            ctl.call(Packets.SetNumReplicas, num_replicas)
            return [], {"ok": True, "replicas": num_replicas}
        if len(args) != 2 or args[0] != "cluster":
            raise CtlError("usage: set cluster STATE | set replicas N")
        try:
            state = ClusterStates[args[1].upper()]
        except KeyError:
            raise CtlError("invalid cluster state: %s" % args[1]) from None
        ctl.call(Packets.SetClusterState, state)
        return [], {"ok": True}
    if cmd == "add":
        if not args:
            raise CtlError("usage: add NID... | add all")
        if args == ["all"]:
            nids = [n[2] for n in ctl.nodes(NodeTypes.STORAGE) if n[3] is NodeStates.PENDING]
        else:
            nids = [_parse_nid(a) for a in args]
        if not nids:
            return ["No node added"], {"added": []}
        # the master says which it added (NEO's words, from either master)
        (message,) = ctl.call(Packets.AddPendingNodes, nids)
        message = message or "Nodes added: %s" % ", ".join(nid_str(n) for n in nids)
        added = message[len("Nodes added: "):].split(", ") \
            if message.startswith("Nodes added: ") else []
        return [message], {"added": added}
    if cmd in ("kill", "drop"):
        if len(args) != 1:
            raise CtlError("usage: %s NID" % cmd)
        nid = _parse_nid(args[0])
        state = NodeStates.DOWN if cmd == "kill" else NodeStates.UNKNOWN
        ctl.call(Packets.SetNodeState, nid, state)
        return [], {"ok": True}
    if cmd == "truncate":
        if len(args) != 1:
            raise CtlError("usage: truncate TID")
        tid = _parse_tid(args[0])
        ctl.call(Packets.Truncate, p64(tid))
        return [], {"ok": True, "truncate_tid": tid}
    if cmd == "recover_pt":
        return older.recover(ctl, args)
    if cmd == "tweak":
        return _tweak(ctl, args)
    if cmd == "check":
        partitions, min_tid, max_tid = status.parse_check_args(
            args, _parse_nid, _parse_tid, _parse_offset,
            lambda: ctl.partition_table().num_partitions)
        return status.run_check(ctl, partitions, p64(min_tid or 0),
                                None if max_tid is None else p64(max_tid), progress)
    if cmd == "prune_orphan":
        return _prune_orphan(ctl, args)
    if cmd == "flush_log":
        if args:
            raise CtlError("usage: flush_log")
        ctl.conn.notify(Packets.FlushLog)
        ctl.call(Packets.AskClusterState)  # once answered, the admin has it
        return [], {"ok": True}
    raise CtlError("invalid command: %s" % cmd)


def _prune_orphan(ctl: NeoCtl, args: list[str]) -> tuple[list[str], object]:
    """NEO's ``prune_orphan DRY_RUN NID...|all``."""
    if len(args) < 2 or args[0] not in ("0", "1"):
        raise CtlError("usage: prune_orphan 0|1 NID... | prune_orphan 0|1 all"
                       " (1: dry run, the storages only log)")
    dry_run = args[0] == "1"
    if args[1:] == ["all"]:
        nids = [n[2] for n in ctl.nodes(NodeTypes.STORAGE) if n[3] is NodeStates.RUNNING]
    else:
        nids = [_parse_nid(a) for a in args[1:]]
    ctl.call(Packets.Repair, nids, dry_run)
    return [], {"ok": True, "dry_run": dry_run, "storages": [nid_str(n) for n in nids]}


def _summary(ctl: NeoCtl) -> tuple[list[str], object]:
    """NEO's ``print summary``: a commented JSON of which clusters have a
    warning or a problem (null: this one), then the admin's summary."""
    warning, problem, summary = ctl.call(Packets.AskMonitorInformation)
    severity = {k: [None if v is None else v.decode("utf-8", "replace") for v in value]
                for k, value in (("warning", warning), ("problem", problem)) if value}
    text = summary.decode("utf-8", "replace") if isinstance(summary, bytes) else summary
    return ["# %s" % json.dumps(severity)] + text.splitlines(), {**severity, "summary": text}


CELL_NAMES = {0: "OUT_OF_DATE", 1: "UP_TO_DATE", 2: "FEEDING", 3: "CORRUPTED", 4: "DISCARDED"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        self.exit(2, "%s: error: %s\n" % (self.prog, message))


class _Parsed(Exception):
    """The command reached its first request: its words are well-formed."""


class _Validator:
    """Stands for NeoCtl while the whole command is checked before
    connecting: any use of the connection ends the check."""

    def __getattr__(self, name: str):
        raise _Parsed


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("invalid timeout %r: expected seconds" % text) from None
    if not (0 < value < 1e9):  # also refuses nan and inf
        raise argparse.ArgumentTypeError("invalid timeout %r: expected seconds > 0" % text)
    return value


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="neoctl", description="Operate a neozodb cluster through its admin node.",
                     epilog=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-a", "--address", default="127.0.0.1:9999",
                        help="admin node address (default 127.0.0.1:9999)")
    parser.add_argument("-c", "--cluster", metavar="NAME",
                        help="cluster name, to identify with (a neozodb admin requires it unless"
                        " started with --allow-anonymous-ctl; leave it out with NEO's admin)")
    for flag, what in (("--ca", "the cluster's CA certificate"),
                       ("--cert", "neoctl's certificate, signed by the CA"),
                       ("--key", "neoctl's private key")):
        parser.add_argument(flag, metavar="PEM", help="TLS: %s (PEM file; --ca, --cert and"
                            " --key go together)" % what)
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("-n", "--dry-run", action="store_true",
                        help="with tweak: print the table it would make, change nothing")
    parser.add_argument("--timeout", type=_timeout, default=30.0, help=argparse.SUPPRESS)
    # Options are accepted anywhere (`print pt --json`) and unknown ones are
    # errors: a word starting with "-" is never silently part of the command
    # (except negative numbers, which argparse leaves positional).  Use "--"
    # to pass such a word as part of the command.
    parser.add_argument("command", nargs="*", metavar="COMMAND",
                        help="command and its parameters (see below)")
    opts = parser.parse_intermixed_args(argv)
    if not opts.command:
        parser.print_help()
        return 0
    if opts.dry_run:
        if opts.command[0] != "tweak":
            parser.error("-n/--dry-run is only valid with tweak")
        opts.command.insert(1, "-n")
    try:
        address = parse_address(opts.address, default_port=9999)
    except ValueError as e:
        parser.error(str(e))
    # The whole command is checked before connecting: a mistake never
    # reaches the cluster half-done (same message and status as before:
    # scripts rely on them).
    try:
        run_command(_Validator(), opts.command)
    except _Parsed:
        pass
    except CtlError as e:
        print(e, file=sys.stderr)
        return 1
    tls = None
    if opts.ca or opts.cert or opts.key:
        try:
            tls = load_contexts(opts.ca, opts.cert, opts.key)[1]
        except TLSConfigError as e:
            parser.error(f"TLS: {e}")
    ctl = NeoCtl(address, opts.timeout, opts.cluster, tls)
    try:
        ctl.connect()
        lines, value = run_command(ctl, opts.command,
                                   lambda line: print(line, file=sys.stderr, flush=True))
    except CtlError as e:
        print(e, file=sys.stderr)
        return 1
    except Exception as e:  # one line, never a traceback, whatever went wrong
        print("neoctl: %s: %s" % (type(e).__name__, e), file=sys.stderr)
        return 1
    finally:
        ctl.close()
    if opts.json:
        print(json.dumps(value, indent=1))
    else:
        for line in lines:
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
