"""What the benchmark scripts share: stopping cleanly on Ctrl-C or SIGTERM,
the temporary directory, the --json file, the backends (neozodb clusters,
ZEO, FileStorage, RelStorage), client processes started side by side, peak
memory of processes, and a few small helpers.

The scripts import it as ``from common import ...`` (this directory is the
first entry of sys.path when one of them runs).
"""
from __future__ import annotations

import base64
import contextlib
import datetime
import json
import logging
import os
import pickle
import platform
import random
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

INTERRUPTED: list[str] = []  # the signal that stopped the run, if any


def interrupt(signum, frame):
    INTERRUPTED.append(signal.Signals(signum).name)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def interruptible(fn, *args, stopped: str = "every process stopped"):
    """``fn(*args)`` with SIGINT and SIGTERM raising KeyboardInterrupt, so
    that its cleanup runs (see ``temporary_directory``); the previous
    handlers are restored after.  Once a signal came (also when some code
    swallowed the KeyboardInterrupt), says "interrupted by SIG...;
    ``stopped``" on stderr and returns None: the caller then exits with
    status 130 (``if INTERRUPTED: return 130``)."""
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = fn(*args)
    except BaseException:
        if not INTERRUPTED:  # node processes may die of the same Ctrl-C first: not a failure
            raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if INTERRUPTED:
        print("\ninterrupted by %s; %s" % (INTERRUPTED[0], stopped), file=sys.stderr)
        return None
    return result


def say(text: str) -> None:
    print(text, flush=True)


@contextlib.contextmanager
def temporary_directory(name: str, keep: bool = False, say=say,
                        kept: str = "  logs and databases kept in "):
    """``with temporary_directory("pack", opts.keep) as (cleanup, path):``
    a new temporary directory ``path``, removed on the way out unless
    ``keep`` (then ``say(kept + path)`` tells where it is), and the
    ExitStack ``cleanup`` for the callbacks that stop what the run starts.
    The way out (those callbacks, then the removal) runs with SIGINT and
    SIGTERM ignored, so that a second Ctrl-C cannot leave processes
    behind; they stay ignored until ``interruptible`` restores them."""
    with contextlib.ExitStack() as cleanup:
        path = tempfile.mkdtemp(prefix="neozodb-%s-" % name)
        if keep:
            say(kept + path)
        else:
            cleanup.callback(shutil.rmtree, path, ignore_errors=True)
        try:
            yield cleanup, path
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def fill_defaults(opts, full: dict, quick: dict, names=None) -> dict:
    """Give each option of ``names`` (default: every key) left unset (None)
    its value from ``quick`` with --quick, else from ``full``; returns
    that dict."""
    defaults = quick if opts.quick else full
    for name in defaults if names is None else names:
        if getattr(opts, name) is None:
            setattr(opts, name, defaults[name])
    return defaults


def options(opts) -> dict:
    """The command-line options, for ``write_json`` (sets as sorted lists)."""
    return {"options": {k: (sorted(v) if isinstance(v, set) else v)
                        for k, v in vars(opts).items()}}


def write_json(path: str, settings: dict, results, **extra) -> None:
    """Write the date, ``settings`` (what the run was asked), the machine,
    ``results`` and ``extra`` to ``path`` as JSON, and say so."""
    data = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        **settings,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "results": results,
        **extra,
    }
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    print("results written to", path)


def run_and_report(run, opts, report, title: str) -> int:
    """The rest of main() once the options are read, for the scripts that
    check the node logs: say ``title``, ``run(opts, anomalies)`` (see
    ``interruptible``), then print ``report(results)``, the anomalies and
    the total time, and write the --json file; returns the exit status."""
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    say(title)
    anomalies: list[str] = []
    results = interruptible(run, opts, anomalies)
    if INTERRUPTED:
        return 130
    print()
    print(report(results))
    if anomalies:
        print("\nwarnings and errors in the node logs, and checks that failed:")
        for line in anomalies:
            print("  " + line)
    print("\ntotal %.0fs" % (time.perf_counter() - started))
    if opts.json:
        write_json(opts.json, options(opts), results, anomalies=anomalies)
    return 0


def measure_and_report(measure, opts, report, title: str, summary, *,
                       show_peaks: bool = True, **extra) -> int:
    """The rest of main() once the options are read, for the scripts that
    measure backends and the peak memory of their servers: say ``title``,
    ``measure(opts, peaks)`` (see ``interruptible``), then print
    ``report(results)``, the peaks (unless not ``show_peaks``) and the
    total time, and write the --json file with ``summary(results)``, the
    peaks and ``extra``; returns the exit status."""
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    say(title)
    peaks = PeakMemory()
    results = interruptible(measure, opts, peaks,
                            stopped="every process stopped, temporary files removed")
    if INTERRUPTED:
        return 130
    print()
    print(report(results))
    if show_peaks:
        print()
        print(peaks.table("peak RSS (VmHWM) of the servers, MB"))
    print("\ntotal %.0fs" % (time.perf_counter() - started))
    if opts.json:
        write_json(opts.json, options(opts), results, summary=summary(results),
                   peak_rss=peaks.peaks, **extra)
    return 0


def stop_cluster(cluster) -> None:
    """Stop a LocalCluster; safe to call twice, and after a failed start."""
    try:
        cluster.stop(timeout=10)
    finally:
        cluster.kill()  # no-op for nodes that already exited


def count(path: str) -> tuple[int, int]:
    """(transactions, records) of a FileStorage."""
    from ZODB.FileStorage import FileStorage
    fs = FileStorage(path, read_only=True)
    try:
        transactions = records = 0
        for txn in fs.iterator():
            transactions += 1
            records += sum(1 for _ in txn)
        return transactions, records
    finally:
        fs.close()


# -- small helpers --------------------------------------------------------------------------
PAYLOAD = 300  # bytes of state per object (a str in a PersistentMapping)
MB = 1e6


#: what payload() makes: "random" (the default) or "text" (``--payload``)
PAYLOADS = ("random", "text")
payload_kind = "random"
_WORDS = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor"
          " incididunt ut labore et dolore magna aliqua enim ad minim veniam quis nostrud"
          " exercitation ullamco laboris nisi aliquip ex ea commodo consequat").split()


def payload(size: int = PAYLOAD) -> str:
    """``size`` printable characters: base64 of random bytes, which hardly
    compresses (a client storing it compressed would save about 13% at this
    size, which ours does not keep: docs/design.md, "Stores"), or, with
    ``payload_kind = "text"``, random words, which deflate to about half."""
    if payload_kind == "text":
        text = ""
        while len(text) < size:
            text += " ".join(random.choices(_WORDS, k=16)) + " "
        return text[:size]
    return base64.b64encode(os.urandom(size * 3 // 4)).decode()


def new_objects(root, tm, name: str, count: int) -> list:
    """A new OOBTree ``root[name]``, committed, holding ``count`` new
    PersistentMappings of a PAYLOAD string each, not committed yet (the
    commit of new objects that bench.py, cpu.py and bigcommit.py time)."""
    from BTrees.OOBTree import OOBTree
    from persistent.mapping import PersistentMapping
    container = root[name] = OOBTree()
    tm.commit()
    objs = [PersistentMapping({"data": payload()}) for _ in range(count)]
    for i, obj in enumerate(objs):
        container[i] = obj
    return objs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, grace: float = 10) -> None:
    """Terminate ``proc`` if it still runs; kill it if it has not exited
    ``grace`` seconds later."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))  # ceil
    return ordered[int(rank) - 1]


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths, strict=True)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmHWM (peak resident set) and VmRSS of a process, in bytes; {} if it
    is gone."""
    out = {}
    try:
        with open("/proc/%s/status" % pid) as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    out[line[:5]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def vm_hwm(pid: int | str = "self") -> int:
    """Peak resident set size of a process, in bytes (0 if it is gone)."""
    return proc_status(pid).get("VmHWM", 0)


def record_pickle(text: str) -> bytes:
    """A ZODB record of a PersistentMapping {"data": text}, as ZODB writes
    it (class pickle, then state pickle, protocol 3): for raw stores."""
    from persistent.mapping import PersistentMapping
    return (pickle.dumps((PersistentMapping, None), 3)
            + pickle.dumps({"data": {"data": text}}, 3))


# -- backends -------------------------------------------------------------------------------
class Backend:
    """A storage to measure.  ``start`` it once, then ``open_storage`` gives
    a new client object (empty caches) in this process, and ``spec()``
    describes how another process opens one (``open_spec``)."""
    key = ""
    label = ""
    in_process = False  # no server: other processes cannot share it

    def start(self, workdir: str) -> None:
        """Start whatever the backend needs; called once before the rounds."""

    def open_storage(self):
        """A NEW storage client object (empty caches)."""
        return open_spec(self.spec())

    def spec(self) -> dict:
        raise NotImplementedError

    def pids(self) -> dict[str, int]:
        """The server processes, by name (for their memory)."""
        return {}

    def zconfig(self) -> str:
        """A ``<zodb>`` section's storage, for ZConfig (zodbshootout)."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop everything start() started; must be safe to call twice."""


class NeoBackend(Backend):
    def __init__(self, storages: int, replicas: int, partitions: int = 12,
                 tls: bool = False, adapter: str = "SQLite", event_loop: str = "auto") -> None:
        self.storages = storages
        self.replicas = replicas
        self.partitions = partitions
        self.tls = tls
        self.adapter = adapter
        self.event_loop = event_loop  # the nodes' --event-loop
        self.databases = None  # LocalCluster's (a server backend's DSN of storage i)
        loop = "" if event_loop == "auto" else " " + event_loop
        self.key = "neo_%ds_r%d%s%s" % (storages, replicas, "_tls" if tls else "",
                                        loop.replace(" ", "_"))
        self.label = "neo %dS r%d%s%s" % (storages, replicas, " TLS" if tls else "", loop)
        self.cluster = None
        self.client_options: dict = {}  # more Storage() arguments (bench.py --no-server-sync)

    def start(self, workdir: str) -> None:
        from neozodb.cli.cluster import LocalCluster
        self.cluster = LocalCluster(os.path.join(workdir, self.key), name="bench",
                                    storages=self.storages, replicas=self.replicas,
                                    partitions=self.partitions, loglevel="INFO",
                                    tls=self.tls, adapter=self.adapter,
                                    databases=self.databases,
                                    node_args=["--event-loop", self.event_loop])
        try:
            self.cluster.start(wait=60)
        except BaseException:
            self.stop()
            raise

    def spec(self) -> dict:
        return {"kind": "neo", "kwargs": self.cluster.client_kwargs(),
                "options": self.client_options}

    def pids(self) -> dict[str, int]:
        return {name: node.proc.pid for name, node in self.cluster.nodes.items()
                if node.running}

    def zconfig(self) -> str:
        kw = self.cluster.client_kwargs()
        lines = ["%import neozodb", "<NEOStorage>", "  master_nodes %s" % kw["master_nodes"],
                 "  name %s" % kw["name"]]
        lines += ["  %s %s" % (k, kw[k]) for k in ("ca", "cert", "key") if k in kw]
        return "\n".join(lines + ["</NEOStorage>"])

    def stop(self) -> None:
        cluster, self.cluster = self.cluster, None
        if cluster is not None:
            stop_cluster(cluster)


class FileStorageBackend(Backend):
    key = "filestorage"
    label = "FileStorage"
    in_process = True

    def start(self, workdir: str) -> None:
        os.makedirs(os.path.join(workdir, "fs"))
        self.path = os.path.join(workdir, "fs", "Data.fs")

    def spec(self) -> dict:
        return {"kind": "filestorage", "path": self.path}

    def zconfig(self) -> str:
        return "<filestorage>\n  path %s\n</filestorage>" % self.path


class ZEOBackend(Backend):
    key = "zeo"
    label = "ZEO"

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def start(self, workdir: str) -> None:
        self.directory = os.path.join(workdir, "zeo")
        os.makedirs(self.directory)
        self.address = ("127.0.0.1", free_port())
        self.serve()

    def serve(self) -> None:
        """Start the server on the address and file of ``start`` (again,
        after it was killed) and wait until it listens."""
        argv = [sys.executable, "-m", "ZEO.runzeo", *self.server_args()]
        with open(os.path.join(self.directory, "zeo.log"), "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        try:
            self._wait_port(30.0)
        except BaseException:
            self.stop()
            raise

    def server_args(self) -> list[str]:
        """runzeo's arguments (the address and file of ``start``)."""
        return ["-a", "%s:%d" % self.address, "-f", os.path.join(self.directory, "Data.fs")]

    def _wait_port(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("ZEO server exited with status %s" % self.proc.returncode)
            try:
                socket.create_connection(self.address, timeout=1).close()
                return
            except OSError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError("ZEO server did not listen on %s:%d" % self.address) from e
            time.sleep(0.05)  # bounded polling of the port

    def spec(self) -> dict:
        # no `client=` argument: the cache lives in memory, so a new object is cold
        return {"kind": "zeo", "address": list(self.address)}

    def pids(self) -> dict[str, int]:
        return {"ZEO": self.proc.pid} if self.proc is not None and self.proc.poll() is None \
            else {}

    def zconfig(self) -> str:
        return "<zeoclient>\n  server %s:%d\n</zeoclient>" % self.address

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc)


class RelStorageBackend(Backend):
    key = "relstorage"
    label = "RelStorage/SQLite"
    in_process = True  # no server process, but several processes may share the file

    def start(self, workdir: str) -> None:
        self.directory = os.path.join(workdir, "relstorage")
        os.makedirs(self.directory)

    def spec(self) -> dict:
        return {"kind": "zconfig", "text": "%import relstorage\n" + self.zconfig()}

    def zconfig(self) -> str:
        return "<relstorage>\n  <sqlite3>\n    data-dir %s\n  </sqlite3>\n</relstorage>" \
            % self.directory


class SharedServer:
    """A throw-away database server (PostgreSQL, MariaDB) shared by the
    backends that need it: started by the first one's ``acquire(workdir)``
    (``_start``), stopped when the last one ``release``s it."""

    def __init__(self) -> None:
        self.server = None
        self.users = 0

    def _start(self, workdir: str):
        raise NotImplementedError

    def acquire(self, workdir: str) -> None:
        if self.server is None:
            self.server = self._start(workdir)
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0 and self.server is not None:
            server, self.server = self.server, None
            server.stop()

    def database(self, name: str) -> str:
        return self.server.database(name)


def open_spec(spec: dict):
    """A new storage client object from a ``Backend.spec()``."""
    kind = spec["kind"]
    if kind == "neo":
        from neozodb.client import Storage
        return Storage(**spec["kwargs"], **spec.get("options", {}))
    if kind == "zeo":
        from ZEO.ClientStorage import ClientStorage
        return ClientStorage(tuple(spec["address"]), wait=True, wait_timeout=30,
                             **spec.get("options", {}))
    if kind == "filestorage":
        from ZODB.FileStorage import FileStorage
        return FileStorage(spec["path"])
    if kind == "zconfig":
        from ZODB.config import storageFromString
        return storageFromString(spec["text"])
    raise ValueError(kind)


def relstorage_available() -> bool:
    try:
        import relstorage  # noqa: F401
    except ImportError:
        return False
    return True


def relstorage_backends(skipped: dict[str, str]) -> list[Backend]:
    """[RelStorageBackend()] when RelStorage is installed; else [], said in
    ``skipped``."""
    if relstorage_available():
        return [RelStorageBackend()]
    skipped[RelStorageBackend.label] = "`import relstorage` failed (not installed)"
    return []


def start_backends(cleanup: contextlib.ExitStack, backends: list[Backend], workdir: str,
                   skipped: dict[str, str], optional=(RelStorageBackend,),
                   peaks: PeakMemory | None = None) -> list[Backend]:
    """Start every backend, each stopped by ``cleanup`` (after ``peaks``, if
    given, read its servers' memory); an optional one that fails to start
    is left out and said in ``skipped``.  Returns the started."""
    active = []
    for backend in backends:
        cleanup.callback(backend.stop)  # idempotent: safe after a failed start
    for backend in backends:
        t0 = time.perf_counter()
        try:
            backend.start(workdir)
        except Exception as e:
            if not isinstance(backend, optional):
                raise
            skipped[backend.label] = "failed to start: %r" % (e,)
            continue
        active.append(backend)
        if peaks is not None:
            peaks.watch(cleanup, backend)
        say("  started %-18s %.1fs" % (backend.label, time.perf_counter() - t0))
    return active


def write_spec(workdir: str, backend: Backend) -> str:
    """A file telling client processes how to open ``backend`` (``read_spec``)."""
    path = os.path.join(workdir, backend.key + ".spec")
    with open(path, "w") as f:
        json.dump(backend.spec(), f)
    return path


def read_spec(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


class PeakMemory:
    """The VmHWM of the server processes of backends, read just before they
    stop (``cleanup.callback(peaks.read, backend)`` after the backend's own
    stop callback: callbacks run last in, first out)."""

    def __init__(self) -> None:
        self.peaks: dict[str, dict[str, int]] = {}  # backend label -> {node: bytes}

    def read(self, backend: Backend) -> None:
        if not self.peaks.get(backend.label):
            self.peaks[backend.label] = {name: vm_hwm(pid)
                                         for name, pid in backend.pids().items()}

    def watch(self, cleanup: contextlib.ExitStack, backend: Backend) -> None:
        self.peaks.setdefault(backend.label, {})  # the table keeps this order
        cleanup.callback(self.read, backend)

    def table(self, what: str = "peak RSS (VmHWM), MB") -> str:
        rows = [[label, ", ".join("%s %.1f" % (n, b / MB) for n, b in sorted(nodes.items()))]
                for label, nodes in self.peaks.items() if nodes]
        return format_table([what, "per process"], rows) if rows else ""


# -- client processes ----------------------------------------------------------------------
class Clients:
    """N client processes started side by side, each running ``argv`` plus
    its index; each prints one line "ready" once set up, waits for a line
    "go SECONDS" on its stdin, works that long, then prints one line of JSON
    with its results.  They are killed by ``cleanup`` if still running, and
    end by themselves if this process dies (their stdin closes)."""

    def __init__(self, cleanup: contextlib.ExitStack, argvs: list[list[str]],
                 timeout: float = 120.0) -> None:
        self.timeout = timeout
        self.procs: list[subprocess.Popen] = []
        cleanup.callback(self.kill)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in [os.path.dirname(os.path.abspath(__file__)),
                        os.environ.get("PYTHONPATH", "")] if p))
        for argv in argvs:
            self.procs.append(subprocess.Popen(
                [sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                text=True, env=env))

    def _lines(self, what: str) -> list[str]:
        """One line from every process (within the timeout)."""
        lines: dict[int, str] = {}
        sel = selectors.DefaultSelector()
        for i, p in enumerate(self.procs):
            sel.register(p.stdout, selectors.EVENT_READ, i)
        deadline = time.monotonic() + self.timeout
        try:
            while len(lines) < len(self.procs):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError("client processes: no %s after %.0fs" % (
                        what, self.timeout))
                for key, _ in sel.select(left):
                    i = key.data
                    line = self.procs[i].stdout.readline()
                    if not line:
                        raise RuntimeError("client process %d exited (status %s) before %s"
                                           % (i, self.procs[i].wait(), what))
                    lines[i] = line.strip()
                    sel.unregister(self.procs[i].stdout)
        finally:
            sel.close()
        return [lines[i] for i in range(len(self.procs))]

    def run(self, seconds: float, ready=None) -> list[dict]:
        """Wait until all are ready (then call ``ready()``, if given), let
        them work ``seconds``, return their results (in order)."""
        self._lines("ready")
        if ready is not None:
            ready()
        for p in self.procs:
            p.stdin.write("go %r\n" % seconds)
            p.stdin.flush()
        results = [json.loads(line) for line in self._lines("results")]
        for p in self.procs:
            p.stdin.close()
            p.wait(30)
        return results

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def client_ready() -> float:
    """In a client process: say "ready", wait for "go SECONDS"; returns the
    seconds.  Exits quietly if the parent went away."""
    print("ready", flush=True)
    line = sys.stdin.readline()
    if not line.startswith("go "):
        sys.exit(1)
    return float(line.split()[1])


def client_result(result: dict) -> None:
    result["vmhwm"] = vm_hwm()
    print(json.dumps(result), flush=True)


def build_raw(storage, count: int, batch: int = 10_000, progress=None) -> list[bytes]:
    """Store ``count`` new PersistentMapping records of PAYLOAD random
    characters with the raw storage API, ``batch`` per transaction; returns
    their oids."""
    from ZODB.Connection import TransactionMetaData
    oids = []
    done = 0
    while done < count:
        n = min(batch, count - done)
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        for _ in range(n):
            oid = storage.new_oid()
            storage.store(oid, None, record_pickle(payload()), "", txn)
            oids.append(oid)
        storage.tpc_vote(txn)
        storage.tpc_finish(txn)
        done += n
        if progress:
            progress(done)
    return oids
