"""neomigrate: copy a database between a FileStorage and a neozodb cluster.

    neomigrate -c CLUSTER SOURCE DESTINATION

SOURCE and DESTINATION are each a FileStorage (a path: an existing file,
or a name containing ``/`` or ending in ``.fs``) or a cluster (its master
addresses, comma or space separated, as ``-m`` of the nodes).  Every
transaction of the source is copied with ZODB's copyTransactionsFrom
semantics: same TIDs, user, description and extension bytes, every record
restored as is (``restore``: deletions, undone creations and undo
back-pointers included), in TID order.  Into a cluster whose partitions
are all on the same storages, up to ``--batch`` transactions go in one
commit (client/bulk.py); elsewhere, one transaction at a time.

The destination must be empty, or its last TID older than the source's
first one; ``--incremental`` instead copies only what follows the
destination's last TID (which must be a transaction of the source), e.g.
to finish an interrupted copy.  A cluster source is copied as of its last
TID when the copy starts; it is opened read-only.

Blobs: ``--blob-dir DIR`` is the FileStorage's blob directory (``bushy``
or ``lawn`` layout, found from the directory; a new one is ``bushy``).
The contents of the blob records are copied with them; the cluster side
uses a temporary blob cache, removed at the end.

Exit status: 0 copied, 1 copy failed or refused, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

from ZODB.utils import p64, u64, z64

from neozodb.cli.config import format_address, parse_masters
from neozodb.client.bulk import BATCH_TRANSACTIONS
from neozodb.net.tls import TLSConfigError, load_contexts
from neozodb.tid import format_tid_time

PROG = "neomigrate"


class UsageError(Exception):
    """A bad argument: one line, exit status 2."""


class MigrateError(Exception):
    """The copy cannot be done or failed: one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        self.exit(2, "%s: error: %s\n" % (self.prog, message))


# -- the two ends -----------------------------------------------------------------------------

class End:
    """SOURCE or DESTINATION: a FileStorage path or a cluster's masters."""

    def __init__(self, role: str, text: str) -> None:
        self.role = role
        self.text = text
        self.path: str | None = None
        self.masters: list[tuple[str, int]] | None = None
        if os.path.exists(text):
            if os.path.isdir(text):
                raise UsageError("%s %r is a directory, not a FileStorage" % (role, text))
            self.path = text
            return
        try:
            masters = parse_masters(text)
        except ValueError as e:
            if "/" in text or text.endswith(".fs"):
                self.path = text
                if role == "source":
                    raise UsageError("source %r: no such FileStorage" % text) from None
                parent = os.path.dirname(os.path.abspath(text))
                if not os.path.isdir(parent):
                    raise UsageError("destination %r: no directory %r" % (text, parent)) from None
                return
            raise UsageError("%s %r is neither a file nor a master address list (%s)"
                             % (role, text, e)) from None
        if not masters:
            raise UsageError("%s is empty" % role)
        self.masters = masters

    @property
    def is_cluster(self) -> bool:
        return self.masters is not None

    def __str__(self) -> str:
        if self.path is not None:
            return self.path
        return ",".join(format_address(a) for a in self.masters)

    def open(self, cluster: str | None, connect_timeout: float, tls: dict | None = None,
             blob_dir: str | None = None):
        """The storage; ``blob_dir``: a FileStorage's blob directory, or the
        blob cache of a cluster's client."""
        read_only = self.role == "source"
        if self.path is not None:
            from ZODB.FileStorage import FileStorage
            try:
                return FileStorage(self.path, read_only=read_only,
                                   create=not read_only and not os.path.exists(self.path),
                                   blob_dir=blob_dir)
            except Exception as e:
                raise MigrateError("cannot open %s FileStorage %s: %s" % (
                    self.role, self.path, e)) from None
        from neozodb.client import NEOStorageError, Storage
        try:
            return Storage(self.masters, cluster, read_only=read_only,
                           connect_timeout=connect_timeout, blob_dir=blob_dir, **(tls or {}))
        except (NEOStorageError, OSError, ValueError) as e:
            raise MigrateError("cannot connect to %s cluster %r at %s: %s" % (
                self.role, cluster, self, e)) from None


# -- progress ---------------------------------------------------------------------------------

def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    return "%d:%02d:%02d" % (seconds // 3600, seconds // 60 % 60, seconds % 60)


class Progress:
    """A progress bar on stderr: the position of the TID being copied
    between the source's first and last TIDs, transactions and objects
    copied and their rates, the time left at that pace.  Redrawn in place
    on a terminal (10 times a second at most), one line every ``every``
    seconds otherwise."""

    WIDTH = 24

    def __init__(self, first: int, last: int, stream=None, enabled: bool = True,
                 every: float = 5.0) -> None:
        self.first = first
        self.span = max(last - first, 1)
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.interval = 0.1 if self.tty else every
        self.start = time.monotonic()
        self.shown = self.start
        self.transactions = 0
        self.objects = 0
        self.tid = first

    def update(self, tid: int, objects: int) -> None:
        self.transactions += 1
        self.objects += objects
        self.tid = tid
        now = time.monotonic()
        if self.enabled and now - self.shown >= self.interval:
            self.shown = now
            self._show(now)

    def line(self, now: float | None = None) -> str:
        elapsed = max((time.monotonic() if now is None else now) - self.start, 1e-6)
        fraction = min(max((self.tid - self.first) / self.span, 0.0), 1.0)
        done = int(fraction * self.WIDTH)
        bar = "#" * done + "." * (self.WIDTH - done)
        eta = "--:--:--"
        if fraction > 0:
            eta = _duration(elapsed * (1 - fraction) / fraction)
        return "[%s] %5.1f%% %d txn %d obj | %.0f txn/s %.0f obj/s | at %s | ETA %s" % (
            bar, 100 * fraction, self.transactions, self.objects,
            self.transactions / elapsed, self.objects / elapsed,
            format_tid_time(self.tid)[:19], eta)

    def _show(self, now: float) -> None:
        if self.tty:
            self.stream.write("\r" + self.line(now) + "\x1b[K")
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty and self.transactions:
            self._show(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()


# -- the copy ---------------------------------------------------------------------------------

def copy(source, destination, start: bytes | None = None,
         progress: Progress | None = None, batch: int | None = None
         ) -> tuple[int, int, bytes | None]:
    """Copy the transactions of ``source`` from ``start`` (all if None)
    into ``destination`` (client/copying.py: into a cluster, each finish
    overlaps the copy of the next transaction).  Returns (transactions,
    objects, last TID copied)."""
    from neozodb.client.copying import copy as copy_transactions

    def warn(message: str) -> None:
        print("%s: %s" % (PROG, message), file=sys.stderr)

    done = None if progress is None else (lambda tid, records: progress.update(u64(tid), records))
    result = copy_transactions(source, destination, start, done, warn, batch=batch)
    return result.transactions, result.objects, result.last


def _first_transaction(storage, start: bytes | None = None):
    """The source's first transaction (from start), and the iterator it
    came from (so that nothing is read twice)."""
    iterator = storage.iterator(start)
    for txn in iterator:
        return txn, iterator
    return None, iterator


def run(opts) -> str:
    """The copy; returns the summary line.  Raises UsageError/MigrateError."""
    source_end = End("source", opts.source)
    dest_end = End("destination", opts.destination)
    if (source_end.is_cluster or dest_end.is_cluster) and not opts.cluster:
        raise UsageError("-c/--cluster is required to connect to a cluster")
    if source_end.path is not None and dest_end.path is not None and \
            os.path.abspath(source_end.path) == os.path.abspath(dest_end.path):
        raise UsageError("source and destination are the same file")
    tls = {k: getattr(opts, k) for k in ("ca", "cert", "key") if getattr(opts, k, None)}
    blob_dir = getattr(opts, "blob_dir", None)
    if blob_dir is not None:
        if source_end.path is not None and dest_end.path is not None:
            raise UsageError("--blob-dir: only between a FileStorage and a cluster")
        if source_end.path is not None and not os.path.isdir(blob_dir):
            raise UsageError("--blob-dir %r: no such directory" % blob_dir)
    with tempfile.TemporaryDirectory(prefix="neomigrate-blobs-") as cache:
        def blobs(end):
            if blob_dir is None:
                return None
            return blob_dir if end.path is not None else os.path.join(cache, end.role)
        source = source_end.open(opts.cluster, opts.connect_timeout, tls, blobs(source_end))
        try:
            destination = dest_end.open(opts.cluster, opts.connect_timeout, tls,
                                        blobs(dest_end))
            try:
                return _migrate(opts, source, destination, source_end, dest_end)
            finally:
                destination.close()
        finally:
            source.close()


def _migrate(opts, source, destination, source_end, dest_end) -> str:
    dest_last = destination.lastTransaction()
    source_last = source.lastTransaction()
    start = None
    if opts.incremental and dest_last != z64:
        txn, iterator = _first_transaction(source, dest_last)
        if txn is None or txn.tid != dest_last:
            _close(iterator)
            raise MigrateError(
                "--incremental: the destination's last transaction %s (%s) is not a"
                " transaction of the source" % (dest_last.hex(), format_tid_time(u64(dest_last))))
        _close(iterator)
        start = p64(u64(dest_last) + 1)
    first, iterator = _first_transaction(source, start)
    if first is None:
        _close(iterator)
        if start is not None:
            return "nothing to copy: the destination has every transaction of the source"
        return "nothing to copy: the source is empty"
    if start is None and dest_last != z64 and dest_last >= first.tid:
        _close(iterator)
        raise MigrateError(
            "the destination is not empty: its last transaction %s (%s) is not older than"
            " the source's first %s (%s); copy into an empty destination, or use"
            " --incremental to add what follows" % (
                dest_last.hex(), format_tid_time(u64(dest_last)),
                first.tid.hex(), format_tid_time(u64(first.tid))))
    _close(iterator)  # iterators may hold a snapshot or a file: copy() opens its own
    progress = Progress(u64(first.tid), u64(source_last), enabled=not opts.quiet)
    began = time.monotonic()
    try:
        transactions, objects, last = copy(source, destination, start or first.tid, progress,
                                           opts.batch)
    except KeyboardInterrupt:
        progress.finish()
        raise MigrateError("interrupted after %d transactions (last copied: %s); run again"
                           " with --incremental to go on" % (
                               progress.transactions,
                               p64(progress.tid).hex() if progress.transactions else "none")
                           ) from None
    except Exception as e:
        progress.finish()
        raise MigrateError("copy failed after %d transactions: %s: %s" % (
            progress.transactions, type(e).__name__, e)) from None
    progress.finish()
    elapsed = max(time.monotonic() - began, 1e-6)
    return ("copied %d transactions, %d objects from %s to %s in %.2f s"
            " (%.0f txn/s, %.0f obj/s), last TID %s (%s)" % (
                transactions, objects, source_end, dest_end, elapsed,
                transactions / elapsed, objects / elapsed,
                last.hex(), format_tid_time(u64(last))))


def _close(iterator) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("-c", "--cluster", help="name of the cluster (source or destination)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--incremental", action="store_true",
                        help="copy only what follows the destination's last transaction")
    parser.add_argument("--connect-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="how long to wait for a cluster to run (60)")
    for flag, what in (("--ca", "the cluster's CA certificate"),
                       ("--cert", "this tool's certificate, signed by the CA"),
                       ("--key", "this tool's private key")):
        parser.add_argument(flag, metavar="PEM", help="TLS with the cluster: %s (PEM file;"
                            " --ca, --cert and --key go together)" % what)
    parser.add_argument("--batch", type=int, default=None, metavar="N",
                        help="into a cluster, up to N transactions per commit where every"
                        " partition is on the same storages (%d; 0: one at a time)"
                        % BATCH_TRANSACTIONS)
    parser.add_argument("--blob-dir", metavar="DIR",
                        help="the FileStorage's blob directory: blobs are copied too")
    parser.add_argument("source", help="FileStorage path or master addresses")
    parser.add_argument("destination", help="FileStorage path or master addresses")
    opts = parser.parse_args(argv)
    if opts.batch is not None and opts.batch < 0:
        parser.error("--batch must be 0 or more")
    if opts.ca or opts.cert or opts.key:
        try:
            load_contexts(opts.ca, opts.cert, opts.key)
        except TLSConfigError as e:
            parser.error(f"TLS: {e}")
    logging.basicConfig(level=logging.ERROR, format="%(name)s: %(message)s")
    try:
        summary = run(opts)
    except UsageError as e:
        print("%s: error: %s" % (PROG, e), file=sys.stderr)
        return 2
    except MigrateError as e:
        print("%s: error: %s" % (PROG, e), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("%s: error: interrupted before copying anything" % PROG, file=sys.stderr)
        return 1
    print("%s: %s" % (PROG, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
