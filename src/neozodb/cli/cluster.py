"""A whole cluster on this machine, one process per node: what ``neosimple``
runs and what the cluster tests start."""
from __future__ import annotations

import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from urllib.parse import quote

from neozodb.cli.config import format_address

log = logging.getLogger("neozodb.cluster")


def wait_until(condition, timeout: float, what: str = "condition"):
    """Poll ``condition()`` (remote state, no event to wait on) until it
    returns a true value or ``timeout`` seconds pass; return that value."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("timed out waiting for " + what)
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)


def _ephemeral_floor() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


#: (i, n): free_port chooses in the i-th of n equal slices of its range
#: (0-based), so that n processes making clusters side by side (the test
#: suite's workers: tests/conftest.py) never choose the same port, which a
#: node stopped for a while leaves free for anybody's check
PORT_SLICE: tuple[int, int] | None = None


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, chosen at random below the kernel's ephemeral range.
    A port chosen in advance (a node started, or restarted, on a known
    address) must not be taken meanwhile: the kernel hands out ephemeral
    ports to every outgoing connection and every bind to port 0 of any
    process, never ports below that range."""
    floor = _ephemeral_floor()
    low = max(1024, floor - 10000)
    if PORT_SLICE is not None:
        i, n = PORT_SLICE
        width = (floor - low) // n
        low, floor = low + i * width, low + (i + 1) * width
    rnd = random.SystemRandom()
    for _ in range(200):
        port = rnd.randrange(low, floor)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # everything tried is in use: any port
        s.bind((host, 0))
        return s.getsockname()[1]


class NodeProcess:
    def __init__(self, name: str, argv: list[str], logfile: str) -> None:
        self.name = name
        self.argv = argv
        self.logfile = logfile
        self.proc: subprocess.Popen | None = None
        self.log_offset = 0

    def start(self) -> None:
        log = open(self.logfile, "ab")
        self.log_offset = log.tell()  # where this run's lines begin
        try:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL,
                                         start_new_session=True)  # Ctrl-C is the launcher's
        finally:
            log.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.running:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.running:
            self.proc.kill()
            self.proc.wait(10)


_LISTENING = re.compile(r"listening on (\S+):(\d+)")
# starts of a new cluster whose chosen ports were taken meanwhile
PORT_ATTEMPTS = 3


def _port_taken(node: NodeProcess) -> bool:
    """The node exited at once, its address in use (this run's log)."""
    if node.proc is None or node.running:
        return False
    with open(node.logfile, "rb") as f:
        f.seek(node.log_offset)
        return b"Address already in use" in f.read()


def listening_address(node: NodeProcess, timeout: float = 30.0) -> tuple[str, int]:
    """The address a node of ours logs it listens on (this run's log)."""
    def found():
        if not node.running:
            raise RuntimeError("%s exited; see %s" % (node.name, node.logfile))
        with open(node.logfile, "rb") as f:
            f.seek(node.log_offset)
            match = _LISTENING.search(f.read().decode("utf-8", "replace"))
        return match and (match.group(1), int(match.group(2)))
    return wait_until(found, timeout, "%s to listen" % node.name)


class LocalCluster:
    def __init__(self, directory: str, name: str = "neozodb", storages: int = 2,
                 replicas: int = 1, partitions: int = 12, host: str = "127.0.0.1",
                 master_port: int = 0, admin_port: int = 0, loglevel: str = "INFO",
                 autostart: bool = True, node_args: list[str] | tuple[str, ...] = (),
                 masters: int = 1, storage_args: list[str] | tuple[str, ...] = (),
                 importer: str | None = None, tls: bool = False, adapter: str = "SQLite",
                 databases: Callable[[int], str] | None = None) -> None:
        self.autostart = autostart
        # the storages' backend; ``databases(i)`` names storage i's database
        # (default: storage<i>.sqlite in the directory)
        self.adapter = adapter
        self._databases = databases
        # TLS: a throw-away CA in <directory>/tls signs a certificate per node
        self.tls = tls
        self._ca = None
        self._issued: dict[str, tuple[str, str]] = {}  # name -> (cert, key) files
        self._ctl_tls = None  # neoctl's client context, made once
        # extra options given to every node, e.g. ("--keepalive", "3")
        self.node_args = list(node_args)
        # and to storage nodes only, e.g. ("--pack-rate", "1000")
        self.storage_args = list(storage_args)
        # an importer.conf: the storages run the Importer over it (live import)
        self.importer = importer
        self.directory = os.path.abspath(directory)
        self.name = name
        self.host = host
        self.replicas = replicas
        self.partitions = partitions
        self.num_storages = storages
        self.loglevel = loglevel
        # port 0: any free port, chosen in advance (free_port): masters
        # must know each other's address before starting, and a node
        # restarted comes back on its address
        self._given = (master_port, admin_port, masters)
        self._started = False  # once started, nodes come back on their addresses
        self._pick_ports()
        self.nodes: dict[str, NodeProcess] = {}

    def _pick_ports(self) -> None:
        master_port, admin_port, masters = self._given
        host = self.host
        self.master_address = (host, master_port or free_port(host))
        self.master_addresses = [self.master_address] + [
            (host, free_port(host)) for _ in range(masters - 1)]
        self.admin_address = (host, admin_port or free_port(host))

    @property
    def masters(self) -> str:
        return ",".join(format_address(a) for a in self.master_addresses)

    @property
    def master_names(self) -> list[str]:
        return ["M%d" % i for i in range(1, len(self.master_addresses) + 1)]

    @property
    def uri(self) -> str:
        files = self.credentials("client")
        query = "?ca=%s&cert=%s&key=%s" % tuple(quote(f) for f in files) if files else ""
        return "neo://%s@%s%s" % (self.name, self.masters, query)

    def _python(self, module: str, *args: str, name: str = "") -> list[str]:
        return [sys.executable, "-m", module, "-c", self.name, "--loglevel", self.loglevel, *args,
                *self.tls_args(name), *self.node_args]

    def credentials(self, name: str) -> tuple[str, str, str] | None:
        """(ca, cert, key) files of node or tool ``name`` (made on first
        use), None without TLS."""
        if not self.tls:
            return None
        from neozodb.net import certs
        directory = os.path.join(self.directory, "tls")
        if self._ca is None:
            self._ca = certs.make_ca(directory, "%s test CA" % self.name)
        if name not in self._issued:  # files of an earlier run are another CA's
            self._issued[name] = certs.make_cert(self._ca, directory, name)[:2]
        return (self._ca.path, *self._issued[name])

    def tls_args(self, name: str) -> list[str]:
        files = self.credentials(name or "node")
        if files is None:
            return []
        return ["--ca", files[0], "--cert", files[1], "--key", files[2]]

    def client_kwargs(self, name: str = "client") -> dict:
        """Keyword arguments of ``neozodb.client.Storage`` for this cluster."""
        kw = {"master_nodes": self.masters, "name": self.name}
        files = self.credentials(name)
        if files is not None:
            kw.update(zip(("ca", "cert", "key"), files, strict=True))
        return kw

    def _node(self, name: str, argv: list[str]) -> NodeProcess:
        node = NodeProcess(name, argv, os.path.join(self.directory, name + ".log"))
        self.nodes[name] = node
        return node

    def master_argv(self, name: str, address: tuple[str, int]) -> list[str]:
        others = ["-m", self.masters] if len(self.master_addresses) > 1 else []
        return self._python(
            "neozodb.cli.master", "-b", format_address(address), *others,
            "-p", str(self.partitions), "-r", str(self.replicas),
            "-A", str(self.num_storages if self.autostart else 0), name=name)

    def storage_argv(self, i: int) -> list[str]:
        if self.importer is not None:
            database = ["-a", "Importer", "-d", self.importer]
        else:
            database = ["-a", self.adapter, "-d", self.database(i)]
        # -i: node S<i> is storage<i>.sqlite whatever the start order
        return self._python(
            "neozodb.cli.storage", "-m", self.masters, "-b", "%s:0" % self.host, *database,
            "-i", "S%d" % i, *self.storage_args, name="S%d" % i)

    def admin_argv(self) -> list[str]:
        return self._python(
            "neozodb.cli.admin", "-b", format_address(self.admin_address), "-m", self.masters,
            name="A1")

    def database(self, i: int) -> str:
        if self._databases is not None:
            return self._databases(i)
        return os.path.join(self.directory, "storage%d.sqlite" % i)

    def start(self, wait: float = 60.0) -> None:
        os.makedirs(self.directory, exist_ok=True)
        for attempt in range(PORT_ATTEMPTS):
            try:
                self._start(wait)
                self._started = True
                return
            except RuntimeError:
                # A port free_port chose was taken before the node bound
                # it, by another process that picked the same one (a test
                # run in parallel): the first start only, on new ports.
                taken = [node.name for node in self.nodes.values() if _port_taken(node)]
                if not taken or attempt == PORT_ATTEMPTS - 1 or not self._fresh():
                    raise
                log.warning("%s: port taken under %s: starting again on other ports",
                            self.directory, " ".join(taken))
                self.kill()
                self.nodes.clear()
                self._pick_ports()

    def _fresh(self) -> bool:
        """Whether this is the first start, on ports all chosen here."""
        master_port, admin_port, _ = self._given
        return not (self._started or master_port or admin_port)

    def _start(self, wait: float) -> None:
        for name, address in zip(self.master_names, self.master_addresses, strict=True):
            self._node(name, self.master_argv(name, address)).start()
        if len(self.master_addresses) == 1:
            self.master_address = self.master_addresses[0] = self._bound(
                self.nodes["M1"], self.master_address)
        for i in range(1, self.num_storages + 1):
            self.storage(i).start()
        admin = self._node("A1", self.admin_argv())
        admin.start()
        self.admin_address = self._bound(admin, self.admin_address)
        if wait:
            self.wait_state("RUNNING", wait)
            # A node given a port that another process took after
            # free_port chose it exits at once, maybe after the cluster
            # reached RUNNING: its log says whether it listens (start()
            # then tries other ports).
            for name in (*self.master_names, "A1"):
                if self.logs_listening(name):
                    listening_address(self.nodes[name], wait)

    def logs_listening(self, name: str) -> bool:
        """Whether node ``name`` logs the address it listens on (ours do)."""
        return True

    def start_or_kill(self, wait: float = 60.0):
        """start(), killing whatever started if it fails; returns the cluster."""
        try:
            self.start(wait=wait)
        except BaseException:
            self.kill()
            raise
        return self

    def _bound(self, node: NodeProcess, address: tuple[str, int],
               timeout: float = 30.0) -> tuple[str, int]:
        """The address a node listens on, from its log when it chose the
        port; later restarts of the node reuse that port."""
        if address[1]:
            return address
        bound = listening_address(node, timeout)
        port_arg = node.argv.index("-b") + 1
        node.argv[port_arg] = format_address(bound)
        return bound

    def storage(self, i: int) -> NodeProcess:
        name = "S%d" % i
        node = self.nodes.get(name)
        if node is None:
            node = self._node(name, self.storage_argv(i))
        return node

    @property
    def ctl_cluster(self) -> str | None:
        """The name neoctl identifies with (None: it does not identify)."""
        return self.name

    def ctl(self):
        from neozodb.ctl.neoctl import NeoCtl
        tls = self._ctl_tls
        files = self.credentials("neoctl")
        if tls is None and files is not None:
            from neozodb.net.tls import load_contexts
            tls = self._ctl_tls = load_contexts(*files)[1]
        ctl = NeoCtl(self.admin_address, timeout=10, cluster=self.ctl_cluster, tls=tls)
        ctl.connect()
        return ctl

    def run_neoctl(self, *words: str, address: str | None = None, env: dict | None = None,
                   timeout: float = 60.0) -> subprocess.CompletedProcess:
        """The ``neoctl`` command, in its own process, identified with the
        cluster name, against the admin (or ``address``)."""
        addr = address or format_address(self.admin_address)
        return subprocess.run([sys.executable, "-m", "neozodb.ctl.neoctl", "-c", self.name,
                               "-a", addr, *self.tls_args("neoctl"), *words],
                              capture_output=True, text=True,
                              timeout=timeout, env=env)

    def neoctl(self, *words: str, refusal: bool = False):
        """``neoctl WORDS...`` through the admin: (text lines, JSON data).
        A refusal raises CtlError, or with ``refusal`` is returned as its
        message."""
        from neozodb.ctl.neoctl import CtlError, run_command
        ctl = self.ctl()
        try:
            return run_command(ctl, list(words))
        except CtlError as e:
            if refusal:
                return str(e)
            raise
        finally:
            ctl.close()

    def _ctl_value(self, what: str, key: str):
        """``data[key]`` of ``neoctl print <what>``, None if the admin
        cannot answer."""
        from neozodb.ctl.neoctl import CtlError
        try:
            return self.neoctl("print", what)[1][key]
        except CtlError:
            return None

    def cluster_state(self) -> str | None:
        return self._ctl_value("cluster", "cluster")

    def pt_lines(self) -> list[str]:
        """``neoctl print pt``: the header, then one line per storage."""
        return self.neoctl("print", "pt")[0]

    def cells(self) -> dict[str, str]:
        """``print pt`` as {storage: its letters}, e.g. {"S1": "UUO."}."""
        return {line.split()[0]: line.split()[2] for line in self.pt_lines()[1:]}

    def all_up_to_date(self) -> bool:
        """Every cell of the table is UP_TO_DATE."""
        return all(set(row) <= {"U", "."} for row in self.cells().values())

    def storage_state(self, name: str):
        """NodeStates of storage ``name`` (e.g. "S2") as the admin sees it,
        None if it does not know it."""
        return self.node_state(name)

    def node_state(self, name: str):
        """NodeStates of node ``name`` (e.g. "S2", "M1") as the admin sees
        it, None if it does not know it."""
        from neozodb.protocol import NodeTypes, nid_str
        node_type = {"M": NodeTypes.MASTER, "S": NodeTypes.STORAGE}[name[0]]
        ctl = self.ctl()
        try:
            for node in ctl.nodes(node_type):
                if nid_str(node[2]) == name:
                    return node[3]
            return None
        finally:
            ctl.close()

    def primary(self) -> str | None:
        """Name of the primary master (``neoctl print primary``), None if
        the admin follows none."""
        return self._ctl_value("primary", "primary")

    def wait_primary(self, timeout: float, other_than: str | None = None) -> str:
        """The primary once the cluster RUNS (a master playing primary during
        an election may yield yet), other than ``other_than``."""
        def running():
            name = self.primary()
            return (name not in (None, other_than) and self.cluster_state() == "RUNNING"
                    and self.primary() == name and name)
        return wait_until(running, timeout, "a running primary other than %s" % other_than)

    def wait_state(self, state: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.02
        while self.cluster_state() != state:
            dead = [n.name for n in self.nodes.values() if n.proc is not None and not n.running
                    and (n.name == "A1" or n.name in self.master_names)]
            if "A1" in dead or len(dead) == len(self.master_names) + ("A1" in dead) \
                    or time.monotonic() > deadline:
                raise RuntimeError("cluster did not reach %s (dead: %s); logs in %s" % (
                    state, dead, self.directory))
            time.sleep(delay)  # polling a remote state through neoctl
            delay = min(delay * 1.5, 0.2)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop cleanly: STOPPING through the admin, then the admin."""
        from neozodb.ctl.neoctl import CtlError, run_command
        if any(self.nodes[m].running for m in self.master_names if m in self.nodes):
            try:
                ctl = self.ctl()
                try:
                    run_command(ctl, ["set", "cluster", "STOPPING"])
                finally:
                    ctl.close()
            except CtlError:
                pass
        deadline = time.monotonic() + timeout
        for name, node in self.nodes.items():
            if name != "A1":
                node.wait(max(0.1, deadline - time.monotonic()))
        for node in self.nodes.values():
            node.signal(signal.SIGTERM)
        for node in self.nodes.values():
            if node.wait(max(0.1, deadline - time.monotonic())) is None:
                node.kill()

    def kill(self) -> None:
        for node in self.nodes.values():
            node.kill()
