"""Replica checks (``neoctl check``): compare the copies of a partition.

The master asks one storage with a readable cell of the partition to check
it (``CheckPartition``).  That node asks every other readable copy, chunk
by chunk, for digests of its transactions (``AskCheckTIDRange``) and then
of its object revisions (``AskCheckSerialRange``), computes its own, and
compares.  Copies whose digest differs from the reference (the node named
by the operator, else the strict majority) are reported to the master with
``NotifyPartitionCorrupted``.  Without a reference nor a majority, every
copy that took part is reported: the master then knows it cannot tell the
good ones.

Digests are NEO's (a SHA-1 of the TIDs, or OIDs, in decimal), which NEO's
storages compute and compare; between neozodb storages a second SHA-1
covering metadata, data checksums and back-pointers follows
(``check-digest``, protocol/features.py).  A partition with a copy on NEO's
storage is compared on NEO's part only, so that every copy is judged alike.

NEO's master expects a report only when copies differ; a master with
``check-report`` gets one at the end of every check, an empty list when all
agree, which is how it knows the check is over, preceded by a note
(``NotifyMonitorInformation``) when a copy could not be compared or the
check failed.

A peer storage is asked over our connection to it, or over the one it
opened to us: NEO's storage refuses a second connection from a node it is
already connected to (e.g. replicating from us).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import Counter

from neozodb.net.connection import ConnectionClosed, RemoteError
from neozodb.protocol import (
    ZERO_HASH,
    ZERO_OID,
    ZERO_TID,
    NodeStates,
    Packets,
    ProtocolError,
    nid_str,
    p64,
    u64,
)

log = logging.getLogger("neozodb.storage")

#: Transactions or revisions per digest.
CHECK_CHUNK = 10000
#: Length of NEO's part of a digest (one SHA-1).
NEO_DIGEST = 20
CHECK_DIGEST = b"check-digest"
CHECK_REPORT = b"check-report"
#: Key of NotifyMonitorInformation telling a check-report master what a
#: check could not compare.
CHECK_NOTE = b"check"


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


def _decimal_sha1(values) -> bytes:
    return hashlib.sha1(",".join(map(str, values)).encode()).digest()


def tid_range_answer(backend, features, partition: int, length: int, min_tid: int,
                     max_tid: int) -> tuple:
    """``AnswerCheckTIDRange`` arguments for a peer with ``features``:
    NEO's digest, followed by ours for a peer with ``check-digest``."""
    tids = backend.fetch_tids(partition, length, min_tid, max_tid)
    if not tids:
        count, digest, last = 0, ZERO_HASH, ZERO_TID
    else:
        count, digest, last = len(tids), _decimal_sha1(tids), p64(tids[-1])
    if CHECK_DIGEST in features:
        digest += backend.check_tid_range(partition, length, min_tid, max_tid)[1]
    return count, digest, last


def serial_range_answer(backend, features, partition: int, length: int, min_tid: int,
                        max_tid: int, min_oid: int) -> tuple:
    """``AnswerCheckSerialRange`` arguments, as :func:`tid_range_answer`."""
    keys = backend.fetch_object_keys(partition, length, min_tid, max_tid, min_oid)
    if not keys:
        answer = [0, ZERO_HASH, ZERO_TID, ZERO_HASH, ZERO_OID]
    else:
        answer = [len(keys), _decimal_sha1(t for t, _ in keys), p64(keys[-1][0]),
                  _decimal_sha1(o for _, o in keys), p64(keys[-1][1])]
    if CHECK_DIGEST in features:
        _, tid_digest, _, oid_digest, _ = backend.check_serial_range(
            partition, length, min_tid, max_tid, min_oid)
        if keys and backend.blobs:
            # blob contents hashed anew: a copy whose bytes rotted differs
            contents = backend.blob_range_digest(partition, (min_tid, min_oid), keys[-1])
            if contents is not None:
                oid_digest = hashlib.sha1(oid_digest + contents).digest()
        answer[1] += tid_digest
        answer[3] += oid_digest
    return tuple(answer)


def neo_part(answer: tuple) -> tuple:
    """An answer cut down to NEO's digests (every ``bytes`` longer than a
    SHA-1 is a digest; TIDs and OIDs are 8 bytes)."""
    return tuple(a[:NEO_DIGEST] if isinstance(a, bytes) and len(a) > NEO_DIGEST else a
                 for a in answer)


def should_report(corrupted, master_features) -> bool:
    """NEO's master logs any report as a corruption: an empty one goes
    only to a master that waits for it."""
    return bool(corrupted) or CHECK_REPORT in master_features


class Checker:
    def __init__(self, app) -> None:
        self.app = app
        self.not_compared: dict[int, str] = {}  # in the current check: nid -> why
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
            self.not_compared: dict[int, str] = {}
            error = None
            try:
                corrupted = await self._check(partition, source, min_tid, max_tid)
            except asyncio.CancelledError:
                raise
            except (ConnectionClosed, RemoteError, ProtocolError, OSError) as e:
                # the reference (or every other copy) could not be asked:
                # nothing compared, nothing to report as corrupted
                log.warning("%s: check of partition %d failed: %s", self.app.label, partition, e)
                corrupted, error = [], str(e)
            conn = self.app.master_conn
            if conn is None or conn.closed:
                continue
            if CHECK_REPORT in conn.peer_features and (error or self.not_compared):
                note = {"partition": partition, "error": error,
                        "not_compared": {nid_str(n): why for n, why in self.not_compared.items()}}
                conn.notify(Packets.NotifyMonitorInformation,
                            {CHECK_NOTE: json.dumps(note).encode()})
            if should_report(corrupted, conn.peer_features):
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

    async def _unlocked(self, max_tid: int) -> None:
        """Wait until no transaction up to ``max_tid`` is locked here and
        not unlocked yet (it would be missing from our digests)."""
        app = self.app
        loop = asyncio.get_running_loop()
        while any(t.low is not None and u64(t.low) <= max_tid for t in app.locks.txns.values()):
            waiter = loop.create_future()
            app.delay(b"", lambda w=waiter: w.done() or w.set_result(None))
            await waiter

    async def _connection(self, nid: int):
        """A connection to storage ``nid``: ours, or the one it opened to
        us (NEO's storage refuses a second connection between two nodes)."""
        app = self.app
        for _ in range(2):
            conn = app.peer_conns.get(nid)
            if conn is None or conn.closed:
                conn = next((c for c in app.source_conns if c.nid == nid and not c.closed), None)
            if conn is not None:
                return conn
            try:
                return await app.peer_connection(nid)
            except RemoteError:
                # it was connecting to us meanwhile: take that one
                if not any(c.nid == nid and not c.closed for c in app.source_conns):
                    raise
        raise ConnectionClosed("no connection to %s" % nid_str(nid))

    async def _connections(self, nids: list[int], reference: int | None) -> dict:
        conns = {}
        for nid in nids:
            if nid == self.app.nid:
                continue
            try:
                conns[nid] = await self._connection(nid)
            except (ConnectionError, OSError, RemoteError, ProtocolError) as e:
                if nid == reference:
                    raise
                log.warning("%s: check: cannot reach %s, not compared: %s", self.app.label,
                            nid_str(nid), e)
                self.not_compared[nid] = str(e)
        return conns

    async def _check(self, partition: int, source, min_tid: int, max_tid: int) -> list[int]:
        app = self.app
        reference = self._reference(source)
        nids = [nid for nid in app.pt.readable_nids(partition)
                if nid == app.nid or (app.nm.get(nid) is not None
                                      and app.nm.get(nid).state is NodeStates.RUNNING)]
        if reference is not None and reference not in nids:
            nids.append(reference)
        conns = await self._connections(nids, reference)
        nids = [nid for nid in nids if nid == app.nid or nid in conns]
        whole = all(CHECK_DIGEST in conn.peer_features for conn in conns.values())
        local_features = (CHECK_DIGEST,) if whole else ()
        backend = app.backend
        corrupted: set[int] = set()
        await self._unlocked(max_tid)

        async def ask(nid, ask_args):
            try:
                try:
                    answer = tuple(await conns[nid].ask(*ask_args))
                except ConnectionClosed:
                    # e.g. NEO's storage closing the connection it opened
                    # to replicate from us: once more on a new one
                    conns[nid] = await self._connection(nid)
                    answer = tuple(await conns[nid].ask(*ask_args))
            except (ConnectionClosed, ConnectionError, OSError, RemoteError, ProtocolError) as e:
                if nid == reference:
                    raise
                log.warning("%s: check of partition %d: %s not compared any more: %s",
                            app.label, partition, nid_str(nid), e)
                nids.remove(nid)
                self.not_compared[nid] = str(e)
                return None
            return answer if whole else neo_part(answer)

        async def compare(ask_args, local) -> tuple | None:
            """Ask every copy still trusted; drop the odd ones; return the
            agreed answer (None when the check must stop)."""
            live = [nid for nid in nids if nid not in corrupted]
            remote = [nid for nid in live if nid != app.nid]
            replies = await asyncio.gather(*(ask(nid, ask_args) for nid in remote))
            answers = {nid: a for nid, a in zip(remote, replies, strict=True) if a is not None}
            if app.nid in live:
                answers[app.nid] = local
            if len(answers) < 2:
                return None  # nothing left to compare with
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
            return next(a for nid, a in answers.items() if nid not in odd)

        low = min_tid
        while True:
            agreed = await compare(
                (Packets.AskCheckTIDRange, partition, CHECK_CHUNK, p64(low), p64(max_tid)),
                tid_range_answer(backend, local_features, partition, CHECK_CHUNK, low, max_tid))
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
                serial_range_answer(backend, local_features, partition, CHECK_CHUNK, low_tid,
                                    max_tid, low_oid))
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
