"""A network of hosts on one machine, for tests that need a real network
between processes: each host is a Linux network namespace with its own
address, all joined by a bridge, and faults are injected per link and per
direction.  Needs root, ``ip`` (iproute2) and iptables (``make test``'s
set-up installs both); ``unavailable()`` says why not, for a skip.

    with Network(["m1", "s1", "c1"]) as net:
        proc = net["s1"].run([sys.executable, "-m", "neozodb.cli.storage", ...])
        net["s1"].address                 # "10.A.B.2": its own, in a /24
        net.isolate("s1"); ...; net.heal()

Layout: namespace ``<base>-switch`` holds a bridge ``br0``; host H is
namespace ``<base>-h-H`` with loopback up and ``eth0``, a veth whose peer is
a port of the bridge.  Nothing is created in the machine's own namespace.
``base`` is ``nzn-<pid>-<start time of pid>-<random>``, so parallel runs
never clash and ``cleanup_leftovers()`` (called by every ``Network`` on
entry) removes, with the processes in them, only the namespaces of runs
whose process is gone.  The /24 (10.A.B.0, A >= 100) is random, avoiding
the machine's own addresses (only for readability: the namespaces route
nowhere else).

``host.run(argv, **popen_kw)`` starts a process in the host (``ip netns
exec``; its own session, stdin from /dev/null unless told);
``host.call(argv, timeout, **run_kw)`` runs one to its end;
``host.within(fn, *args)`` calls fn in a thread of this process that has
entered the host's namespace (a socket made there stays in that network:
``host.socket(...)``).

Faults apply at once and add up until ``heal()``; ``loss`` and ``delay``
replace an earlier value on the same link.  Rules are set host by host, so
a partition is in place within a few milliseconds, not atomically:

- ``cut(src, dst)``: packets from src to dst are dropped (one way; TCP
  cannot even connect either way, its handshake needs both);
- ``partition(group_a, group_b)``: cut both ways between every pair;
  ``isolate(host)``: from every other host;
- ``loss(target, percent)``: that share of the packets dropped at random
  (iptables ``statistic``); 0 removes it;
- ``delay(target, ms, jitter_ms=0)``: TCP bytes held ms + uniform(0,
  jitter_ms) milliseconds (never less than ms, unlike netem's +-jitter),
  through a proxy (below); 0 removes it;
- ``heal()``: every fault above removed, frozen processes thawed;
- ``freeze(process)`` / ``thaw(process)``: SIGSTOP / SIGCONT (a Popen or
  a pid): its kernel still acknowledges what is sent to it, the process
  says nothing.

A target is a host (every link from and to it) or a ``(src, dst)`` link (that
direction only); hosts are named or given as Host objects.  Drops are
iptables rules (chain NZFAULT, from INPUT) in the receiving host, so the
sender sees no error, as on a real network, and established connections
are cut too.  IPv4 only: ARP and IPv6 (link-local addresses only) pass.

Delay: this kernel has no ``tc netem``.  The host that opens a connection
to a delayed peer has an iptables rule (nat chain NZDELAY, from OUTPUT)
redirecting it to ``delayproxy.py``, a process in that host which connects
to the original destination (its sockets are marked, the rule skips them)
and forwards each way with the delay of that direction; it starts with
the first delay that concerns its host and lives until the network
closes.  Drops still apply to what it forwards.  Limits: TCP only
(UDP and ICMP are not delayed); a connection opened before ``delay()``
is not delayed, as it does not pass through the proxy (make nodes
reconnect, or set the delay before they start); ``heal()`` removes the
redirection for new connections and sets the proxy's delays to 0 for those
it carries; the proxy's connection to the peer comes from the same host
address but another port; a refused connection looks accepted then closed.

Not modelled: clock offsets between hosts (they share the machine's clock),
bandwidth limits, duplication or corruption of packets.

Teardown, on leaving the ``with`` block for any reason (an exception, a
test failure or timeout, KeyboardInterrupt, or SIGTERM, which the main
thread turns into SystemExit while a Network is open; atexit as a last
resort): every process in the namespaces is SIGKILLed (those started by
``run`` and the proxies, and anything they started), the namespaces are
deleted, which removes links, bridge and rules with them (stop processes
first where a clean stop matters).  ``remains()`` lists what is left
(nothing, normally)."""
from __future__ import annotations

import atexit
import ctypes
import json
import os
import random
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable

from neozodb.cli.cluster import wait_until

PREFIX = "nzn-"
RUN_NETNS = "/run/netns"
MARK = 0x4E5A  # on the proxy's own sockets: the redirection skips them
FAULTS, DELAYS = "NZFAULT", "NZDELAY"
CLONE_NEWNET = 0x40000000
DELAYPROXY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "delayproxy.py")
_SBIN = os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
# The chains, made once per host (a new namespace has empty tables).  The
# conntrack match turns connection tracking on from the start: without it,
# the first REDIRECT rule would turn it on, tracking connections already
# open as new ones, and redirect them in the middle (reset).
_CHAINS = ("*filter\n:%s - [0:0]\n-A INPUT -j %s\nCOMMIT\n"
           "*nat\n:%s - [0:0]\n-A OUTPUT -m conntrack --ctstate NEW -j %s\nCOMMIT\n"
           ) % (FAULTS, FAULTS, DELAYS, DELAYS)
_RESTORES = ("iptables-nft-restore", "iptables-restore", "iptables-legacy-restore")


class NetError(RuntimeError):
    """A command setting up or changing the network failed."""


def tool(name: str) -> str | None:
    """Path of a command, also looked for in the sbin directories."""
    return shutil.which(name, path=os.environ.get("PATH", "") + _SBIN)


def unavailable() -> str | None:
    """Why namespaces cannot be made here, None if they may (a Network
    may still fail; tests/net/conftest.py tries one)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if tool("ip") is None:
        return "no ip (Debian package iproute2; make test's set-up installs it as root)"
    if not any(tool(name) for name in _RESTORES):
        return "no iptables (Debian package iptables; make test's set-up installs it as root)"
    return None


def run(argv: list[str], input: str | None = None) -> str:
    """Run a set-up command; its output, NetError if it fails."""
    done = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=60)
    if done.returncode:
        raise NetError("%s: %s" % (" ".join(argv), (done.stderr or done.stdout).strip()))
    return done.stdout


def _start_time(pid: int) -> str | None:
    """Start time of process pid (clock ticks since boot), None if none."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owned_name(tag: str) -> str:
    """A namespace name of this process: PREFIX, pid, its start time, tag
    (what cleanup_leftovers reads)."""
    return "%s%d-%s-%s" % (PREFIX, os.getpid(), _start_time(os.getpid()), tag)


def netns_names() -> list[str]:
    try:
        return sorted(os.listdir(RUN_NETNS))
    except FileNotFoundError:
        return []


def ident(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def pids_in(idents: Iterable[tuple[int, int]]) -> list[int]:
    """Processes whose network namespace is one of ``idents``."""
    idents = set(idents)
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if ident("/proc/%s/ns/net" % entry) in idents:
                    found.append(int(entry))
            except OSError:
                pass  # gone, or a zombie
    return found


def destroy(names: Iterable[str]) -> None:
    """SIGKILL every process in these namespaces, then delete them."""
    names = [n for n in names if os.path.exists(os.path.join(RUN_NETNS, n))]
    idents = [ident(os.path.join(RUN_NETNS, n)) for n in names]

    def none_left() -> bool:
        pids = pids_in(idents)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return not pids
    wait_until(none_left, 20, "the processes of namespaces %s to die" % names)
    if names:
        run([tool("ip"), "-batch", "-"], input="".join("netns del %s\n" % n for n in names))


def cleanup_leftovers() -> list[str]:
    """Delete the namespaces (and their processes) of earlier runs of this
    harness whose process is gone; returns their names."""
    doomed = []
    for name in netns_names():
        owner = name[len(PREFIX):].split("-")
        if name.startswith(PREFIX) and len(owner) >= 3 and owner[0].isdigit() \
                and _start_time(int(owner[0])) != owner[1]:
            doomed.append(name)
    destroy(doomed)
    return doomed


def _libc_setns(fd: int, nstype: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_setns = getattr(os, "setns", _libc_setns)  # os.setns: Python 3.12


def _pick_subnet() -> str:
    """'10.A.B', a /24 none of the machine's own addresses is in."""
    used = set(re.findall(r"inet 10\.(\d+)\.(\d+)\.", run([tool("ip"), "-4", "-o", "addr"])))
    rng = random.SystemRandom()
    while True:
        a, b = str(rng.randrange(100, 255)), str(rng.randrange(256))
        if (a, b) not in used:
            return "10.%s.%s" % (a, b)


class Host:
    """One host: a network namespace with address ``address`` on ``eth0``."""

    def __init__(self, network: Network, name: str, netns: str, address: str) -> None:
        self.network = network
        self.name = name
        self.netns = netns
        self.address = address

    def __repr__(self) -> str:
        return "<Host %s %s>" % (self.name, self.address)

    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host."""
        return [tool("ip"), "netns", "exec", self.netns, *argv]

    def run(self, argv: list[str], **popen_kw) -> subprocess.Popen:
        """Start a process in this host; killed when the network closes."""
        popen_kw.setdefault("stdin", subprocess.DEVNULL)
        popen_kw.setdefault("start_new_session", True)  # Ctrl-C is the test's
        proc = subprocess.Popen(self.argv(argv), **popen_kw)
        self.network.processes.append(proc)
        return proc

    def call(self, argv: list[str], timeout: float = 60, **run_kw) -> subprocess.CompletedProcess:
        """Run a process in this host to its end (``subprocess.run``)."""
        run_kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.argv(argv), timeout=timeout, **run_kw)

    def within(self, fn: Callable, *args):
        """fn(*args) in a new thread that entered this host's network
        namespace (threads it starts are there too); its result."""
        outcome: list = []

        def inside() -> None:
            try:
                fd = os.open(os.path.join(RUN_NETNS, self.netns), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _setns(fd, CLONE_NEWNET)
                finally:
                    os.close(fd)
                outcome.append((True, fn(*args)))
            except BaseException as e:
                outcome.append((False, e))
        thread = threading.Thread(target=inside, name="in " + self.netns)
        thread.start()
        thread.join()
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    def socket(self, *args) -> socket.socket:
        """``socket.socket(*args)`` in this host's network."""
        return self.within(socket.socket, *args)


class _Proxy:
    """delayproxy.py in one host, and the port it listens on."""

    def __init__(self, host: Host) -> None:
        self.proc = host.run([sys.executable, DELAYPROXY, "%#x" % MARK], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        self.port = int(self._line("port").split()[1])

    def _line(self, expected: str, timeout: float = 30) -> str:
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise NetError("the delay proxy did not answer in %gs" % timeout)
        line = self.proc.stdout.readline()
        if not line.startswith(expected):
            raise NetError("the delay proxy said %r, not %s (status %s)"
                           % (line, expected, self.proc.poll()))
        return line

    def configure(self, delays: dict) -> None:
        self.proc.stdin.write(json.dumps(delays) + "\n")
        self.proc.stdin.flush()
        self._line("ok")


def _pid(process) -> int:
    """The pid of a Popen, of a LocalCluster node (NodeProcess) or a pid."""
    process = getattr(process, "proc", process)  # NodeProcess
    return getattr(process, "pid", process)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


class Network:
    """Hosts joined by a switch, with faults; a context manager (see the
    module docstring)."""

    def __init__(self, hosts: Iterable[str], subnet: str | None = None) -> None:
        """Hosts by name (letters, digits, _), addressed in that order from
        .1 of a random 10.A.B.0/24, or of ``subnet`` ("10.1.2") if given."""
        names = list(hosts)
        for name in names:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_]{0,30}", name):
                raise ValueError("host name %r: letters, digits and _ only" % name)
        if len(set(names)) != len(names) or not 0 < len(names) < 250:
            raise ValueError("1 to 249 hosts, each named once: %s" % names)
        self.base = owned_name(secrets.token_hex(3))
        self.switch = self.base + "-switch"
        self._subnet = subnet
        self.hosts = {name: Host(self, name, "%s-h-%s" % (self.base, name), "")
                      for name in names}
        self.processes: list[subprocess.Popen] = []  # started by Host.run
        self._idents: list[tuple[int, int]] = []  # of the namespaces made
        self._made: list[str] = []
        self._restore: str | None = None  # the iptables-restore that works here
        self._cuts: set[tuple[str, str]] = set()
        self._loss: dict[tuple[str, str], float] = {}
        self._delays: dict[tuple[str, str], tuple[float, float]] = {}
        self._frozen: set[int] = set()
        self._proxies: dict[str, _Proxy] = {}
        self._applied: dict[str, str] = {}  # host -> its rules as last restored
        self._old_sigterm = None
        self.closed = False

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __enter__(self) -> Network:
        cleanup_leftovers()
        if threading.current_thread() is threading.main_thread():
            self._old_sigterm = signal.signal(signal.SIGTERM, _terminate)
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _netns(self, *names: str) -> None:
        run([tool("ip"), "-batch", "-"], input="".join("netns add %s\n" % n for n in names))
        self._made += names
        self._idents += [ident(os.path.join(RUN_NETNS, n)) for n in names]

    def _build(self) -> None:
        ip = tool("ip")
        subnet = self._subnet or _pick_subnet()
        self._netns(self.switch)
        run([ip, "-n", self.switch, "-batch", "-"],
            input="link add br0 type bridge\nlink set br0 up\n")
        ports = []
        for i, host in enumerate(self.hosts.values()):
            host.address = "%s.%d" % (subnet, i + 1)
            self._netns(host.netns)
            run([ip, "-n", host.netns, "-batch", "-"], input=(
                "link set lo up\n"
                "link add eth0 type veth peer name p%d netns %s\n"
                "addr add %s/24 dev eth0\n"
                "link set eth0 up\n") % (i, self.switch, host.address))
            ports.append("link set p%d master br0 up\n" % i)
            self._iptables(host, _CHAINS, noflush=False)
        run([ip, "-n", self.switch, "-batch", "-"], input="".join(ports))

    def _iptables(self, host: Host, rules: str, noflush: bool = True) -> None:
        """iptables-restore ``rules`` in ``host`` (the first variant that
        works in a namespace, found with the chains of the first host)."""
        options = ["--noflush"] if noflush else []
        if self._restore is not None:
            run(host.argv([self._restore, *options]), input=rules)
            return
        failures = []
        for name in filter(tool, _RESTORES):
            try:
                run(host.argv([tool(name), *options]), input=rules)
            except NetError as e:
                failures.append(str(e))
                continue
            self._restore = tool(name)
            return
        raise NetError("no iptables-restore works in a namespace: %s" % failures)

    def close(self) -> None:
        """Tear everything down (idempotent)."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        try:
            for proc in self.processes:  # some may not be in their namespace yet
                if proc.poll() is None:
                    proc.kill()
            destroy(self._made)
            for proc in self.processes:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass  # listed by remains()
                for pipe in (proc.stdin, proc.stdout, proc.stderr):
                    if pipe is not None:
                        pipe.close()
        finally:
            if self._old_sigterm is not None and \
                    threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, self._old_sigterm)

    def remains(self) -> list[str]:
        """What is left of this network: namespaces, processes in them,
        processes started that did not exit.  Empty once closed."""
        left = ["namespace " + n for n in netns_names() if n.startswith(self.base)]
        left += ["process %d in a namespace" % pid for pid in pids_in(self._idents)]
        left += ["process %d started here" % p.pid for p in self.processes if p.poll() is None]
        return left

    # -- faults -----------------------------------------------------------------
    def _name(self, host: str | Host) -> str:
        name = host.name if isinstance(host, Host) else host
        if name not in self.hosts:
            raise KeyError("no host %r" % name)
        return name

    def links(self, target) -> list[tuple[str, str]]:
        """The directed links of a target: a (src, dst) pair, or a host's
        links both ways with every other host."""
        if isinstance(target, tuple):
            src, dst = (self._name(h) for h in target)
            return [(src, dst)]
        name = self._name(target)
        others = [h for h in self.hosts if h != name]
        return [(name, o) for o in others] + [(o, name) for o in others]

    def cut(self, src: str | Host, dst: str | Host) -> None:
        """Drop every packet from src to dst."""
        self._cuts.update(self.links((src, dst)))
        self._apply()

    def partition(self, group_a: Iterable, group_b: Iterable) -> None:
        """Drop every packet between a host of group_a and one of group_b."""
        a, b = [self._name(h) for h in group_a], [self._name(h) for h in group_b]
        if set(a) & set(b):
            raise ValueError("a host on both sides: %s" % sorted(set(a) & set(b)))
        self._cuts.update(link for x in a for y in b for link in ((x, y), (y, x)))
        self._apply()

    def isolate(self, host: str | Host) -> None:
        """Cut host from every other host, both ways."""
        self._cuts.update(self.links(host))
        self._apply()

    def loss(self, target, percent: float) -> None:
        """Drop ``percent`` % of the packets of the target's links."""
        for link in self.links(target):
            if percent > 0:
                self._loss[link] = min(percent, 100) / 100.0
            else:
                self._loss.pop(link, None)
        self._apply()

    def delay(self, target, ms: float, jitter_ms: float = 0) -> None:
        """Hold the TCP bytes of the target's links ms + uniform(0,
        jitter_ms) milliseconds (connections opened from now on)."""
        for link in self.links(target):
            if ms > 0 or jitter_ms > 0:
                self._delays[link] = (float(ms), float(jitter_ms))
            else:
                self._delays.pop(link, None)
        self._apply()

    def heal(self) -> None:
        """Every fault removed, every frozen process thawed."""
        self._cuts.clear()
        self._loss.clear()
        self._delays.clear()
        self._apply()
        for pid in list(self._frozen):
            self.thaw(pid)

    def freeze(self, process) -> None:
        """SIGSTOP a process: a Popen, a LocalCluster node or a pid."""
        pid = _pid(process)
        os.kill(pid, signal.SIGSTOP)
        self._frozen.add(pid)

    def thaw(self, process) -> None:
        """SIGCONT a process frozen by freeze()."""
        pid = _pid(process)
        self._frozen.discard(pid)
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass

    def _apply(self) -> None:
        """Make every host's rules and proxy match the faults."""
        if self.closed:
            raise NetError("the network is closed")
        for name, host in self.hosts.items():
            delays = {}  # peer address -> (up, down) for connections host opens
            for other in self.hosts.values():
                up, down = self._delays.get((name, other.name)), self._delays.get((other.name, name))
                if up or down:
                    delays[other.address] = (up or (0, 0), down or (0, 0))
            proxy = self._proxies.get(name)
            if delays and proxy is None:
                proxy = self._proxies[name] = _Proxy(host)
            if proxy is not None:
                proxy.configure(delays)
            rules = ["*filter", "-F " + FAULTS]
            for src, dst in sorted(self._cuts):
                if dst == name:
                    rules.append("-A %s -i eth0 -s %s -j DROP" % (FAULTS, self.hosts[src].address))
            for (src, dst), p in sorted(self._loss.items()):
                if dst == name:
                    rules.append("-A %s -i eth0 -s %s -m statistic --mode random --probability"
                                 " %.6f -j DROP" % (FAULTS, self.hosts[src].address, p))
            rules += ["COMMIT", "*nat", "-F " + DELAYS]
            rules += ["-A %s -d %s -p tcp -m mark ! --mark %#x -j REDIRECT --to-ports %d"
                      % (DELAYS, address, MARK, proxy.port) for address in sorted(delays)]
            text = "\n".join(rules + ["COMMIT", ""])
            if self._applied.get(name) != text:
                self._iptables(host, text)
                self._applied[name] = text
