"""neosimple: a throw-away local cluster (masters, storages, one admin)
in one directory, in the foreground until Ctrl-C."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from neozodb.cli.cluster import LocalCluster
from neozodb.cli.config import format_address


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        self.exit(2, "%s: error: %s\n" % (self.prog, message))


def _positive(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="neosimple", description=__doc__)
    parser.add_argument("--masters", type=_positive, default=1, help="number of masters (1)")
    parser.add_argument("--storages", type=_positive, default=2, help="number of storages (2)")
    parser.add_argument("--replicas", type=_positive, default=1, help="replicas (1)")
    parser.add_argument("--partitions", type=_positive, default=12, help="partitions (12)")
    parser.add_argument("-c", "--cluster", default="neozodb", help="cluster name")
    parser.add_argument("--master-port", type=_positive, default=0, help="master port (any)")
    parser.add_argument("--admin-port", type=_positive, default=0, help="admin port (any)")
    parser.add_argument("--tls", action="store_true",
                        help="TLS between every node, with a throw-away CA and certificates made"
                        " in DIRECTORY/tls (needs the 'cryptography' package)")
    parser.add_argument("--adapter", default="SQLite",
                        help="storage backend (SQLite); a database server's adapter starts a"
                        " throw-away server of its own in DIRECTORY/server")
    parser.add_argument("directory", help="where databases and logs go")
    opts = parser.parse_args(argv)
    if opts.masters < 1:
        parser.error("at least one master is needed")
    if opts.storages < 1 or opts.partitions < 1:
        parser.error("at least one storage and one partition are needed")
    if opts.tls:
        try:
            import cryptography  # noqa: F401
        except ImportError:
            parser.error("--tls needs the 'cryptography' package (pip install 'neozodb[tls]')")
    server = None
    databases = None
    if opts.adapter.lower() != "sqlite":
        from neozodb import throwaway
        if opts.adapter.lower() not in throwaway.servers():
            parser.error("--adapter: one of %s" % ", ".join(["SQLite", *throwaway.servers()]))
        try:
            server = throwaway.start(opts.adapter, os.path.join(opts.directory, "server"))
        except (OSError, RuntimeError) as e:
            print("neosimple: error: cannot start a %s server: %s" % (opts.adapter, e),
                  file=sys.stderr)
            return 1
        databases = lambda i: server.database("storage%d" % i)  # noqa: E731
    cluster = LocalCluster(opts.directory, opts.cluster, opts.storages, opts.replicas,
                           opts.partitions, master_port=opts.master_port,
                           admin_port=opts.admin_port, masters=opts.masters, tls=opts.tls,
                           adapter=opts.adapter, databases=databases)
    try:
        return _serve(opts, cluster)
    finally:
        if server is not None:
            server.stop()


def _serve(opts: argparse.Namespace, cluster: LocalCluster) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        cluster.start()
    except RuntimeError as e:
        print("neosimple: error: %s" % e, file=sys.stderr)
        cluster.kill()
        return 1
    print("cluster %r running: %d master(s), %d storage(s), replicas %d, %d partitions" % (
        opts.cluster, opts.masters, opts.storages, opts.replicas, opts.partitions))
    print("connect with: %s" % cluster.uri)
    print("neoctl -c %s -a %s %sprint pt" % (cluster.name, format_address(cluster.admin_address),
                                            "".join(w + " " for w in cluster.tls_args("neoctl"))))
    print("logs and databases in %s; Ctrl-C stops the cluster" % cluster.directory, flush=True)
    while not stop.wait(1.0):
        dead = [n.name for n in cluster.nodes.values() if not n.running]
        if dead:
            print("neosimple: node(s) %s exited; stopping" % ", ".join(dead), file=sys.stderr)
            break
    print("stopping...", flush=True)
    cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
