"""Replica checks (``neoctl check``): compare the copies of a partition.

The master asks one storage with a readable cell of the partition to check
it (``CheckPartition``).  That node asks every other readable copy, chunk
by chunk, for digests of its transactions (``AskCheckTIDRange``) and then
of its object revisions (``AskCheckSerialRange``), computes its own, and
compares.  Copies whose digest differs from the reference (the node named
by the operator, else the strict majority) are reported to the master with
``NotifyPartitionCorrupted``, which is sent when the check of a partition
ends, with an empty list when every copy agreed.  Without a reference nor a
majority, every copy that took part is reported: the master then knows it
cannot tell the good ones.
"""
from __future__ import annotations

import asyncio
import logging
from collections import Counter

from neozodb.net.connection import ConnectionClosed, RemoteError
from neozodb.protocol import NodeStates, Packets, ProtocolError, nid_str, p64, u64

log = logging.getLogger("neozodb.storage")

#: Transactions or revisions per digest.
CHECK_CHUNK = 10000


def odd_ones(answers: dict[int, tuple], reference: int | None) -> set[int] | None:
    """Nodes whose answer differs from the reference's, or from the strict
    majority's; None when there is neither (no copy can be trusted)."""
    if reference is not None:
        good = answers[reference]
    else:
        (good, votes), = Counter(answers.values()).most_common(1)
        if votes * 2 <= len(answers):
            return None
    return {nid for nid, answer in answers.items() if answer != good}


class Checker:
    def __init__(self, app) -> None:
        self.app = app
        self._queue: list[tuple] = []
        self._task: asyncio.Task | None = None

    def stop(self) -> None:
        self._queue.clear()
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def check(self, partition: int, source, min_tid: bytes, max_tid: bytes) -> None:
        self._queue.append((partition, source, u64(min_tid), u64(max_tid)))
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while self._queue:
            partition, source, min_tid, max_tid = self._queue.pop(0)
            try:
                corrupted = await self._check(partition, source, min_tid, max_tid)
            except asyncio.CancelledError:
                raise
            except (ConnectionClosed, RemoteError, ProtocolError, OSError) as e:
                log.warning("%s: check of partition %d failed: %s", self.app.label, partition, e)
                continue  # the master sees the check did not end
            conn = self.app.master_conn
            if conn is not None:
                conn.notify(Packets.NotifyPartitionCorrupted, partition, sorted(corrupted))

    def _reference(self, source) -> int | None:
        _, address = source
        if address is None:
            return None
        host, port = address
        wanted = (host.decode() if isinstance(host, bytes) else host, port)
        for node in self.app.nm.storages():
            if node.address == wanted:
                return node.nid
        raise RemoteError(None, "no storage at %s:%s" % wanted)  # type: ignore[arg-type]

    async def _check(self, partition: int, source, min_tid: int, max_tid: int) -> list[int]:
        app = self.app
        reference = self._reference(source)
        nids = [nid for nid in app.pt.readable_nids(partition)
                if nid == app.nid or (app.nm.get(nid) is not None
                                      and app.nm.get(nid).state is NodeStates.RUNNING)]
        if reference is not None and reference not in nids:
            nids.append(reference)
        conns = {nid: await app.peer_connection(nid) for nid in nids if nid != app.nid}
        backend = app.backend
        corrupted: set[int] = set()

        async def compare(ask_args, local) -> tuple | None:
            """Ask every copy still trusted; drop the odd ones; return the
            agreed answer (None when the check must stop)."""
            live = [nid for nid in nids if nid not in corrupted]
            futures = {nid: conns[nid].ask(*ask_args) for nid in live if nid != app.nid}
            answers = {nid: tuple(await f) for nid, f in futures.items()}
            if app.nid in live:
                answers[app.nid] = local
            odd = odd_ones(answers, reference if reference in answers else None)
            if odd is None:
                log.warning("%s: partition %d: copies on %s differ and none is a majority",
                            app.label, partition, " ".join(nid_str(n) for n in answers))
                corrupted.update(answers)
                return None
            if odd:
                log.warning("%s: partition %d differs on %s", app.label, partition,
                            " ".join(nid_str(n) for n in sorted(odd)))
                corrupted.update(odd)
            if len(answers) - len(odd) < 2 and len(nids) - len(corrupted) < 2:
                return None  # nothing left to compare with
            good = next(a for nid, a in answers.items() if nid not in odd)
            return good

        low = min_tid
        while True:
            agreed = await compare(
                (Packets.AskCheckTIDRange, partition, CHECK_CHUNK, p64(low), p64(max_tid)),
                _tid_range(backend.check_tid_range(partition, CHECK_CHUNK, low, max_tid)))
            if agreed is None:
                return sorted(corrupted)
            count, _, last = agreed
            if count < CHECK_CHUNK:
                break
            low = u64(last) + 1
        low_tid, low_oid = min_tid, 0
        while True:
            agreed = await compare(
                (Packets.AskCheckSerialRange, partition, CHECK_CHUNK, p64(low_tid), p64(max_tid),
                 p64(low_oid)),
                _serial_range(backend.check_serial_range(
                    partition, CHECK_CHUNK, low_tid, max_tid, low_oid)))
            if agreed is None:
                return sorted(corrupted)
            count, _, last_tid, _, last_oid = agreed
            if count < CHECK_CHUNK:
                break
            low_tid, low_oid = u64(last_tid), u64(last_oid) + 1
        log.info("%s: partition %d checked on %s: %s", app.label, partition,
                 " ".join(nid_str(n) for n in nids),
                 "differs on " + " ".join(nid_str(n) for n in sorted(corrupted))
                 if corrupted else "all copies agree")
        return sorted(corrupted)


def _tid_range(answer: tuple) -> tuple:
    """A local digest in the form the wire gives remote ones."""
    count, digest, last = answer
    return count, digest, p64(last)


def _serial_range(answer: tuple) -> tuple:
    count, tid_digest, last_tid, oid_digest, last_oid = answer
    return count, tid_digest, p64(last_tid), oid_digest, p64(last_oid)
