"""Reading the database as a whole: transaction iteration (``iterator``),
the undo log, current records (``record_iternext``), and the object count
and size (``__len__``, ``getSize``).

Transactions are spread over partitions (``tid % num_partitions``) and so
are objects: every listing asks one readable replica of each partition
(``AskTIDsFrom``, ``AskTIDs``, ``AskOIDsFrom``) and merges the sorted
answers, refilling a partition's buffer only when it runs low.  Metadata
and object records are then fetched with pipelined requests
(``ClientApp.ask_many``): one round trip per batch, not per item.

Every read is bounded by a snapshot, the client's ``last_tid`` when the
call is made: a transaction the client was not told about is never shown,
even if a storage already has it.
"""
from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable, Iterator
from itertools import islice

from ZODB.BaseStorage import DataRecord
from ZODB.BaseStorage import TransactionRecord as ZODBTransactionRecord
from ZODB.Connection import TransactionMetaData
from ZODB.TimeStamp import TimeStamp

from neozodb.client.app import ClientApp
from neozodb.client.compat import UndoLogPacks, neo_storages
from neozodb.net.endpoint import RemoteError
from neozodb.protocol import ErrorCodes, Packets, p64, u64

TIDS_PER_PARTITION = 100  # tids asked to a partition at once (iteration)
RECORD_BATCH = 1000  # object records fetched in one pipelined round
OIDS_PER_PARTITION = 5000  # oids asked to a partition at once (counting)
SIZE_SAMPLE = 100  # objects whose history sizes estimate getSize()
HISTORY_CAP = 1000  # revisions of a sampled object looked at


def loads_extension(ext: bytes) -> dict:
    """Transaction extension bytes as ZODB stores them (a pickled dict)."""
    try:
        return dict(TransactionMetaData(extension=ext).extension)
    except Exception:
        return {}


def transaction_description(tid: bytes, user: bytes, description: bytes, ext: bytes) -> dict:
    """A transaction as undoLog and history describe it."""
    d = {"id": tid, "time": TimeStamp(tid).timeTime(), "user_name": user,
         "description": description}
    if ext:
        d.update(loads_extension(ext))
    return d


class PartitionMerge:
    """The items of every partition, in order (or reverse order), from
    per-partition sorted listings fetched in pipelined rounds.

    ``request(partition, position)`` gives the ``(packet, args)`` fetching
    the next items of a partition from ``position``; ``parse(partition,
    position, answer)`` returns ``(items, next_position)``, next_position
    being None when the partition has no more.  A partition is refilled
    when its buffer is empty and the merge needs its next item; partitions
    running low (under a quarter of ``low_water``) are refilled in the same
    round."""

    def __init__(self, app: ClientApp, start, request: Callable, parse: Callable,
                 reverse: bool = False, low_water: int = 0) -> None:
        self.app = app
        self.request = request
        self.parse = parse
        self.reverse = reverse
        self.low_water = low_water
        np = app.pt.num_partitions
        self.positions: dict[int, object] = dict.fromkeys(range(np), start)
        self.buffers: dict[int, deque] = {p: deque() for p in range(np)}

    def _fill(self, partitions) -> None:
        partitions = sorted(partitions)
        while partitions:
            requests = []
            for p in partitions:
                packet, args = self.request(p, self.positions[p])
                requests.append((p, packet, args))
            answers = self.app.ask_many(requests)
            again = []
            for p, (answer, error) in zip(partitions, answers, strict=True):
                if error is not None:
                    raise error
                items, position = self.parse(p, self.positions[p], answer)
                self.buffers[p].extend(items)
                self.positions[p] = position
                if not self.buffers[p] and position is not None:
                    again.append(p)  # nothing usable in this chunk: go on
            partitions = again

    def __iter__(self) -> Iterator:
        positions, buffers = self.positions, self.buffers
        self._fill([p for p in positions if positions[p] is not None])
        sign = -1 if self.reverse else 1
        heap = []
        for p, buffer in buffers.items():
            if buffer:
                item = buffer.popleft()
                heap.append((sign * u64(item), p, item))
        heapq.heapify(heap)
        while heap:
            _, p, item = heapq.heappop(heap)
            yield item
            buffer = buffers[p]
            if not buffer and positions[p] is not None:
                low = self.low_water // 4
                self._fill([q for q in positions if q == p or (
                    positions[q] is not None and len(buffers[q]) < low)])
            if buffer:
                nxt = buffer.popleft()
                heapq.heappush(heap, (sign * u64(nxt), p, nxt))


# -- transactions -------------------------------------------------------------------------

def tids_from(app: ClientApp, start: bytes, stop: bytes) -> PartitionMerge:
    """Committed tids from start to stop (inclusive), ascending."""
    n = TIDS_PER_PARTITION

    def request(p, position):
        return Packets.AskTIDsFrom, (position, stop, n, p)

    def parse(p, position, answer):
        (tids,) = answer
        if len(tids) < n:
            return tids, None
        return tids, p64(u64(tids[-1]) + 1)

    return PartitionMerge(app, start, request, parse, low_water=n)


def tids_before(app: ClientApp, length: int) -> PartitionMerge:
    """Committed tids, newest first (the undo log).  Positions are offsets
    from the newest: a commit made meanwhile shifts them, so the caller
    drops tids that come again out of order."""
    n = max(16, min(1000, 2 * length // app.pt.num_partitions + 1))

    def request(p, offset):
        return Packets.AskTIDs, (offset, offset + n, p)

    def parse(p, offset, answer):
        (tids,) = answer
        return tids, (offset + n if len(tids) == n else None)

    return PartitionMerge(app, 0, request, parse, reverse=True, low_water=n)


def transaction_info(app: ClientApp, tids: list[bytes]) -> dict[bytes, tuple]:
    """{tid: (user, description, ext, packed, oids)}, pipelined; tids
    the storages do not have are left out."""
    pt = app.pt
    answers = app.ask_many([(pt.partition(tid), Packets.AskTransactionInformation, (tid,))
                            for tid in tids])
    info = {}
    for tid, (answer, error) in zip(tids, answers, strict=True):
        if error is not None:
            if isinstance(error, RemoteError) and error.code is ErrorCodes.TID_NOT_FOUND:
                continue
            raise error
        _, user, description, ext, packed, oids = answer
        info[tid] = (user, description, ext, packed, oids)
    return info


def fetch_records(app: ClientApp, keys: list[tuple[bytes, bytes]]) -> list[DataRecord]:
    """The records ``(tid, oid)``, pipelined; records packed away since are
    left out."""
    pt = app.pt
    answers = app.ask_many([(pt.partition(oid), Packets.AskObject, (oid, tid, None))
                            for tid, oid in keys], check=app._object_data)
    records = []
    for (_, oid), (answer, error) in zip(keys, answers, strict=True):
        if error is not None:
            if isinstance(error, RemoteError) and error.code in (
                    ErrorCodes.OID_NOT_FOUND, ErrorCodes.OID_DOES_NOT_EXIST):
                continue
            raise error
        (_, serial, _, _, _, _, data_serial), data = answer
        records.append(DataRecord(oid, serial, data, data_serial))
    return records


class TransactionRecord(ZODBTransactionRecord):
    """A transaction of ``iterator()``; iterating it gives its object
    records (IStorageRecordInformation), as often as wanted.  Records of
    transactions up to RECORD_BATCH objects are fetched once, with those of
    the neighbouring transactions; bigger ones are fetched in batches on
    every iteration, so that they are never all in memory."""

    def __init__(self, app: ClientApp, tid: bytes, user: bytes, description: bytes,
                 ext: bytes, packed: bool, oids: list[bytes]) -> None:
        ZODBTransactionRecord.__init__(self, tid, "p" if packed else " ", user, description, ext)
        self._app = app
        self._oids = oids
        self._records: list[DataRecord] | None = None

    def __iter__(self) -> Iterator[DataRecord]:
        if self._records is not None:
            return iter(self._records)
        return self._batches()

    def _batches(self) -> Iterator[DataRecord]:
        oids, tid = self._oids, self.tid
        for i in range(0, len(oids), RECORD_BATCH):
            yield from fetch_records(self._app, [(tid, oid) for oid in oids[i:i + RECORD_BATCH]])


def iterate(app: ClientApp, start: bytes, stop: bytes) -> Iterator[TransactionRecord]:
    """Transactions from start to stop (inclusive; stop is already bounded
    by the snapshot), in TID order."""
    tids = iter(tids_from(app, start, stop))
    while True:
        chunk = list(islice(tids, TIDS_PER_PARTITION))
        if not chunk:
            return
        info = transaction_info(app, chunk)
        txns = [TransactionRecord(app, tid, *info[tid]) for tid in chunk if tid in info]
        # records of small transactions: one pipelined round per batch
        i = 0
        while i < len(txns):
            group, count = [], 0
            while i < len(txns) and len(txns[i]._oids) <= RECORD_BATCH - count:
                count += len(txns[i]._oids)
                group.append(txns[i])
                i += 1
            if group:
                records = fetch_records(app, [(t.tid, oid) for t in group for oid in t._oids])
                by_tid: dict[bytes, list] = {t.tid: [] for t in group}
                for record in records:
                    by_tid[record.tid].append(record)
                for t in group:
                    t._records = by_tid[t.tid]
                    yield t
            else:
                yield txns[i]  # big: its records come in batches when iterated
                i += 1


# -- undo log -------------------------------------------------------------------------------

def undo_log(app: ClientApp, snapshot: bytes, first: int, last: int, filter=None) -> list[dict]:
    """``undoLog`` semantics over the transactions up to ``snapshot``."""
    if last < 0:
        last = first - last
    if last <= first:
        return []
    tids = iter(tids_before(app, last))
    # NEO's storages list pack transactions and packed ones: leave them out
    packs = UndoLogPacks() if neo_storages(app) else None
    result: list[dict] = []
    matched = 0
    previous = None
    while matched < last:
        # with no filter, exactly what is missing; else a batch
        want = last - matched if filter is None else max(last - matched, 100)
        batch = []
        for tid in tids:
            if tid > snapshot or (previous is not None and tid >= previous):
                continue  # not visible to us yet, or seen again (offsets moved)
            previous = tid
            batch.append(tid)
            if len(batch) >= want:
                break
        if not batch:
            break
        info = transaction_info(app, batch)
        for tid in batch:
            if packs is not None and packs.past_cut(tid):
                return result
            if tid not in info:
                continue
            user, description, ext, _, _ = info[tid]
            if packs is not None and packs.hidden(tid, description, ext):
                continue
            d = transaction_description(tid, user, description, ext)
            if filter is not None and not filter(d):
                continue
            if matched >= first:
                result.append(d)
            matched += 1
            if matched >= last:
                break
    return result


# -- current records --------------------------------------------------------------------------

def oids_at(app: ClientApp, start: bytes, tid: bytes, n: int = 100) -> PartitionMerge:
    """Objects that exist at tid, from oid start, ascending."""

    def request(p, position):
        return Packets.AskOIDsFrom, (p, n, position, tid)

    def parse(p, position, answer):
        next_oid, oids = answer
        return oids, next_oid

    return PartitionMerge(app, start, request, parse, low_water=n)


class RecordIteration:
    """State of a ``record_iternext`` loop: the merged listing, a lookahead
    whose objects were prefetched, and the snapshot it reads at."""

    def __init__(self, app: ClientApp, start: bytes, snapshot: bytes) -> None:
        self.app = app
        self.snapshot = snapshot
        self.before = p64(u64(snapshot) + 1)
        self.oids = iter(oids_at(app, start, snapshot))
        self.ahead: deque = deque()

    def cursor(self) -> bytes | None:
        """What ``record_iternext`` returns as ``next``: the next oid and
        the snapshot, or None at the end."""
        self._look_ahead()
        return self.ahead[0] + self.snapshot if self.ahead else None

    def _look_ahead(self) -> None:
        if not self.ahead:
            self.ahead.extend(islice(self.oids, RECORD_BATCH // 10))
            if self.ahead:
                self.app.prefetch(list(self.ahead), self.before)

    def next(self) -> tuple[bytes, bytes, bytes] | None:
        while True:
            self._look_ahead()
            if not self.ahead:
                return None
            oid = self.ahead.popleft()
            try:
                loaded = self.app.load(oid, self.before)
            except KeyError:
                loaded = None
            if loaded is not None:  # else deleted meanwhile and packed: skip
                return oid, loaded[1], loaded[0]


# -- size ---------------------------------------------------------------------------------------

def count_objects(app: ClientApp, tid: bytes, sample: int = 0) -> tuple[int, list[bytes]]:
    """Number of objects existing at tid, by listing every partition (one
    readable replica each, all partitions in each pipelined round); with
    ``sample``, also up to that many of their oids picked at random."""
    rng = random.Random()
    count = 0
    picked: list[bytes] = []
    positions = {p: bytes(8) for p in range(app.pt.num_partitions)}
    while positions:
        partitions = sorted(positions)
        answers = app.ask_many([(p, Packets.AskOIDsFrom, (p, OIDS_PER_PARTITION, positions[p], tid))
                                for p in partitions])
        for p, (answer, error) in zip(partitions, answers, strict=True):
            if error is not None:
                raise error
            next_oid, oids = answer
            for oid in oids:  # reservoir sampling
                count += 1
                if len(picked) < sample:
                    picked.append(oid)
                elif sample:
                    j = rng.randrange(count)
                    if j < sample:
                        picked[j] = oid
            if next_oid is None:
                del positions[p]
            else:
                positions[p] = next_oid
    return count, picked


def estimate_size(app: ClientApp, tid: bytes) -> int:
    """Bytes of object data as stored (compressed), all revisions: the
    object count times the mean history size of a random sample."""
    count, sample = count_objects(app, tid, SIZE_SAMPLE)
    if not sample:
        return 0
    pt = app.pt
    answers = app.ask_many([(pt.partition(oid), Packets.AskObjectHistory, (oid, 0, HISTORY_CAP))
                            for oid in sample])
    total = 0
    for answer, error in answers:
        if error is None:
            total += sum(size for _, size in answer[1])
    return count * total // len(sample)
