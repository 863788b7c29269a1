"""Live import: the background copy of an Importer backend's source, and
the optional writeback of new transactions to it.

The copy is a task of the node's event loop that alternates with client
requests: each step reads up to ``SLICE_RECORDS`` records (or what it can
read in ``SLICE_SECONDS``) of the source in TID order
(``ImporterBackend.read_source``: complete transactions, records
compressed and hashed), copies the contents of their blob revisions from
the source's blob-dir a chunk (1 MiB) at a time, yielding to the loop
between chunks once the step took ``SLICE_SECONDS`` (``import_blobs``;
nothing holds a whole blob), writes the records to the database
(``import_transactions``, attaching each content to its data row in
the same database transaction as the resume point), then yields to the
loop, so that a client request waits at most one step (a few milliseconds); while
requests come, it also pauses after each step as long as the step took,
leaving at least half of the node's time to them.  The
rows are committed within a second (``StorageApp.pending_written``), and a
restart goes on after the last transaction imported.  Reading in a thread
was tried and dropped: with the GIL, a thread iterating the source made
every SQLite call and socket operation of the loop wait for it, adding tens
of milliseconds to client requests.  A damaged source stops the import
after the last complete transaction before the damage; the node goes on
serving.

Writeback (``writeback = true``): after each commit, transactions
committed after the source's last one are copied to it in TID order, with
their TIDs (``tpc_begin(tid)`` + ``restore``, as ``copyTransactionsFrom``
does), in a thread (FileStorage's writes and fsyncs would block the loop).

Progress goes to the log and to the master (``NotifyMonitorInformation``
``{b"import": JSON}``, at most once a second), which shows it to
``neoctl print import``.

Only the Importer backend needs ZODB: this module imports it lazily
(``neoctl`` uses ``format_status``).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from neozodb.protocol import Packets, nid_str
from neozodb.tid import time_from_tid as _tid_time

if TYPE_CHECKING:
    from neozodb.storage.app import StorageApp

log = logging.getLogger("neozodb.storage")

#: Records read and written between two turns of the event loop, at most,
#: and the time spent reading them (about as much is spent writing).
SLICE_RECORDS = 100
SLICE_SECONDS = 0.001
#: While the node served a request in the last BUSY_SECONDS, the copy takes
#: at most half of the time (it pauses as long as each step took).
BUSY_SECONDS = 0.1
#: Transactions written back to the source per round.
WRITEBACK_BATCH = 100
#: Seconds between two progress reports to the master (and log lines).
REPORT_INTERVAL = 1.0
LOG_INTERVAL = 10.0


class Importer:
    """The import and writeback tasks of a storage node whose backend is
    an ``ImporterBackend``."""

    def __init__(self, app: StorageApp) -> None:
        self.app = app
        self.backend = backend = app.backend
        self.state = "importing" if backend.importing else "finished"
        self.error: str | None = None
        self.fraction: float | None = None    # of the source read (bytes), last chunk
        self.started = 0.0
        self.transactions = 0                 # imported by this run
        self.objects = 0
        self.seconds = 0.0                    # spent importing by this run
        self.blobs = 0                        # blob contents copied by this run
        self.blobs_bytes = 0
        self.writeback_tid: int | None = None
        self.writeback_count = 0
        self.writeback_error: str | None = None
        self._task: asyncio.Task | None = None
        self._writeback_task: asyncio.Task | None = None
        self._writeback_wake = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._report_timer: asyncio.TimerHandle | None = None
        self._reported = 0.0
        self._logged = 0.0
        self._pt_warned: int | None = None
        backend.on_commit = self._writeback_wake.set

    # -- lifecycle --------------------------------------------------------------------------------
    def refusal(self) -> str | None:
        """Why this node cannot run with the cluster's partition table (a
        single storage, no replicas, while importing), or None."""
        app = self.app
        pt = app.pt
        if not self.backend.importing or pt is None:
            return None
        others = sorted(nid_str(n) for n in pt.nids() if n != app.nid)
        if pt.num_replicas or others:
            return ("Importer: a storage importing a ZODB must be the only storage of its"
                    " cluster, with 0 replicas (the table has %d replicas%s): start the"
                    " master with -r 0 and this storage alone, add storages once the"
                    " import is finished" % (pt.num_replicas, " and storages %s" % " ".join(
                        others) if others else ""))
        return None

    def check_pt(self) -> None:
        """The partition table changed while importing: say it is wrong."""
        why = self.refusal()
        pt = self.app.pt
        if why is not None and self._pt_warned != pt.ptid:
            self._pt_warned = pt.ptid
            log.error("%s: %s; meanwhile this storage is no replication source", self.app.label,
                      why)

    def start(self) -> None:
        """Operation starts: go on importing, and writing back."""
        backend = self.backend
        if backend.importing and self.error is None and self._task is None:
            self.state = "importing"
            self.started = time.monotonic()
            if backend.import_tid:
                log.info("%s: import from %s: resuming after %#x (%d transactions imported),"
                         " up to %#x", self.app.label, backend.source.getName(),
                         backend.import_tid, backend.import_count, backend.source_tid)
            else:
                log.info("%s: import from %s: starting, up to %#x", self.app.label,
                         backend.source.getName(), backend.source_tid)
            self._task = asyncio.ensure_future(self._import())
        elif not backend.importing and self.state != "finished":
            self.state = "finished"
        if self.state == "finished":
            self._finished_message(logging.INFO)
        if backend.writeback and self._writeback_task is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="writeback")
            self._writeback_task = asyncio.ensure_future(self._writeback())
        self.report(now=True)

    def stop(self) -> None:
        """Operation stops (or the node exits): stop the tasks and threads."""
        for task in (self._task, self._writeback_task):
            if task is not None:
                task.cancel()
        self._task = self._writeback_task = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._report_timer is not None:
            self._report_timer.cancel()
            self._report_timer = None
        if self.started and self.state == "importing":
            self.seconds += time.monotonic() - self.started
            self.started = 0.0

    # -- the copy ------------------------------------------------------------------------------------
    async def _import(self) -> None:
        from neozodb.storage.backends.importer import SourceDamaged
        app, backend = self.app, self.backend
        reader = backend.read_source()
        error = None
        try:
            while True:
                piece: list = []
                records = 0
                done = None
                started = time.perf_counter()
                deadline = started + SLICE_SECONDS
                try:
                    while records < SLICE_RECORDS:
                        txn, done = next(reader)
                        piece.append(txn)
                        records += len(txn[4])
                        if time.perf_counter() > deadline:
                            break  # the writes take about as long again
                except StopIteration:
                    reader = None
                except SourceDamaged as e:
                    reader, error = None, str(e)
                except Exception as e:  # the source failing: stop cleanly too
                    log.exception("%s: import: error reading the source", app.label)
                    reader, error = None, "%s: %s" % (type(e).__name__, e)
                try:
                    copied = await self._copy_blobs(piece, started)
                except SourceDamaged as e:
                    reader, error = None, str(e)
                    copied = backend.copied(piece)
                    backend.drop_import_blobs(piece[len(copied):])
                    log.error("%s: import: %s", app.label, e)
                except Exception:
                    # the database failed: its state is unknown (see Backend)
                    log.exception("%s: import: cannot write blob contents to the database",
                                  app.label)
                    app.exit(1)
                    return
                piece = copied
                try:
                    backend.import_transactions(piece)
                except Exception:
                    # the database failed: its state is unknown (see Backend)
                    log.exception("%s: import: cannot write to the database", app.label)
                    app.exit(1)
                    return
                self.transactions += len(piece)
                self.objects += records
                if done is not None:
                    self.fraction = done
                if reader is None:
                    break
                app.pending_written()
                self.report()
                await self._pause(started)
                now = time.monotonic()
                if now - self._logged >= LOG_INTERVAL:
                    self._logged = now
                    log.info("%s: %s", app.label, self.progress_line())
        finally:
            if reader is not None:
                reader.close()
        backend.commit_pending()
        self.seconds += time.monotonic() - self.started
        self.started = 0.0
        self._task = None
        if error is None:
            self.state = "finished"
            self._finished_message(logging.WARNING)
        else:
            self.state = "failed"
            self.error = error
            log.error("%s: import stopped: %s; imported up to %#x (committed); the cluster"
                      " keeps serving, what is not imported from the source; repair the"
                      " source and restart this storage to go on",
                      app.label, error, backend.import_tid)
        self.report(now=True)

    async def _copy_blobs(self, piece: list, started: float) -> list:
        """Copy the blob contents of ``piece`` into the database, letting
        requests run between chunks once the step took ``SLICE_SECONDS``
        (a chunk of 1 MiB takes a few milliseconds); ``piece``.  Cancelled,
        the copies are deleted (they would be at the next start anyway)."""
        backend = self.backend
        copier = backend.import_blobs(piece)
        try:
            for size in copier:
                self.blobs_bytes += size
                if time.perf_counter() > started + SLICE_SECONDS:
                    await self._pause(started)
                    started = time.perf_counter()
        except asyncio.CancelledError:
            copier.close()
            backend.drop_import_blobs(piece)
            raise
        self.blobs += sum(isinstance(r[5], int) for t in piece for r in t[4])
        return piece

    async def _pause(self, started: float) -> None:
        """Between two steps of the copy: requests first; while they come,
        at least as long as the step took; and the rate cap."""
        now = time.monotonic()
        pause = 0.0
        rate = self.backend.config.rate
        if rate:
            # the rate cap: transactions per second since this run started
            pause = self.transactions / rate - (now - self.started)
        if now - self.app.last_request < BUSY_SECONDS:
            # requests are coming: leave them at least as much time
            pause = max(pause, time.perf_counter() - started)
        await asyncio.sleep(max(pause, 0))  # requests first

    def _finished_message(self, level: int) -> None:
        backend = self.backend
        log.log(level, "%s: import finished: all %d transactions of %s up to %#x are imported;"
                " switch the storage to the native backend: stop it and run it with"
                " %s%s", self.app.label, backend.import_count,
                backend.source.getName(), backend.source_tid, backend.native_options(),
                " (writeback to the source stops then)" if backend.writeback else "")

    # -- writeback ----------------------------------------------------------------------------------
    async def _writeback(self) -> None:
        app, backend = self.app, self.backend
        loop = asyncio.get_running_loop()
        source = backend.source
        from ZODB.utils import u64
        last = u64(await loop.run_in_executor(self._executor, source.lastTransaction))
        self.writeback_tid = last
        backoff = 1.0
        while True:
            self._writeback_wake.clear()
            txns = backend.new_transactions(last, WRITEBACK_BATCH)
            if not txns:
                await self._writeback_wake.wait()
                continue
            try:
                await loop.run_in_executor(self._executor, _write_back, source, txns)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.writeback_error = "%s: %s" % (type(e).__name__, e)
                log.error("%s: writeback of %#x to the source failed: %s (retrying in %g s)",
                          app.label, txns[0][0], self.writeback_error, backoff)
                self.report(now=True)
                await asyncio.sleep(backoff)  # retry backoff, not synchronisation
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 1.0
            self.writeback_error = None
            last = self.writeback_tid = txns[-1][0]
            self.writeback_count += len(txns)
            log.debug("%s: %d transactions written back, up to %#x", app.label, len(txns), last)
            self.report()

    # -- progress ------------------------------------------------------------------------------------
    def status(self) -> dict:
        backend = self.backend
        seconds = self.seconds + (time.monotonic() - self.started if self.started else 0.0)
        progress = 100.0 if self.state == "finished" else self._percent()
        status = {
            "state": self.state,
            "source": backend.source.getName(),
            "first_tid": backend.source_first_tid,
            "last_tid": backend.source_tid,
            "imported_tid": backend.import_tid,
            "imported": backend.import_count,
            "progress": None if progress is None else round(progress, 1),
            "transactions": self.transactions,
            "objects": self.objects,
            "seconds": round(seconds, 3),
            "transactions_per_second": round(self.transactions / seconds) if seconds else None,
            "objects_per_second": round(self.objects / seconds) if seconds else None,
            "blobs": self.blobs,
            "blob_bytes": self.blobs_bytes,
            "error": self.error,
            "database": backend.database,
            "writeback": None,
        }
        if backend.writeback:
            status["writeback"] = {"tid": self.writeback_tid, "transactions": self.writeback_count,
                                   "error": self.writeback_error}
        return status

    def _percent(self) -> float | None:
        if self.fraction is not None:
            return 100 * self.fraction
        backend = self.backend
        first = backend.source_first_tid
        if first is None or backend.source_tid <= first:
            return None
        if not backend.import_tid:
            return 0.0
        span = _tid_time(backend.source_tid) - _tid_time(first)
        return max(0.0, min(100.0, 100 * (_tid_time(backend.import_tid) - _tid_time(first))
                            / span)) if span > 0 else None

    def progress_line(self) -> str:
        return format_status(self.status())

    def report(self, now: bool = False) -> None:
        """Tell the master (at most once a second, unless ``now``)."""
        delay = self._reported + REPORT_INTERVAL - time.monotonic()
        if not now and delay > 0:
            if self._report_timer is None:
                self._report_timer = asyncio.get_event_loop().call_later(delay, self._send)
            return
        self._send()

    def _send(self) -> None:
        if self._report_timer is not None:
            self._report_timer.cancel()
            self._report_timer = None
        self._reported = time.monotonic()
        conn = self.app.master_conn
        # NEO's master does not expect this from a storage: it would close
        if conn is not None and not conn.closed and b"import-status" in conn.peer_features:
            conn.notify(Packets.NotifyMonitorInformation,
                        {b"import": json.dumps(self.status()).encode()})


def _write_back(source, txns) -> None:
    """Copy transactions to the source with their TIDs (writeback thread)."""
    from ZODB.Connection import TransactionMetaData
    from ZODB.utils import p64
    for tid, user, description, ext, records in txns:
        txn = TransactionMetaData(user, description, ext)
        source.tpc_begin(txn, p64(tid), " ")
        try:
            for oid, data, data_txn in records:
                source.restore(p64(oid), p64(tid), data, "",
                               None if data_txn is None else p64(data_txn), txn)
            source.tpc_vote(txn)
            source.tpc_finish(txn)
        except BaseException:
            source.tpc_abort(txn)
            raise


def format_status(status: dict) -> str:
    """One line about an import's status (logs, ``neoctl print import``)."""
    state = status["state"]
    source = status["source"]
    rates = ""
    if status.get("transactions_per_second") is not None and status["transactions"]:
        rates = " (%d transactions, %d objects in %.1f s: %d transactions/s, %d objects/s)" % (
            status["transactions"], status["objects"], status["seconds"],
            status["transactions_per_second"], status["objects_per_second"])
    if state == "finished":
        line = ("import from %s finished: %d transactions up to %#x%s; switch to the native"
                " backend: -a SQLite -d %s" % (source, status["imported"], status["last_tid"],
                                                rates, status["database"]))
    elif state == "failed":
        line = "import from %s stopped at %#x: %s" % (source, status["imported_tid"],
                                                      status["error"])
    else:
        progress = status["progress"]
        line = "importing %s: %s, up to %#x of %#x%s" % (
            source, "?" if progress is None else "%.1f%%" % progress,
            status["imported_tid"], status["last_tid"], rates)
    writeback = status.get("writeback")
    if writeback is not None:
        line += "; writeback: %d transactions, source at %s%s" % (
            writeback["transactions"],
            "?" if writeback["tid"] is None else "%#x" % writeback["tid"],
            ", failing: %s" % writeback["error"] if writeback["error"] else "")
    return line
