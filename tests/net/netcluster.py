"""A neozodb cluster over a ``netns.Network``: each node in its own host,
listening on its host's address, started with its command line as
LocalCluster does (LocalCluster's argv, logs, start, stop and neoctl
queries are reused; only where processes run and which addresses they
use differ).

    hosts = NetCluster.host_names(masters=3, storages=3) + ["c1"]
    with Network(hosts) as net:
        cluster = NetCluster(net, directory, masters=3, storages=3)
        cluster.start()                       # RUNNING, or RuntimeError
        writer = cluster.client(net["c1"], "write", "w", stop_file, stdout=...)
        net.isolate("s2"); ...; net.heal()
        wait_until(cluster.all_up_to_date, 60)

Masters run in hosts m1..mN, storages in s1..sN, the admin in a1 (ports
MASTER_PORT, STORAGE_PORT, ADMIN_PORT: every host has its own address).
``neoctl`` runs inside the admin's host: ``run_neoctl`` (the command, used
to wait for a cluster state), ``ctl()`` (neoctl's API, its connection made
from within that host), so the admin is reached whatever the faults
between hosts.  Every node gets ``--keepalive`` (default 6 s)."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

from netns import Host, Network

from neozodb.cli.cluster import LocalCluster, NodeProcess
from neozodb.cli.config import format_address

MASTER_PORT, STORAGE_PORT, ADMIN_PORT = 2100, 2200, 2300
NETCLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "netclient.py")


class NetCluster(LocalCluster):
    def __init__(self, net: Network, directory: str, name: str = "netcluster",
                 masters: int = 3, storages: int = 3, replicas: int = 1, partitions: int = 12,
                 keepalive: float = 6, **kw) -> None:
        super().__init__(directory, name=name, storages=storages, replicas=replicas,
                         partitions=partitions, master_port=MASTER_PORT, admin_port=ADMIN_PORT,
                         node_args=["--keepalive", "%g" % keepalive], **kw)
        self.net = net
        self.keepalive = keepalive
        self.node_hosts: dict[str, Host] = {"A1": net["a1"]}
        self.node_hosts.update(("M%d" % i, net["m%d" % i]) for i in range(1, masters + 1))
        self.node_hosts.update(("S%d" % i, net["s%d" % i]) for i in range(1, storages + 1))
        self.master_addresses = [(net["m%d" % i].address, MASTER_PORT)
                                 for i in range(1, masters + 1)]
        self.master_address = self.master_addresses[0]
        self.admin_address = (net["a1"].address, ADMIN_PORT)
        self.host = None  # no node binds a common host

    @staticmethod
    def host_names(masters: int = 3, storages: int = 3) -> list[str]:
        """The hosts a NetCluster needs in its Network."""
        return (["m%d" % i for i in range(1, masters + 1)]
                + ["s%d" % i for i in range(1, storages + 1)] + ["a1"])

    @property
    def admin_host(self) -> Host:
        return self.node_hosts["A1"]

    def _node(self, name: str, argv: list[str]) -> NodeProcess:
        return super()._node(name, self.node_hosts[name].argv(argv))

    def storage_argv(self, i: int) -> list[str]:
        argv = super().storage_argv(i)
        argv[argv.index("-b") + 1] = format_address((self.net["s%d" % i].address, STORAGE_PORT))
        return argv

    def ctl(self):
        """neoctl's API, connected from within the admin's host."""
        return self.admin_host.within(functools.partial(LocalCluster.ctl, self))

    def run_neoctl(self, *words: str, address: str | None = None, env: dict | None = None,
                   timeout: float = 60.0) -> subprocess.CompletedProcess:
        """The ``neoctl`` command, run inside the admin's host."""
        addr = address or format_address(self.admin_address)
        return self.admin_host.call(
            [sys.executable, "-m", "neozodb.ctl.neoctl", "-c", self.name, "-a", addr,
             *self.tls_args("neoctl"), *words],
            capture_output=True, text=True, timeout=timeout, env=env)

    def cluster_state(self) -> str | None:
        """``neoctl print cluster`` (the command), None if it fails."""
        done = self.run_neoctl("--json", "print", "cluster", timeout=30)
        return json.loads(done.stdout)["cluster"] if done.returncode == 0 else None

    def client(self, host: Host, mode: str, key: str, arg: str, **popen_kw) -> subprocess.Popen:
        """netclient.py ``mode`` (write or check) in ``host``, with the
        cluster's keep-alive."""
        return host.run([sys.executable, NETCLIENT, mode, self.masters, self.name,
                         "%g" % self.keepalive, key, arg], **popen_kw)
