"""Partition table administration requested through neoctl (via the admin
node): ``neoctl tweak [-n] [NID...]`` and ``neoctl set replicas N``.

Functions take the :class:`~neozodb.master.app.MasterApp` (in its asyncio
loop) and raise :class:`~neozodb.net.connection.Denied` to refuse; the
AdminHandler answers.  The layout itself is computed by the pure
:mod:`neozodb.master.tweak`.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from neozodb.master.tweak import plan_tweak
from neozodb.net.connection import Denied
from neozodb.protocol import CellStates, ClusterStates, NodeStates, NodeTypes, nid_str
from neozodb.pt import PartitionTable

if TYPE_CHECKING:
    from neozodb.master.app import MasterApp

log = logging.getLogger("neozodb.master")


def _check_running(app: MasterApp) -> None:
    if app.cluster_state is not ClusterStates.RUNNING or app.stopping or app.pt is None:
        raise Denied("cluster is %s, not RUNNING" % app.cluster_state.name)


def _listed(nids: list[str]) -> str:
    return ", ".join(nids)


def tweak_partition_table(app: MasterApp, dry_run: bool, nids) -> tuple[bool, list]:
    """Rebalance the table over the running storages, draining ``nids``.

    Returns ``(changed, rows)``: whether the table changes (or would, with
    ``dry_run``) and the resulting table as wire rows.  Without ``dry_run``
    the changes are applied and broadcast.  Refused unless the cluster is
    RUNNING, if a listed node is unknown or not a storage, if a storage
    holding cells is not running and not listed (a down node must be
    drained explicitly), or if the result would not be operational with the
    running storages.
    """
    _check_running(app)
    pt = app.pt
    drop = set()
    for nid in nids:
        node = app.nm.get(nid)
        if node is None and nid != app.nid:  # (the master is not in its registry)
            raise Denied("unknown node: %s" % nid_str(nid))
        if node is None or node.type is not NodeTypes.STORAGE:
            raise Denied("%s is not a storage node" % nid_str(nid))
        drop.add(nid)
    running = app.running_storage_nids()
    absent = sorted(pt.nids() - running - drop)
    if absent:
        described = []
        for nid in absent:
            node = app.nm.get(nid)
            state = node.state.name if node is not None else NodeStates.UNKNOWN.name
            described.append("%s (%s)" % (nid_str(nid), state))
        one = len(absent) == 1
        raise Denied("%s %s not running but hold%s cells: list %s to drain %s" % (
            _listed(described), "is" if one else "are", "s" if one else "",
            "it" if one else "them", "it" if one else "them"))
    # Storages that may hold cells: running ones (in the table, or added);
    # pending ones are not RUNNING, so they are left out.
    nodes = running - drop
    topology = {node.nid: node.devpath for node in app.nm.storages() if node.devpath}
    try:
        plan = plan_tweak(pt, nodes, drop, topology)
    except ValueError as e:
        raise Denied(str(e)) from None
    if plan.topology_ignored:
        log.warning("%s: tweak: the storages' topology (host, device) cannot be honoured with"
                    " balanced nodes; ignored", app.label)
    result = PartitionTable(pt.num_partitions, pt.num_replicas)
    result.load(pt.ptid, pt.num_replicas, pt.rows())
    if plan.changes:
        result.apply_changes(pt.ptid + 1, pt.num_replicas, plan.changes)
    if not result.operational(running):
        raise Denied("the partition table would not be operational with the running storages")
    if plan.changes and not dry_run:
        app.apply_pt_changes(plan.changes)
        log.info("%s: tweak%s: %d cell change(s), ptid %d", app.label,
                 " draining " + _listed([nid_str(nid) for nid in sorted(drop)]) if drop else "",
                 len(plan.changes), app.pt.ptid)
        app.check_operational()
        app.changed()
    rows = [[(nid, CellStates(state)) for nid, state in row] for row in result.rows()]
    return bool(plan.changes), rows


def set_num_replicas(app: MasterApp, num_replicas: int) -> None:
    """Change the wanted number of replicas per partition.

    The table id is bumped and the new count broadcast (storages persist
    it), but no cell moves: ``neoctl tweak`` then adds or removes cells.
    """
    if num_replicas < 0:
        raise Denied("invalid number of replicas: %d (must be 0 or more)" % num_replicas)
    _check_running(app)
    app.num_replicas = num_replicas  # for a table made from scratch
    if num_replicas == app.pt.num_replicas:
        return
    previous = app.pt.num_replicas
    app.apply_pt_changes([], replicas=num_replicas)
    log.info("%s: replicas %d -> %d, ptid %d", app.label, previous, num_replicas, app.pt.ptid)
