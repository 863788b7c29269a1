"""Run NEO (github Nexedi/neoppod) beside neozodb: clusters whose nodes are
each either implementation, NEO's neoctl, and Python code with NEO's
client.  NEO runs from the source directory named by ``NEO_SRC`` (never
copied into this project); the interoperability tests are skipped without
it.

NEO runs on this Python (3.11, ZODB 6) with ``six`` and ``python-dateutil``
installed (``pip install -e '.[interop]'``).  Its required options are given
on the command line: its INI handling of required options does not work on
Python 3.  Its logs are SQLite databases (``NAME.neolog``, read with its
``neolog`` script); what it prints goes to ``NAME.log`` as for our nodes.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import TypeVar

from neozodb.cli.cluster import LocalCluster, free_port, wait_until
from neozodb.cli.config import format_address

NEO_SRC = os.environ.get("NEO_SRC", "")

T = TypeVar("T")

# How a neoctl request fails while the admin (either kind) is between two
# primaries or restarting: the request is made again.  NEO's admin says
# the third; ours the others, or drops the connection.
TRANSIENT = ("connection to admin lost", "cannot connect to admin",
             "not connected to a primary master", "master lost", "no partition table yet")


def transient(error: Exception) -> bool:
    return str(error).lower().startswith(TRANSIENT)


def neo_available() -> bool:
    return bool(NEO_SRC) and os.path.isfile(os.path.join(NEO_SRC, "neo", "lib", "protocol.py"))


def neo_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=NEO_SRC, **extra)
    return env


def neo_script(script: str, *args: str) -> list[str]:
    """argv running one of NEO's scripts (neomaster, neostorage, neoadmin,
    neoctl) with this Python and NEO on its path."""
    return ["env", "PYTHONPATH=" + NEO_SRC, sys.executable, os.path.join(NEO_SRC, script),
            *args]


def neo_neoctl(address: tuple[str, int], *words: str, timeout: float = 60.0
               ) -> subprocess.CompletedProcess:
    """NEO's own neoctl (which never identifies) against an admin node."""
    return subprocess.run(neo_script("neoctl", "-a", format_address(address), *words),
                          capture_output=True, text=True, timeout=timeout)


def run_neo_python(code: str, *args: str, timeout: float = 120.0, cwd: str | None = None
                   ) -> subprocess.CompletedProcess:
    """Run ``code`` in its own process with NEO importable (NEO's client
    patches ZODB when imported: never in the test process)."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, env=neo_env(), cwd=cwd)


class MixedCluster(LocalCluster):
    """A LocalCluster whose nodes named in ``neo`` (``"M1"``, ``"S2"``,
    ``"A1"``...) are NEO's.  Every port is chosen before the start: NEO's
    nodes do not log the port they bound."""

    def __init__(self, directory: str, neo=(), **kw) -> None:
        self.neo = set(neo)
        kw.setdefault("master_port", free_port())
        kw.setdefault("admin_port", free_port())
        super().__init__(directory, **kw)

    @property
    def neo_adapter(self) -> str:
        """NEO's name of the storages' adapter (MariaDB is NEO's MySQL)."""
        return "MySQL" if self.adapter.lower() in ("mariadb", "mysql") else self.adapter

    def switch(self, name: str) -> None:
        """Make node ``name`` of the other kind from its next start on (the
        same database, the same NID): it must be stopped."""
        assert not self.nodes[name].running, name
        self.neo ^= {name}
        del self.nodes[name]

    def kind(self, name: str) -> str:
        return "NEO" if name in self.neo else "neozodb"

    def logs_listening(self, name: str) -> bool:
        return name not in self.neo

    @property
    def masters(self) -> str:
        # space-separated: NEO's -m splits on spaces only
        return " ".join(format_address(a) for a in self.master_addresses)

    @property
    def ctl_cluster(self) -> str | None:
        return None if "A1" in self.neo else self.name

    def _neo_log(self, name: str) -> list[str]:
        return ["-l", os.path.join(self.directory, name + ".neolog")]

    def master_argv(self, name: str, address: tuple[str, int]) -> list[str]:
        if name not in self.neo:
            return super().master_argv(name, address)
        return neo_script("neomaster", "-c", self.name, "-b", format_address(address),
                          "-m", self.masters, "-p", str(self.partitions),
                          "-r", str(self.replicas),
                          "-A", str(self.num_storages if self.autostart else 0),
                          *self._neo_log(name))

    def storage_argv(self, i: int) -> list[str]:
        name = "S%d" % i
        if name not in self.neo:
            return super().storage_argv(i)
        return neo_script("neostorage", "-c", self.name, "-m", self.masters,
                          # any port: NEO's storage tells the master the one it bound
                          "-b", "%s:0" % self.host,
                          "-a", self.neo_adapter, "-d", self.database(i), "-i", str(i),
                          *self._neo_log(name), *self.storage_args)

    def admin_argv(self) -> list[str]:
        if "A1" not in self.neo:
            return super().admin_argv() + ["--allow-anonymous-ctl"]
        return neo_script("neoadmin", "-c", self.name, "-m", self.masters,
                          "-b", format_address(self.admin_address), *self._neo_log("A1"))

    def neo_neoctl(self, *words: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return neo_neoctl(self.admin_address, *words, timeout=timeout)

    #: How long a neoctl request is made again while it fails transiently:
    #: a take-over on a loaded two-core machine can take most of a minute.
    ctl_patience = 90.0

    def through_ctl(self, call: Callable, what: str = "neoctl") -> T:
        """``call(ctl)`` on a fresh connection to the admin, made again
        while it fails transiently (see TRANSIENT); any other refusal is
        raised at once."""
        from neozodb.ctl.neoctl import CtlError
        result: list = []
        last: list = []

        def attempt() -> bool:
            try:
                ctl = self.ctl()
                try:
                    result.append(call(ctl))
                finally:
                    ctl.close()
            except CtlError as e:
                if not transient(e):
                    raise
                last[:] = [e]
                return False
            return True
        try:
            wait_until(attempt, self.ctl_patience, what)
        except TimeoutError:
            raise CtlError("%s: still failing after %s s: %s" % (
                what, self.ctl_patience, last[0] if last else "?")) from None
        return result[0]

    def neoctl(self, *words: str, refusal: bool = False):
        from neozodb.ctl.neoctl import CtlError, run_command
        try:
            return self.through_ctl(lambda ctl: run_command(ctl, list(words)),
                                    "neoctl " + " ".join(words))
        except CtlError as e:
            if refusal:
                return str(e)
            raise

    def _ctl_value(self, what: str, key: str):
        # polled (cluster state, primary): a failure means "not known now"
        # and the poll goes on, no need to insist
        from neozodb.ctl.neoctl import CtlError
        try:
            return LocalCluster.neoctl(self, "print", what)[1][key]
        except CtlError:
            return None

    def node_state(self, name: str):
        from neozodb.protocol import NodeTypes, nid_str
        node_type = {"M": NodeTypes.MASTER, "S": NodeTypes.STORAGE}[name[0]]
        nodes = self.through_ctl(lambda ctl: ctl.nodes(node_type), "the node list")
        return next((n[3] for n in nodes if nid_str(n[2]) == name), None)


def mixed_cluster(tmp_path, neo, **kw) -> MixedCluster:
    """A MixedCluster "mix" in ``tmp_path/c``, NEO's nodes named in ``neo``,
    started (killed if it fails to); 2 storages, replicas 1, 6 partitions
    unless ``kw`` says otherwise."""
    kw.setdefault("storages", 2)
    kw.setdefault("replicas", 1)
    kw.setdefault("partitions", 6)
    return MixedCluster(str(tmp_path / "c"), neo=neo, name="mix", **kw).start_or_kill()


# Through NEO's client, in its own process: set root[key] for each
# key=value given (one transaction), then print the whole root as JSON.
# The client's options besides the masters and the name (TLS files...)
# come as one JSON argument.
NEO_CLIENT_SCRIPT = """
import json, sys, ZODB
from neo.client.Storage import Storage
masters, name, options = sys.argv[1:4]
db = ZODB.DB(Storage(master_nodes=masters, name=name, **json.loads(options)))
try:
    with db.transaction() as conn:
        root = conn.root()
        for item in sys.argv[4:]:
            key, value = item.split("=", 1)
            root[key] = value
    with db.transaction() as conn:
        print(json.dumps({k: v for k, v in conn.root().items() if isinstance(v, str)}))
finally:
    db.close()
"""


def neo_client_roundtrip(cluster: LocalCluster, options: dict | None = None,
                         **values: str) -> dict:
    """Commit ``values`` into the root through NEO's client (made with
    ``options`` too, e.g. its TLS files) and return the string values of
    the root it then reads."""
    import json
    out = run_neo_python(NEO_CLIENT_SCRIPT, cluster.masters, cluster.name,
                         json.dumps(options or {}), *("%s=%s" % kv for kv in values.items()))
    if out.returncode:
        raise AssertionError("NEO's client failed:\n" + out.stderr[-3000:])
    return json.loads(out.stdout.splitlines()[-1])


# The set-up of tests/writers.py's writer committing through NEO's client,
# with one
# more tolerance.  When NEO's master restarts, NEO's client reconnecting to
# it may get the master's NOT_READY answer (cluster not running yet) to a
# request it no longer waits for: its poll thread dies of "ProtocolError:
# Unexpected response packet ... Error[2]" and the client object is unusable
# from then on (the commit in progress fails, so does everything after).
# That is between NEO's client and NEO's master alone: the writer counts
# the commit as failed (not acknowledged: it is retried), opens a new
# client and goes on.  Any other failure of the poll thread still kills it.
NEO_WRITER_SETUP = textwrap.dedent("""
    import os, sys, threading, transaction, ZODB
    from neo.client.Storage import Storage
    from neo.lib.exception import ProtocolError
    masters, name, key, stop, retry = sys.argv[1:]
    dead = []

    def hook(args):
        if args.exc_type is ProtocolError and str(args.exc_value).startswith(
                "Unexpected response packet") and ": Error[" in str(args.exc_value):
            dead.append(args.thread.name)
        threading.__excepthook__(args)
    threading.excepthook = hook

    def open_db():
        # a manager of its own: the dead client's connection must not stay
        # a synchronizer of the next one's transactions
        db = ZODB.DB(Storage(master_nodes=masters, name=name))
        tm = transaction.TransactionManager()
        return db, tm, db.open(tm)

    def after_failure(db, tm, conn):
        try:
            tm.abort()
        except Exception as e:
            if not dead:
                raise
            print("abort failed", type(e).__name__, e, file=sys.stderr, flush=True)
        if dead:
            print("new client: the poll thread died", file=sys.stderr, flush=True)
            del dead[:]
            return open_db()
        return db, tm, conn

    db, tm, conn = open_db()
""")


def neo_writer_script() -> str:
    """tests/writers.py's writer, committing through NEO's client (see
    NEO_WRITER_SETUP)."""
    from writers import writer_script
    return writer_script(NEO_WRITER_SETUP)


def load_conformance():
    """tests/zodb/test_conformance.py, by path and under its own name:
    importing its classes by name into a test module would make pytest
    collect (and run) the neozodb-cluster versions again."""
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), os.pardir, "zodb", "test_conformance.py")
    spec = importlib.util.spec_from_file_location("neozodb_zodb_conformance", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
