"""One TLS cluster of NEO's nodes and ours: NEO's nodes negotiate TLS 1.2
with the certificates of our throw-away CA (net/certs.py); commits through
either client, over TLS, replicate across kinds and read back on the
other side; a plain node of either kind is kept out."""
from __future__ import annotations

import json
import os
import signal
import sqlite3

import pytest
import transaction
import ZODB
from neopeer import MixedCluster, neo_neoctl, run_neo_python

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


NEO_TLS_CLIENT = """
import json, sys, ZODB
from neo.client.Storage import Storage
masters, name, ca, cert, key = sys.argv[1:6]
db = ZODB.DB(Storage(master_nodes=masters, name=name, ca=ca, cert=cert, key=key))
try:
    with db.transaction() as conn:
        root = conn.root()
        for item in sys.argv[6:]:
            k, v = item.split("=", 1)
            root[k] = v
    with db.transaction() as conn:
        print(json.dumps({k: v for k, v in conn.root().items() if isinstance(v, str)}))
finally:
    db.close()
"""


def neo_tls_roundtrip(cluster: TLSMixedCluster, **values: str) -> dict:
    out = run_neo_python(NEO_TLS_CLIENT, cluster.masters, cluster.name,
                         *cluster.credentials("neo-client"),
                         *("%s=%s" % kv for kv in values.items()))
    if out.returncode:
        raise AssertionError("NEO's client failed:\n" + out.stderr[-3000:])
    return json.loads(out.stdout.splitlines()[-1])


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
        seen = neo_tls_roundtrip(c, theirs="2")
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

