"""Loads through the cache: ``load``, ``load_serial`` and ``prefetch`` of
``ClientApp`` (a mixin), in ZODB's application threads.  While a load is in
flight, invalidations of its object are recorded (``_loading``, under
``self.lock``), so that the revision it gets is cached with the right
``next_serial`` whatever arrives meanwhile."""
from __future__ import annotations

from queue import SimpleQueue

from neozodb.client.compress import WrongChecksum, decompress
from neozodb.client.errors import NEOStorageError
from neozodb.net.endpoint import ConnectionClosed, RemoteError
from neozodb.net.waiting import wait_any
from neozodb.protocol import ErrorCodes, Packets, p64, u64
from neozodb.protocol.blobs import BLOB_FLAG

#: Misses on consecutive oids before the next ones are read ahead.
READ_AHEAD_AFTER = 3
#: How many: the default of the client's ``read_ahead`` option.
READ_AHEAD = 32


class Loads:
    #: oids read ahead (prefetched with the load that missed) once loads
    #: miss the cache on consecutive oids; 0: never (the ``read_ahead``
    #: option of the client)
    read_ahead = READ_AHEAD
    _next_miss = -1  # the oid that continues the run of misses
    _misses = 0  # the length of that run

    def _object_data(self, answer, verify: bool = True) -> bytes | None:
        oid, serial, _, compression, checksum, data, _ = answer
        result = decompress(oid, serial, compression, checksum, data, verify)
        # NEO's storages answer a deletion with no compression id (None)
        if compression and compression & BLOB_FLAG:  # what loadBlob will need (blobs.py)
            self.blob_tails.note(oid, serial, checksum, data)
        return result

    def load(self, oid: bytes, before_tid: bytes | None = None) -> tuple[bytes, bytes, bytes | None] | None:
        """(data, serial, next_serial) of the revision before before_tid
        (default: current).  None if the object did not exist then; raises
        KeyError if it never existed, or if that revision is a deletion or
        an undone creation (as FileStorage does)."""
        with self.lock:
            if before_tid is None:
                before_tid = p64(u64(self.last_tid) + 1)
            item = self.cache.load(oid, before_tid)
            if item is not None:
                return item
            ahead = self._ahead(oid)
            if not ahead:
                loading = self._start_loading(oid)
        if ahead:
            # objects created together have consecutive oids, and are often
            # read together (a container's values): one pipelined round
            # trip for the next ones too
            self.prefetch(ahead, before_tid)
            with self.lock:
                item = self.cache.load(oid, before_tid)
                if item is not None:
                    return item
                loading = self._start_loading(oid)  # not cached: the load says why
        try:
            try:
                answer, data = self.ask_storage(oid, Packets.AskObject, oid, None, before_tid,
                                                check=self._object_data)
            except RemoteError as e:
                if e.code is ErrorCodes.OID_DOES_NOT_EXIST:
                    raise KeyError(oid) from None
                if e.code is ErrorCodes.OID_NOT_FOUND:
                    return None
                raise
            result = self._loaded(oid, loading, answer, data)
            if result is None:
                raise KeyError(oid)  # deleted, or creation undone
            return result
        finally:
            self._end_loading(oid, loading)

    def _ahead(self, oid: bytes) -> list[bytes]:
        """With self.lock held, at a cache miss: oid and the oids to read
        ahead with it, or [] for oid alone."""
        n = u64(oid)
        self._misses = self._misses + 1 if n == self._next_miss else 1
        self._next_miss = n + 1
        count = self.read_ahead
        if self._misses < READ_AHEAD_AFTER or not count:
            return []
        self._next_miss = n + 1 + count
        return [p64(i) for i in range(n, min(n + 1 + count, 1 << 64))]

    def _start_loading(self, oid: bytes) -> list:
        # with self.lock held: invalidations of oid are recorded until the end
        loading = self._loading.get(oid)
        if loading is None:
            loading = self._loading[oid] = [0, []]
        loading[0] += 1
        return loading

    def _end_loading(self, oid: bytes, loading: list) -> None:
        with self.lock:
            loading[0] -= 1
            if not loading[0]:
                self._loading.pop(oid, None)

    def _loaded(self, oid: bytes, loading: list, answer: tuple, data: bytes | None):
        serial, next_serial = answer[1], answer[2]
        with self.lock:
            if next_serial is None:
                # invalidated while we were loading: the revision we got
                # ends at the first such commit after it
                later = [tid for tid in loading[1] if tid > serial]
                if later:
                    next_serial = min(later)
            if data is not None:
                self.cache.store(oid, data, serial, next_serial)
        if data is None:
            return None  # deletion or undone creation
        return data, serial, next_serial

    def prefetch(self, oids, before_tid: bytes) -> None:
        """Warm the cache: one pipelined AskObject per missing object, all
        sent before any answer is awaited.  Failures are ignored (a later
        load retries and reports them)."""
        queue: SimpleQueue = SimpleQueue()
        sent = []
        conns = set()
        for oid in oids:
            with self.lock:
                if self.cache.load(oid, before_tid) is not None:
                    continue
                loading = self._start_loading(oid)
            try:
                nid = self.readable_nids(oid)[0]
                conn = self.storage_conn(nid)
            except (IndexError, ConnectionClosed, OSError, NEOStorageError, RemoteError):
                self._end_loading(oid, loading)
                continue
            conn.ask(Packets.AskObject, oid, None, before_tid, queue=queue,
                     token=(oid, loading), buffer=True)
            conns.add(conn)
            sent.append(oid)
        for conn in conns:
            conn.flush()
        for _ in sent:
            (oid, loading), answer, error, _ = wait_any(queue, conns)
            try:
                if error is None:
                    self._loaded(oid, loading, answer, self._object_data(answer))
            except WrongChecksum:
                pass
            finally:
                self._end_loading(oid, loading)

    def load_serial(self, oid: bytes, serial: bytes) -> bytes:
        try:
            _, data = self.ask_storage(oid, Packets.AskObject, oid, serial, None,
                                       check=self._object_data)
        except RemoteError as e:
            if e.code in (ErrorCodes.OID_DOES_NOT_EXIST, ErrorCodes.OID_NOT_FOUND):
                raise KeyError(oid) from None
            raise
        if data is None:
            raise KeyError(oid)
        return data
