"""Where the master's invalidations go (``Commits._invalidate``): every
other client gets them with the next thing the master sends it
(``notify_soon``, tests/unit/test_notify_soon.py), secondaries at once,
the committer none (its answer tells it)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from neozodb.master.commits import Commits
from neozodb.protocol import NodeTypes, Packets, p64

pytestmark = pytest.mark.timeout(30)

TID = p64(0x40D80E8329F8D5F)
OID = p64(7)


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, object, tuple]] = []

    def notify(self, packet, *args) -> None:
        self.sent.append(("now", packet, args))

    def notify_soon(self, packet, *args) -> None:
        self.sent.append(("soon", packet, args))


def _peer(node_type, nid: int) -> SimpleNamespace:
    return SimpleNamespace(type=node_type, nid=nid, conn=Recorder(), connected=True)


class Master(Commits):
    def __init__(self, peers) -> None:
        self.nm = peers

    @staticmethod
    def follows_table(node) -> bool:
        return True


def test_other_clients_get_invalidations_with_their_next_output():
    committer = _peer(NodeTypes.CLIENT, -1)
    idle, busy = _peer(NodeTypes.CLIENT, -2), _peer(NodeTypes.CLIENT, -3)
    secondary = _peer(NodeTypes.MASTER, 2)
    storage = _peer(NodeTypes.STORAGE, 1)
    master = Master([committer, idle, busy, secondary, storage])
    master._invalidate(committer.conn, [(TID, [OID]), (p64(0x40D80E8329F8D60), [])])
    expected = [("soon", Packets.InvalidateObjects, (TID, [OID]))]
    assert idle.conn.sent == expected
    assert busy.conn.sent == expected
    # secondaries mirror every TID, at once; storages and the committer: nothing
    assert secondary.conn.sent == [
        ("now", Packets.InvalidateObjects, (TID, [OID])),
        ("now", Packets.InvalidateObjects, (p64(0x40D80E8329F8D60), []))]
    assert storage.conn.sent == [] and committer.conn.sent == []
