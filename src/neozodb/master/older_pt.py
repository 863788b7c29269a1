"""When the latest partition table is not operational with the storages
present (some are lost for good), start from an older one that is:
``neoctl print pt_history`` lists the tables the present storages
remember and what each is worth (master/older_tables.py computes it),
``neoctl recover_pt PTID`` makes one current (with a new ptid) and
truncates the database after the TID up to which it is complete, through
``neoctl truncate``'s machinery (master/truncation.py); recovery then goes
on by itself.  While recovery waits with a table that is not operational,
the master says so in its log.

Functions of the primary ``MasterApp``, in its event loop; the requests
come from an admin (feature ``older-pt``, protocol/features.py).
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from neozodb.master.older_tables import (
    History,
    OlderTable,
    check_history,
    older_table,
    older_tables,
)
from neozodb.net.connection import ConnectionClosed, Denied, HandlerError, RemoteError
from neozodb.protocol import (
    ClusterStates,
    ErrorCodes,
    NodeStates,
    NodeTypes,
    Packets,
    nid_str,
    p64,
    u64,
)
from neozodb.protocol.features import OLDER_PT
from neozodb.pt import PartitionTable
from neozodb.tid import neo_tid_time

if TYPE_CHECKING:
    from neozodb.master.app import MasterApp

log = logging.getLogger("neozodb.master")

#: Seconds a storage has to answer AskPartitionHistory.
ANSWER_TIMEOUT = 10.0
#: Seconds recovery waits with a table that is not operational with the
#: storages present before it says so (storages connect one by one).
STUCK_DELAY = 5.0

_tasks: set[asyncio.Future] = set()


def _names(nids) -> str:
    return " ".join(nid_str(nid) for nid in sorted(nids)) or "none"


def _present(app: MasterApp) -> set[int]:
    return {n.nid for n in app.nm.storages() if n.connected}


# -- the log line while recovery waits -------------------------------------------
def note_recovery(app: MasterApp, here: set[int]) -> None:
    """Recovery waits with a table: if it is not operational with the
    storages ``here`` and stays so for STUCK_DELAY seconds, say so once."""
    stuck = app._stuck
    if app.pt.operational(here):
        key = None
    else:
        key = (app.pt.ptid, frozenset(here))
    if stuck is not None and stuck[0] == key:
        return
    if stuck is not None:
        stuck[1].cancel()
    app._stuck = None
    if key is not None:
        handle = asyncio.get_running_loop().call_later(STUCK_DELAY, _log_stuck, app, key)
        app._stuck = (key, handle)


def _log_stuck(app: MasterApp, key: tuple) -> None:
    pt = app.pt
    here = {n.nid for n in app.nm.storages(NodeStates.PENDING) if n.connected}
    if app.cluster_state is not ClusterStates.RECOVERING or pt is None \
            or (pt.ptid, frozenset(here)) != key:
        return
    unreadable = [p for p in range(pt.num_partitions)
                  if not set(pt.readable_nids(p)) & here]
    missing = {nid for p in unreadable for nid in pt.readable_nids(p)}
    log.warning("%s: partition table %d is not operational with the storages present (%s):"
                " no readable copy of partitions %s, which only %s %s; waiting for %s. If %s"
                " lost for good: `neoctl print pt_history` lists older tables, `neoctl"
                " recover_pt PTID` starts from one", app.label, pt.ptid, _names(here),
                " ".join(map(str, unreadable)), _names(missing),
                "holds" if len(missing) == 1 else "hold", "it" if len(missing) == 1 else "them",
                "it is" if len(missing) == 1 else "they are")


def packed_after(packed: int) -> str:
    """What is lost besides: a pack went beyond the truncation."""
    return ("a pack up to %#x (%s) was applied since: the objects it deleted are lost"
            % (packed, neo_tid_time(packed)))


# -- requests from the admin --------------------------------------------------------
def serve(app: MasterApp, conn, msg_id: int, work) -> None:
    """Answer a request whose answer needs the storages' (``work()``, a
    coroutine returning a callable that answers); a refusal is an Error."""
    async def run() -> None:
        try:
            answer = await work()
        except HandlerError as e:
            conn.error(msg_id, e.code, str(e))
            return
        except Exception as e:  # a bug must not kill the master nor leave neoctl waiting
            log.exception("%s: older partition tables: %s", app.label, e)
            conn.error(msg_id, ErrorCodes.NOT_READY, "internal error: %s" % e)
            return
        answer()
    task = asyncio.ensure_future(run())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


async def gather(app: MasterApp) -> tuple[int, dict[int, History]]:
    """The histories of the connected storages that keep one."""
    if app.pt is None:
        raise Denied("no partition table yet")
    num_partitions = app.pt.num_partitions
    nodes = [n for n in app.nm.storages() if n.connected and OLDER_PT in n.conn.peer_features]
    conns = {n.nid: n.conn for n in nodes}  # (node.conn is None once lost)

    async def one(node):
        try:
            return await asyncio.wait_for(conns[node.nid].ask(Packets.AskPartitionHistory),
                                          ANSWER_TIMEOUT)
        except (ConnectionClosed, RemoteError, asyncio.TimeoutError) as e:
            log.warning("%s: no partition table history from %s: %s", app.label, node.label,
                        e or type(e).__name__)
            return None
    answers = await asyncio.gather(*(one(n) for n in nodes))
    histories = {}
    for node, answer in zip(nodes, answers, strict=True):
        if answer is None:
            continue
        ptid, entries, packed = answer
        why = check_history(num_partitions, ptid, entries)
        if why is not None:
            log.warning("%s: partition table history of %s refused: %s", app.label,
                        node.label, why)
            conns[node.nid].close("invalid partition table history: %s" % why)
            continue
        histories[node.nid] = History(ptid, tuple(
            (entry_ptid, None if end is None else u64(end), frozenset(partitions))
            for entry_ptid, end, partitions in entries), None if packed is None else u64(packed))
    return num_partitions, histories


def _tables(app: MasterApp, num_partitions: int, histories) -> list[OlderTable]:
    tables = older_tables(num_partitions, histories)
    latest = app.pt.ptid if app.pt is not None else None
    if latest is not None and all(t.ptid != latest for t in tables):
        tables.append(older_table(num_partitions, histories, latest))
        tables.sort(key=lambda t: t.ptid, reverse=True)
    return tables


def ask_older_tables(app: MasterApp, conn, msg_id: int) -> None:
    """``neoctl print pt_history``: every table the present storages
    remember, what each is worth with them."""
    async def work():
        num_partitions, histories = await gather(app)
        tables = _tables(app, num_partitions, histories)
        latest = app.pt.ptid if app.pt is not None else None
        wire = [(t.ptid, t.operational, None if t.bound is None else p64(t.bound),
                 list(t.storages), list(t.unreadable),
                 None if t.packed is None else p64(t.packed)) for t in tables]
        return lambda: conn.answer(msg_id, Packets.AnswerOlderPartitionTables, latest, wire)
    serve(app, conn, msg_id, work)


def _check_recoverable(app: MasterApp) -> None:
    if app.cluster_state is not ClusterStates.RECOVERING or app.stopping:
        raise Denied("cluster is %s, not RECOVERING" % app.cluster_state.name)
    if app.pt is None:
        raise Denied("no partition table yet")
    if app.pt.operational(_present(app)):
        raise Denied("partition table %d is operational with the storages present:"
                     " `neoctl start` starts the cluster from it" % app.pt.ptid)


def recover_pt(app: MasterApp, conn, msg_id: int, ptid: int) -> None:
    """``neoctl recover_pt PTID``: refused unless the cluster is RECOVERING
    with a table that is not operational and table ``ptid`` is."""
    _check_recoverable(app)

    async def work():
        num_partitions, histories = await gather(app)
        _check_recoverable(app)  # things may have changed meanwhile
        if app.pt.num_partitions != num_partitions:
            raise Denied("the partition table changed meanwhile: try again")
        table = next((t for t in _tables(app, num_partitions, histories) if t.ptid == ptid),
                     None)
        if table is None:
            raise Denied("no storage present remembers partition table %d"
                         " (see `neoctl print pt_history`)" % ptid)
        if not table.operational:
            raise Denied("partition table %d is not operational with the storages present:"
                         " no readable copy of partitions %s" % (
                             ptid, " ".join(map(str, table.unreadable))))
        seen = [app.pt.ptid, *(r[0] for r in app.recovery.values() if r[0] is not None)]
        for history in histories.values():
            seen += [history.ptid or 0, *(e[0] for e in history.entries)]
        message = _adopt(app, table, max(seen) + 1)
        return lambda: conn.ack(msg_id, message)
    serve(app, conn, msg_id, work)


def _adopt(app: MasterApp, table: OlderTable, new_ptid: int) -> str:
    """Make ``table`` current as ``new_ptid`` and have recovery truncate
    after its bound."""
    old = app.pt
    pt = PartitionTable(old.num_partitions, old.num_replicas)
    pt.load(new_ptid, old.num_replicas, [list(row) for row in table.rows])
    app.pt = pt
    tid = table.bound
    if app.truncate_tid is None:
        app._startup_allowed_before_truncation = app.startup_allowed
    # a truncation already pending below it stays (it was decided before)
    tid = app.truncate_tid = tid if app.truncate_tid is None else min(tid, app.truncate_tid)
    app.startup_allowed = False  # as `neoctl truncate`: every storage of the table
    # storages of the lost table that are not here: if they come back while
    # this master runs, they truncate too (as after `neoctl truncate`)
    for nid in old.nids() - _present(app):
        app.missed_truncation[nid] = min(tid, app.missed_truncation.get(nid, tid))
    for admin in app.nm.of_type(NodeTypes.ADMIN):
        if admin.connected:
            app.send_pt(admin)
    message = "partition table %d made from table %d over %s; truncating after %#x (%s)" % (
        new_ptid, table.ptid, _names(table.storages), tid, neo_tid_time(tid))
    if table.packed is not None and table.packed > tid:
        message += "; %s" % packed_after(table.packed)
    log.warning("%s: recover_pt: %s", app.label, message)
    app.changed()
    return message
