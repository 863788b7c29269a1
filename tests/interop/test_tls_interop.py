"""One TLS cluster of NEO's nodes and ours: NEO's nodes negotiate TLS 1.2
with the certificates of our throw-away CA (net/certs.py); commits through
either client, over TLS, replicate across kinds and read back on the
other side; a plain node of either kind is kept out."""
from __future__ import annotations

import os
import signal
import sqlite3

import pytest
import transaction
import ZODB
from neopeer import MixedCluster, neo_client_roundtrip, neo_neoctl

from neozodb.cli.cluster import wait_until
from neozodb.client import Storage

pytestmark = pytest.mark.timeout(240)


class TLSMixedCluster(MixedCluster):
    """MixedCluster over TLS: NEO's nodes get the same --ca/--cert/--key
    options as ours (LocalCluster adds them to our nodes' argv)."""

    def __init__(self, directory: str, **kw) -> None:
        super().__init__(directory, tls=True, **kw)

    def master_argv(self, name, address):
        argv = super().master_argv(name, address)
        return argv + self.tls_args(name) if name in self.neo else argv

    def storage_argv(self, i):
        argv = super().storage_argv(i)
        return argv + self.tls_args("S%d" % i) if "S%d" % i in self.neo else argv

    def admin_argv(self):
        argv = super().admin_argv()
        return argv + self.tls_args("A1") if "A1" in self.neo else argv

    def neo_neoctl(self, *words, timeout=60.0):
        return neo_neoctl(self.admin_address, *self.tls_args("neo-neoctl"), *words,
                          timeout=timeout)

    def neo_log_has(self, node: str, text: str) -> bool:
        """NEO's log (an SQLite database) has a message containing text."""
        db = sqlite3.connect(os.path.join(self.directory, node + ".neolog"))
        try:
            return db.execute("SELECT 1 FROM log WHERE instr(msg, ?)", (text,)).fetchone() \
                is not None
        finally:
            db.close()

    def log_has(self, node: str, text: str) -> bool:
        with open(self.nodes[node].logfile, encoding="utf-8", errors="replace") as f:
            return text in f.read()


def _cluster_running(c: TLSMixedCluster) -> bool:
    if "A1" in c.neo:
        out = c.neo_neoctl("print", "cluster")
        return out.returncode == 0 and out.stdout.strip() == "RUNNING"
    return c.cluster_state() == "RUNNING"


@pytest.mark.parametrize("neo", [("M1", "S2"), ("S1", "A1"), ("M1", "S1", "A1")],
                         ids=lambda n: "-".join(n))
def test_tls_mixed_cluster(tmp_path, neo):
    c = TLSMixedCluster(str(tmp_path / "c"), neo=neo, name="tlsmix", storages=2, replicas=1,
                        partitions=4)
    try:
        c.start(wait=0)
        wait_until(lambda: _cluster_running(c), 90, "the TLS cluster to run")
        # ours writes, NEO's reads (and writes), each over TLS
        db = ZODB.DB(Storage(**c.client_kwargs()))
        try:
            tm = transaction.TransactionManager()
            conn = db.open(tm)
            conn.root()["ours"] = "1"
            tm.commit()
        finally:
            db.close()
        ca, cert, key = c.credentials("neo-client")
        seen = neo_client_roundtrip(c, {"ca": ca, "cert": cert, "key": key}, theirs="2")
        assert seen == {"ours": "1", "theirs": "2"}
        db = ZODB.DB(Storage(**c.client_kwargs("reader")))
        try:
            root = db.open().root()
            assert (root["ours"], root["theirs"]) == ("1", "2")
        finally:
            db.close()
        if "A1" not in c.neo:
            wait_until(c.all_up_to_date, 60, "every cell up to date")
        for name in neo:  # NEO's nodes did speak TLS 1.2 with ours
            # NEO keeps its log in memory until SIGRTMIN (or a warning)
            c.nodes[name].signal(signal.SIGRTMIN)
            wait_until(lambda n=name: c.neo_log_has(n, "TLS 1.2 enabled")
                       and c.neo_log_has(n, "SSL handshake done"), 30,
                       "%s's log to show TLS 1.2" % name)
    finally:
        c.kill()


def test_plain_neo_node_kept_out(tmp_path):
    """A NEO storage started without certificates never joins our TLS
    cluster, and our master logs why."""
    c = TLSMixedCluster(str(tmp_path / "c"), neo=("S2",), name="tlsmix", storages=2,
                        replicas=1, partitions=4)
    plain = c.storage_argv
    c.storage_argv = lambda i: plain(i)[:-6] if i == 2 else plain(i)  # S2 without its TLS
    try:
        c.start(wait=0)
        wait_until(lambda: c.log_has("M1", "not a TLS handshake"), 60,
                   "the master to refuse the plain NEO storage")
        assert c.node_state("S2") is None
    finally:
        c.kill()

