"""What each master of a NetCluster says it is, asked from within a host:
identify to it as an admin node would, and see how it answers.

- ``"primary"``: AcceptIdentification (a primary serving the cluster;
  one without a majority of the masters refuses, below);
- ``"secondary"``: NotPrimaryMaster naming a primary;
- ``"none"``: NotPrimaryMaster naming none (electing, or a primary that
  lost the majority of the masters);
- ``"unreachable"``: no connection or no answer within ``timeout``;
- ``"error: ..."``: any other refusal.

The probe is an admin identification on a connection closed at once: the
master registers an admin node, then forgets it."""
from __future__ import annotations

from neozodb.net.bootstrap import FollowsPrimary
from neozodb.net.connection import ConnectionClosed, RemoteError
from neozodb.net.threaded import ThreadedConnection
from neozodb.protocol import NodeTypes, Packets
from neozodb.protocol.features import ANNOUNCEMENT

PROBE_PORT = 9  # the admin address the probe announces (nothing listens there)


class _Probe(FollowsPrimary):
    """Takes NotPrimaryMaster (FollowsPrimary), ignores everything else."""

    def dispatch(self, conn, msg_id, packet, args) -> None:
        if packet is Packets.NotPrimaryMaster:
            self.NotPrimaryMaster(conn, msg_id, *args)

    def connection_lost(self, conn) -> None:
        pass


def _ask(address: tuple[str, int], own_host: str, cluster: str, timeout: float) -> str:
    conn = ThreadedConnection(address, _Probe(), "probe", keepalive=0)
    try:
        conn.connect(timeout=timeout)
    except OSError:
        return "unreachable"
    try:
        conn.call(Packets.RequestIdentification, NodeTypes.ADMIN, None,
                  (own_host.encode(), PROBE_PORT), cluster.encode(), None, ANNOUNCEMENT,
                  timeout=timeout)
        return "primary"
    except ConnectionClosed:
        if hasattr(conn, "known_masters"):
            return "none" if getattr(conn, "redirect", None) is None else "secondary"
        return "unreachable"
    except RemoteError as e:
        return "error: %s" % e
    finally:
        conn.close("probe done")


def master_role(host, address: tuple[str, int], cluster: str, timeout: float = 3.0) -> str:
    """What the master at ``address`` answers an identification made from
    ``host`` (a netns Host)."""
    return host.within(_ask, address, host.address, cluster, timeout)


def master_roles(cluster, timeout: float = 3.0) -> dict[str, str]:
    """{"M1": role, ...} for every master of a NetCluster, each asked from
    its own host: what it thinks it is, whatever the faults between hosts."""
    return {"M%d" % i: master_role(cluster.net["m%d" % i], address, cluster.name, timeout)
            for i, address in enumerate(cluster.master_addresses, 1)}


def primaries(roles: dict[str, str]) -> list[str]:
    return sorted(name for name, role in roles.items() if role == "primary")
