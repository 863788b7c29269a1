"""TLS with mutual authentication on real node processes: who gets in,
who is refused (and how the refusal is logged), TLS 1.2 as NEO speaks it,
neoctl and neomigrate with certificates, rotation and revocation by
SIGHUP, and bad certificate files at start."""
from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys

import pytest
import transaction
import ZODB
from cryptography import x509
from ZODB.FileStorage import FileStorage

from neozodb.cli.cluster import LocalCluster, wait_until
from neozodb.client import NEOStorageError, Storage
from neozodb.ctl.neoctl import NeoCtl
from neozodb.net import certs
from neozodb.net.tls import load_contexts
from neozodb.protocol import HANDSHAKE, ClusterStates, Packets
from wire import storage_address

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    c = LocalCluster(str(tmp_path_factory.mktemp("tls") / "cluster"), name="tls", storages=2,
                     replicas=1, partitions=4, tls=True)
    c.start_or_kill(wait=60)
    try:
        yield c
    finally:
        c.kill()


def _commit(kwargs: dict, key: str, value) -> None:
    db = ZODB.DB(Storage(**kwargs))
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        conn.root()[key] = value
        tm.commit()
    finally:
        db.close()


def _read(kwargs: dict, key: str):
    db = ZODB.DB(Storage(**kwargs))
    try:
        return db.open().root().get(key)
    finally:
        db.close()


def _log_has(cluster: LocalCluster, node: str, pattern: str, timeout: float = 15.0) -> str:
    """Wait until node's log has a line matching ``pattern``; return it."""
    def found():
        with open(cluster.nodes[node].logfile, encoding="utf-8", errors="replace") as f:
            for line in f:
                if re.search(pattern, line):
                    return line
        return None
    return wait_until(found, timeout, "%r in %s's log" % (pattern, node))


def _client_context(ca: str, cert: str | None = None, key: str | None = None,
                    maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A client context built by hand (not checked like a node's): what a
    peer with the wrong credentials would use."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(ca)
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    if maximum is not None:
        ctx.maximum_version = maximum
    return ctx


def _handshake(address, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    sock = socket.create_connection(address, timeout=10)
    try:
        return ctx.wrap_socket(sock)
    except BaseException:
        sock.close()
        raise


def _refused(address, ctx: ssl.SSLContext) -> bool:
    """The node refuses this peer: the handshake fails, or (TLS 1.3, where
    the client's certificate is checked after the client finished) the
    connection ends before anything is read."""
    try:
        s = _handshake(address, ctx)
    except (ssl.SSLError, ConnectionError):
        return True
    with s:
        s.sendall(HANDSHAKE)
        try:
            return s.recv(100) == b""
        except (ssl.SSLError, ConnectionError):
            return True


def _local_port(sock) -> str:
    return "127.0.0.1:%d" % sock.getsockname()[1]


def test_cluster_over_tls(tls_cluster):
    kw = tls_cluster.client_kwargs()
    _commit(kw, "a", 1)
    assert _read(tls_cluster.client_kwargs("reader"), "a") == 1
    # between neozodb nodes, TLS 1.3
    files = tls_cluster.credentials("probe")
    with _handshake(tls_cluster.master_address, load_contexts(*files)[1]) as s:
        assert s.version() == "TLSv1.3"
        peer = x509.load_der_x509_certificate(s.getpeercert(binary_form=True))
        assert peer.subject.rfc4514_string() == "CN=M1"
    assert tls_cluster.all_up_to_date()


def test_tls12_peer(tls_cluster):
    """NEO's nodes negotiate TLS 1.2 only: a node must serve them."""
    ca, cert, key = tls_cluster.credentials("neo-like")
    ctx = _client_context(ca, cert, key, maximum=ssl.TLSVersion.TLSv1_2)
    ctl = NeoCtl(tls_cluster.admin_address, timeout=10, cluster=tls_cluster.name, tls=ctx)
    ctl.connect()
    try:
        assert ctl.conn.sock._obj.version() == "TLSv1.2"
        assert ctl.call(Packets.AskClusterState)[0] is ClusterStates.RUNNING
    finally:
        ctl.close()
    for node in ("M1", "S1"):
        address = tls_cluster.master_address if node == "M1" else storage_address(tls_cluster)
        with _handshake(address, ctx) as s:
            assert s.version() == "TLSv1.2"


def test_anonymous_neoctl_over_tls(tls_cluster):
    """NEO's neoctl never identifies: over TLS its certificate is the
    authentication, so the admin serves it."""
    files = tls_cluster.credentials("neoctl")
    ctl = NeoCtl(tls_cluster.admin_address, timeout=10, cluster=None,
                 tls=load_contexts(*files)[1])
    ctl.connect()
    try:
        assert ctl.call(Packets.AskClusterState)[0] is ClusterStates.RUNNING
    finally:
        ctl.close()


def test_plain_peer_refused_on_tls_port(tls_cluster):
    for node, address in (("M1", tls_cluster.master_address),
                          ("A1", tls_cluster.admin_address)):
        with socket.create_connection(address, timeout=10) as s:
            port = _local_port(s)
            s.sendall(HANDSHAKE)
            try:
                assert s.recv(100) == b""  # closed without a word
            except ConnectionResetError:  # closed with our handshake unread
                pass
        line = _log_has(tls_cluster, node, re.escape(port) + ".*not a TLS handshake")
        assert node in line
    _commit(tls_cluster.client_kwargs(), "after-plain", 2)  # still serving


def test_tls_peer_refused_on_plain_port(cluster, tmp_path):
    ca = certs.make_ca(str(tmp_path))
    cert, key, _ = certs.make_cert(ca, str(tmp_path), "client")
    ctx = _client_context(ca.path, cert, key)
    sock = socket.create_connection(cluster.master_address, timeout=10)
    port = _local_port(sock)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        ctx.wrap_socket(sock)
    sock.close()
    _log_has(cluster, "M1", re.escape(port) + ".*TLS handshake received on a plain port")
    assert cluster.cluster_state() == "RUNNING"


def test_certificates_refused(tls_cluster, tmp_path):
    ca, cert, key = tls_cluster.credentials("neoctl")
    other = certs.make_ca(str(tmp_path / "other"), "another CA")
    other_cert, other_key, _ = certs.make_cert(other, str(tmp_path / "other"), "intruder")
    address = tls_cluster.master_address
    # a certificate of another CA, the node's CA trusted
    assert _refused(address, _client_context(ca, other_cert, other_key))
    _log_has(tls_cluster, "M1", "TLS handshake failed")
    # no certificate at all
    assert _refused(address, _client_context(ca))
    # the client side refuses a node whose certificate is not of its CA
    with pytest.raises(ssl.SSLError):
        _handshake(address, _client_context(other.path, other_cert, other_key))
    # and a client Storage with credentials of another CA never gets in
    with pytest.raises((NEOStorageError, OSError)):
        Storage(master_nodes=tls_cluster.masters, name=tls_cluster.name,
                ca=other.path, cert=other_cert, key=other_key, connect_timeout=3)
    _commit(tls_cluster.client_kwargs(), "after-refusals", 3)


def test_neoctl_and_neomigrate_with_certificates(tls_cluster, tmp_path):
    result = tls_cluster.run_neoctl("print", "cluster")
    assert result.returncode == 0, result.stderr
    assert "RUNNING" in result.stdout
    # without certificates: one line, no traceback
    plain = subprocess.run([sys.executable, "-m", "neozodb.ctl.neoctl", "-c", tls_cluster.name,
                            "-a", "%s:%d" % tls_cluster.admin_address, "print", "cluster"],
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode == 1
    assert "Traceback" not in plain.stderr and len(plain.stderr.splitlines()) == 1
    # a FileStorage copied into the TLS cluster
    path = str(tmp_path / "src.fs")
    db = ZODB.DB(FileStorage(path))
    with db.transaction() as conn:
        conn.root()["migrated"] = "yes"
    db.close()
    ca, cert, key = tls_cluster.credentials("neomigrate")
    # into a fresh cluster: a copy needs an empty destination
    dest = LocalCluster(str(tmp_path / "dest"), name="dest", storages=1, replicas=0,
                        partitions=2, tls=True)
    dest._ca, dest._issued = tls_cluster._ca, {}  # the same CA: one set of tool credentials
    dest.start_or_kill(wait=60)
    try:
        out = subprocess.run([sys.executable, "-m", "neozodb.cli.migrate", "-c", "dest", "-q",
                              "--ca", ca, "--cert", cert, "--key", key, path, dest.masters],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert _read(dest.client_kwargs(), "migrated") == "yes"
    finally:
        dest.kill()


def _serial(address, ctx) -> int:
    with _handshake(address, ctx) as s:
        return x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number


def test_rotation_by_sighup(tls_cluster, tmp_path):
    files = tls_cluster.credentials("probe")
    ctx = load_contexts(*files)[1]
    address = tls_cluster.master_address
    before = _serial(address, ctx)
    # a client connected before the rotation
    db = ZODB.DB(Storage(**tls_cluster.client_kwargs("long-lived")))
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        conn.root()["rotation"] = 0
        tm.commit()
        master_conn = db.storage.app.master
        # the master's certificate renewed in place, then SIGHUP
        directory = os.path.dirname(tls_cluster.credentials("M1")[1])
        new_cert, new_key, serial = certs.make_cert(tls_cluster._ca, str(tmp_path), "M1")
        os.replace(new_cert, os.path.join(directory, "M1.crt"))
        os.replace(new_key, os.path.join(directory, "M1.key"))
        tls_cluster.nodes["M1"].signal(signal.SIGHUP)
        wait_until(lambda: _serial(address, ctx) == serial, 15, "the renewed certificate")
        assert serial != before
        _log_has(tls_cluster, "M1", "TLS certificate files reloaded")
        # connections made before are kept
        conn.root()["rotation"] = 1
        tm.commit()
        assert db.storage.app.master is master_conn and not master_conn.closed
    finally:
        db.close()
    assert _read(tls_cluster.client_kwargs(), "rotation") == 1
    # files that do not belong together: refused, the previous ones kept
    key_file = os.path.join(directory, "M1.key")
    with open(key_file, "rb") as f:
        good_key = f.read()
    with open(tls_cluster.credentials("probe")[2], "rb") as f, open(key_file, "wb") as out:
        out.write(f.read())
    try:
        tls_cluster.nodes["M1"].signal(signal.SIGHUP)
        _log_has(tls_cluster, "M1", "TLS files not reloaded, keeping the previous ones")
        assert _serial(address, ctx) == serial
    finally:
        with open(key_file, "wb") as out:
            out.write(good_key)


def test_revocation_by_crl(tmp_path):
    c = LocalCluster(str(tmp_path / "cluster"), name="crl", storages=1, replicas=0,
                     partitions=2, tls=True)
    c.start_or_kill(wait=60)
    try:
        good = c.client_kwargs("good")
        bad = c.client_kwargs("bad")
        _commit(bad, "x", 1)  # not revoked yet
        serial = x509.load_pem_x509_certificate(open(bad["cert"], "rb").read()).serial_number
        # the revoked client still has the CA file of before (with the new
        # one it would refuse its own certificate at once)
        old_ca = str(tmp_path / "old-ca.crt")
        with open(bad["ca"], "rb") as f, open(old_ca, "wb") as out:
            out.write(f.read())
        bad["ca"] = old_ca
        certs.revoke(c._ca, [serial])
        for node in c.nodes.values():
            node.signal(signal.SIGHUP)
        for name in c.nodes:
            _log_has(c, name, "TLS certificate files reloaded")
        with pytest.raises((NEOStorageError, OSError)):
            Storage(**bad, connect_timeout=3)
        _log_has(c, "M1", "TLS handshake failed: .*revoked")
        assert _read(good, "x") == 1
    finally:
        c.kill()


def _start_master(tmp_path, *tls_args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neozodb.cli.master", "-c", "bad",
                           "-b", "127.0.0.1:0", *tls_args], capture_output=True, text=True,
                          timeout=60, cwd=str(tmp_path))


def test_bad_certificate_files_exit_2(tmp_path):
    ca = certs.make_ca(str(tmp_path / "ca"))
    cert, key, _ = certs.make_cert(ca, str(tmp_path / "ca"), "M1")
    other = certs.make_ca(str(tmp_path / "other"), "other CA")
    other_cert, other_key, _ = certs.make_cert(other, str(tmp_path / "other"), "M1")
    cases = {
        "key of another certificate": ["--ca", ca.path, "--cert", cert, "--key", other_key],
        "certificate of another CA": ["--ca", ca.path, "--cert", other_cert, "--key", other_key],
        "missing file": ["--ca", ca.path, "--cert", cert, "--key", str(tmp_path / "nokey")],
        "CA alone": ["--ca", ca.path],
        "not PEM": ["--ca", ca.path, "--cert", str(tmp_path / "ca"), "--key", key],
    }
    for what, args in cases.items():
        result = _start_master(tmp_path, *args)
        assert result.returncode == 2, (what, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, (what, result.stderr)
        assert "TLS" in result.stderr and "Traceback" not in result.stderr, what


def test_neosimple_tls(tmp_path):
    """neosimple --tls: a throw-away CA and certificates, and the URI and
    neoctl command line it prints work as they are."""
    import shlex

    import zodburi
    proc = subprocess.Popen([sys.executable, "-m", "neozodb.cli.simple", "--tls", "--storages",
                             "1", "--replicas", "0", "--partitions", "2", str(tmp_path / "c")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:  # ends when the cluster runs, or neosimple exits
            lines.append(line)
            if line.startswith("logs and databases"):
                break
        uri = next(x.split(": ", 1)[1].strip() for x in lines if x.startswith("connect with"))
        ctl = next(x for x in lines if x.startswith("neoctl "))
        assert uri.startswith("neo://") and "ca=" in uri and "--ca" in ctl
        out = subprocess.run([sys.executable, "-m", "neozodb.ctl.neoctl",
                              *shlex.split(ctl)[1:]], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0 and "S1" in out.stdout, out.stderr
        factory, dbkw = zodburi.resolve_uri(uri)
        db = ZODB.DB(factory(), **dbkw)
        try:
            with db.transaction() as conn:
                conn.root()["simple"] = "tls"
        finally:
            db.close()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0


def test_exposed_key_is_reported(tmp_path):
    ca = certs.make_ca(str(tmp_path))
    cert, key, _ = certs.make_cert(ca, str(tmp_path), "M1")
    os.chmod(key, 0o644)
    log = tmp_path / "m.log"
    proc = subprocess.Popen([sys.executable, "-m", "neozodb.cli.master", "-c", "k",
                             "-b", "127.0.0.1:0", "-l", str(log), "--ca", ca.path,
                             "--cert", cert, "--key", key])
    try:
        wait_until(lambda: log.exists() and "readable by others than its owner"
                   in log.read_text(), 30, "the warning about the key's mode")
    finally:
        proc.terminate()
        proc.wait(30)


def test_handshake_flood_is_capped(tmp_path):
    """Connections that never send their ClientHello hold a descriptor
    each until the handshake timeout: past --max-connections they are
    refused at once, and the node serves again once they are gone."""
    c = LocalCluster(str(tmp_path / "cluster"), name="flood", storages=1, replicas=0,
                     partitions=2, tls=True, node_args=["--max-connections", "20"])
    c.start_or_kill(wait=60)
    flood = []
    try:
        for _ in range(60):
            flood.append(socket.create_connection(c.master_address, timeout=10))
        _log_has(c, "M1", r"TLS handshakes in progress \(cap 20\)")
        for s in flood:
            s.close()
        flood.clear()
        _commit(c.client_kwargs(), "after-flood", 1)
        assert c.nodes["M1"].running
    finally:
        for s in flood:
            s.close()
        c.kill()
