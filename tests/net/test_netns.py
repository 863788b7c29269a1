"""The network harness itself (netns.py): hosts talk, each fault does what
it says, and nothing is left behind however the run ends.

A datagram or request that must NOT arrive is waited for during WINDOW
seconds (a bounded wait that must expire); everything that must arrive is
waited for with a bound and fails the test if it does not."""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from netns import Network, cleanup_leftovers, netns_names, pids_in

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("netns_ok")]

WINDOW = 0.5  # seconds a blocked datagram or answer is waited for
BOUND = 10.0  # seconds what must arrive may take

# A TCP echo server: python - ADDRESS PORT; prints "ready" once listening.
ECHO = textwrap.dedent("""
    import socket, sys, threading
    server = socket.create_server((sys.argv[1], int(sys.argv[2])))
    print("ready", flush=True)
    def serve(conn):
        while data := conn.recv(4096):
            conn.sendall(data)
    while True:
        threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()
""")
PORT = 7000
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # not in Python's socket


def echo_server(host) -> subprocess.Popen:
    proc = host.run([sys.executable, "-c", ECHO, host.address, str(PORT)],
                    stdout=subprocess.PIPE, text=True)
    assert select.select([proc.stdout], [], [], BOUND)[0], "echo server did not start"
    assert proc.stdout.readline() == "ready\n"
    return proc


def connect(src, dst, timeout: float = BOUND) -> socket.socket:
    """A TCP connection from host src to dst's echo server."""
    sock = src.socket()
    sock.settimeout(timeout)
    sock.connect((dst.address, PORT))
    sock.settimeout(BOUND)
    return sock


def round_trip(sock: socket.socket, data: bytes = b"ping") -> float:
    start = time.monotonic()
    sock.sendall(data)
    assert sock.recv(100) == data
    return time.monotonic() - start


def udp(host) -> socket.socket:
    sock = host.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    sock.bind((host.address, 0))
    sock.settimeout(BOUND)
    return sock


def passes(src: socket.socket, dst: socket.socket, data: bytes) -> None:
    src.sendto(data, dst.getsockname())
    assert dst.recvfrom(100)[0] == data


def blocked(src: socket.socket, dst: socket.socket, count: int = 20) -> None:
    for _ in range(count):
        src.sendto(b"lost", dst.getsockname())
    dst.settimeout(WINDOW)
    try:
        with pytest.raises(TimeoutError):
            dst.recvfrom(100)
    finally:
        dst.settimeout(BOUND)


def test_hosts_talk_over_tcp():
    with Network(["a", "b"]) as net:
        a, b = net["a"], net["b"]
        assert a.address != b.address
        assert a.address.rsplit(".", 1)[0] == b.address.rsplit(".", 1)[0]
        echo_server(b)
        assert round_trip(connect(a, b)) < 1
        # a process started in a host has the host's address, and only it
        out = a.call(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
        assert a.address in out and b.address not in out
    assert not net.remains()


def test_cut_is_one_way_and_heal_restores():
    with Network(["a", "b"]) as net:
        a, b = udp(net["a"]), udp(net["b"])
        passes(a, b, b"before")
        net.cut("a", "b")
        passes(b, a, b"b to a")
        blocked(a, b)
        with pytest.raises(TimeoutError):  # TCP's handshake needs both ways
            connect(net["b"], net["a"], timeout=WINDOW)
        net.heal()
        passes(a, b, b"after")  # the first to arrive: none of the cut ones did


def test_partition_and_isolate():
    with Network(["a", "b", "c"]) as net:
        echo_server(net["b"])
        established = connect(net["a"], net["b"])
        round_trip(established)
        ua, ub, uc = udp(net["a"]), udp(net["b"]), udp(net["c"])
        net.partition(["a"], ["b", "c"])
        blocked(ua, ub)
        blocked(ub, ua)
        blocked(uc, ua)
        passes(ub, uc, b"same side")
        with pytest.raises(TimeoutError):
            connect(net["a"], net["b"], timeout=WINDOW)
        established.sendall(b"during")
        established.settimeout(WINDOW)
        with pytest.raises(TimeoutError):
            established.recv(100)
        net.heal()
        established.settimeout(BOUND)  # TCP retransmits what was dropped
        assert established.recv(100) == b"during"
        passes(ua, ub, b"healed")
        net.isolate("c")
        blocked(uc, ub)
        blocked(ua, uc)
        passes(ua, ub, b"a and b still")
        round_trip(established)


def test_loss():
    with Network(["a", "b"]) as net:
        a, b = udp(net["a"]), udp(net["b"])
        net.loss(("a", "b"), 100)
        blocked(a, b)
        passes(b, a, b"the other way")  # one direction only
        net.loss(("a", "b"), 0)
        passes(a, b, b"restored")
        net.loss("a", 30)  # both ways
        for src, dst in ((a, b), (b, a)):
            sent = 400
            for i in range(sent):
                src.sendto(b"%d" % i, dst.getsockname())
            net.loss("a", 0)
            src.sendto(b"end", dst.getsockname())  # after the last, which it follows
            got = set()
            while (data := dst.recvfrom(100)[0]) != b"end":
                got.add(data)
            net.loss("a", 30)
            # 30% of 400: 120 lost on average, 9 of standard deviation
            assert 200 <= len(got) <= 360, len(got)


def test_delay():
    with Network(["a", "b"]) as net:
        a, b = net["a"], net["b"]
        echo_server(b)
        before = connect(a, b)
        net.delay("a", 50, 10)  # both ways: a round trip takes 100 to 120 ms
        delayed = connect(a, b)
        times = [round_trip(delayed) for _ in range(5)]
        assert all(0.1 <= t < 1.0 for t in times), times
        assert round_trip(before) < 0.05  # opened before: not through the proxy
        net.delay(("b", "a"), 80)  # one way, for what b sends on a's connections
        times = [round_trip(connect(a, b)) for _ in range(3)]
        assert all(0.13 <= t < 1.0 for t in times), times
        big = os.urandom(1 << 20)  # in order, whole
        delayed.sendall(big)
        got = b""
        while len(got) < len(big):
            got += delayed.recv(1 << 16)
        assert got == big
        net.heal()
        assert min(round_trip(delayed) for _ in range(3)) < 0.05  # kept, undelayed
        assert round_trip(connect(a, b)) < 0.05


def test_freeze_and_thaw():
    with Network(["a", "b"]) as net:
        server = echo_server(net["b"])
        sock = connect(net["a"], net["b"])
        net.freeze(server)
        sock.sendall(b"frozen")
        sock.settimeout(WINDOW)
        with pytest.raises(TimeoutError):
            sock.recv(100)
        sock.settimeout(BOUND)
        net.thaw(server)
        assert sock.recv(100) == b"frozen"
        net.freeze(server)
        net.heal()  # thaws too
        assert round_trip(sock) < 1


# A Network in a process of its own: prints its names and what it started,
# then waits for its end (stdin closed, SIGTERM, SIGKILL).
OWNER = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    from netns import Network
    with Network(["a", "b"]) as net:
        sleeper = net["a"].run(["sleep", "300"])
        net.delay("a", 10)  # a proxy too
        print(json.dumps({"base": net.base, "idents": net._idents,
                          "pids": [p.pid for p in net.processes]}), flush=True)
        sys.stdin.read()
""")


def owner() -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-c", OWNER, os.path.dirname(__file__)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert select.select([proc.stdout], [], [], BOUND * 2)[0], "the network did not start"
    info = json.loads(proc.stdout.readline())
    names = [n for n in netns_names() if n.startswith(info["base"])]
    assert len(names) == 3 and len(pids_in(map(tuple, info["idents"]))) == 3  # sleep, 2 proxies
    return proc, info


def gone(info: dict) -> bool:
    return (not [n for n in netns_names() if n.startswith(info["base"])]
            and not pids_in(map(tuple, info["idents"])))


def test_nothing_left_after_exit_or_sigterm():
    with Network(["a", "b"]) as net:
        proc = net["a"].run(["sleep", "300"])
        net.delay("b", 10)
        net.cut("a", "b")
        net.freeze(proc)
    assert proc.poll() is not None
    assert not net.remains()
    with pytest.raises(RuntimeError), Network(["a"]) as net:  # a failing test
        net["a"].run(["sleep", "300"])
        raise RuntimeError
    assert not net.remains()
    proc, info = owner()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(BOUND * 2) == 128 + signal.SIGTERM
    assert gone(info)


def test_cleanup_leftovers_of_a_killed_run():
    proc, info = owner()
    proc.kill()
    proc.wait(BOUND)
    assert not gone(info)  # a SIGKILLed owner leaves its network
    removed = cleanup_leftovers()
    assert sorted(n for n in removed if n.startswith(info["base"])) == sorted(
        info["base"] + s for s in ("-switch", "-h-a", "-h-b"))
    assert gone(info)
