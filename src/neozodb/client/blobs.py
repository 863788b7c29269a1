"""Blobs on the client (feature ``blob``; docs/design.md, "Blobs"): the
``IBlobStorage`` and ``IBlobStorageRestoreable`` methods of ``Storage`` (a
mixin), the upload of a blob's content to the storages of its object, and
its download into the blob cache (``client/blobcache.py``).

Contents move in chunks (``protocol/blobs.py``), at most ``WINDOW`` of
them in flight per storage: neither side ever holds a whole blob.  A
download is checked against the digest and size its record names; a copy
that does not match is logged as corrupted, with the storage, oid and
serial, and the next readable replica is asked.
"""
from __future__ import annotations

import hashlib
import logging
import os
from queue import SimpleQueue
from typing import BinaryIO

from ZODB import POSException
from ZODB.blob import BlobFile

from neozodb.client.blobcache import BlobCache
from neozodb.net.endpoint import ConnectionClosed, RemoteError
from neozodb.net.waiting import wait_any
from neozodb.protocol import ZERO_TID, ErrorCodes, Packets, nid_str
from neozodb.protocol.blobs import CHUNK, chunks, is_blob, split_tail
from neozodb.protocol.catalogue import ProtocolError
from neozodb.protocol.features import BLOB

log = logging.getLogger("neozodb.client")

WINDOW = 4  # chunks in flight per storage


class Uploads:
    """The chunk answers a transaction still expects: at most ``WINDOW`` a
    storage in flight while it uploads, the rest settled at the vote."""

    def __init__(self, commit) -> None:
        self.commit = commit
        self.queue: SimpleQueue = SimpleQueue()
        self.pending = 0
        self.conns: set = set()  # where the chunks went

    def settle(self, down_to: int = 0) -> None:
        while self.pending > down_to:
            (oid, _), _, error, conn = wait_any(self.queue, self.conns)
            self.pending -= 1
            if isinstance(error, ConnectionClosed):
                self.commit.failed.add(conn.nid)
            elif error is not None:
                raise POSException.StorageTransactionError(
                    "storage %s refused the blob of %s: %s" % (conn.label, oid.hex(), error))


def upload(commit, oid: bytes, filename: str) -> tuple[bytes, int]:
    """Send the content of ``filename`` to every writable cell of oid's
    partition, as the blob ``oid`` gets in ``commit``'s transaction;
    (SHA-256, size) of what was sent.  The last answers are waited for at
    the vote (``Uploads``)."""
    # Not waiting for a pipelined copy's TID to be accepted (Commit.known_ttid):
    # that would send the transaction's deferred stores now, maybe before
    # those of the transactions copied before it, whose votes are still to
    # come.  Their locks taken first, those votes would wait for them and
    # this transaction, not voted before them, would never give them back.
    # A content uploaded for a TID the master then refuses is dropped with
    # the transaction's abort.
    ttid = commit.known_ttid()
    conns = []
    for nid in commit._cells(oid):
        try:
            conn = commit.app.storage_conn(nid)
        except (ConnectionClosed, OSError) as e:
            log.warning("%s: %s unreachable for the blob of %s: %s", commit.app.label,
                        nid_str(nid), oid.hex(), e)
            commit.failed.add(nid)
            continue
        if BLOB not in conn.peer_features:
            raise POSException.Unsupported("storage %s keeps no blobs" % nid_str(nid))
        commit.involve(nid, conn)  # told about an abort
        conns.append(conn)
    uploads = commit.uploads
    if uploads is None:
        uploads = commit.uploads = Uploads(commit)
    hasher = hashlib.sha256()
    size = 0
    with open(filename, "rb") as f:
        n = 0
        while True:
            data = f.read(CHUNK)
            if not data and n:
                break
            hasher.update(data)
            size += len(data)
            for conn in conns:
                conn.ask(Packets.AskStoreBlobChunk, ttid, oid, n, data,
                         queue=uploads.queue, token=(oid, n))
                uploads.pending += 1
                uploads.conns.add(conn)
            uploads.settle(WINDOW * max(len(conns), 1))
            n += 1
            if len(data) < CHUNK:
                break
    return hasher.digest(), size


def _copy_from(conn, oid: bytes, serial: bytes, checksum: bytes, digest: bytes, size: int,
               f: BinaryIO) -> bool:
    """Write the content from ``conn``'s storage into ``f``; False if it
    does not match ``digest`` and ``size`` (``f`` is then emptied)."""
    queue: SimpleQueue = SimpleQueue()
    hasher = hashlib.sha256()
    total = chunks(size)
    asked = got = 0
    written = 0
    while got < total:
        while asked < total and asked - got < WINDOW:
            conn.ask(Packets.AskBlobChunk, checksum, asked, queue=queue, token=asked)
            asked += 1
        n, result, error, _ = conn.wait(queue)
        if error is not None:
            while got + 1 < asked:  # the answers still coming are moot
                conn.wait(queue)
                got += 1
            raise error
        (data,) = result
        got += 1
        if n != got - 1 or len(data) != min(CHUNK, size - n * CHUNK):
            written = -1
            continue
        hasher.update(data)
        f.write(data)
        written += len(data)
    if written == size and hasher.digest() == digest:
        return True
    log.error("corrupted copy of the blob of %s at %s on %s: its content does not match"
              " its record", oid.hex(), serial.hex(), conn.label)
    f.seek(0)
    f.truncate()
    return False


def download(app, oid: bytes, serial: bytes, f: BinaryIO) -> None:
    """Write the content of oid's blob at ``serial`` into ``f``, from the
    first readable replica that has a good copy; POSKeyError if none."""
    problems = []
    known = app.blob_tails.get(oid, serial)  # the record was just loaded
    for nid in app.readable_nids(oid):
        try:
            conn = app.storage_conn(nid)
            if BLOB not in conn.peer_features:
                problems.append("%s keeps no blobs" % nid_str(nid))
                continue
            if known is not None:
                try:
                    if _copy_from(conn, oid, serial, *known, f):
                        return
                    problems.append("corrupted copy on %s" % nid_str(nid))
                    continue
                except RemoteError:
                    # e.g. a live import's storage, restarted since the load,
                    # finds a content not imported yet through its record:
                    # ask it for the record again
                    f.seek(0)
                    f.truncate()
            answer = conn.call(Packets.AskObject, oid, serial, None)
            _, _, _, compression, checksum, data, _ = answer
            if not is_blob(compression):
                raise POSException.POSKeyError("not a blob revision", oid, serial)
            _, _, digest, size = split_tail(compression, data)
            if hashlib.sha1(data).digest() != checksum:
                problems.append("wrong record checksum on %s" % nid_str(nid))
                continue
            if _copy_from(conn, oid, serial, checksum, digest, size, f):
                return
            problems.append("corrupted copy on %s" % nid_str(nid))
        except (ConnectionClosed, OSError, ProtocolError) as e:
            problems.append("%s: %s" % (nid_str(nid), e))
        except RemoteError as e:
            problems.append("%s: %s" % (nid_str(nid), e.message))
    raise POSException.POSKeyError("no blob at %s: %s" % (
        serial.hex(), "; ".join(problems) or "no readable storage"), oid, serial)


class BlobStorageMethods:
    """IBlobStorage and IBlobStorageRestoreable for ``Storage``: present
    only when the storage was opened with a ``blob_dir``."""

    _blob_cache: BlobCache | None = None

    def _blobs(self) -> BlobCache:
        if self._blob_cache is None:
            raise POSException.Unsupported("no blob-dir: this storage was opened without blobs")
        return self._blob_cache

    @property
    def fshelper(self) -> BlobCache | None:
        """The blob cache (None without a blob-dir), as ZEO's
        ``ClientStorage.fshelper``: ``getBlobFilename(oid, tid)`` is where
        a revision's file is when the cache has it."""
        return self._blob_cache

    def temporaryDirectory(self) -> str:
        return self._blobs().temporary_directory()

    def storeBlob(self, oid: bytes, oldserial: bytes, data: bytes, blobfilename: str,
                  version: str, transaction) -> None:
        self._blobs()
        self._check_writable()
        if version:
            raise POSException.Unsupported("versions are not supported")
        if isinstance(oldserial, str):  # ZODB's blob doctests pass str
            oldserial = oldserial.encode("latin-1")
        commit = self._commit(transaction)
        blob = self._upload(commit, oid, blobfilename)
        commit.store(oid, oldserial, data, blob=blob)
        commit._process(block=False)

    def restoreBlob(self, oid: bytes, serial: bytes, data: bytes, blobfilename: str,
                    prev_txn: bytes | None, transaction) -> None:
        self._blobs()
        self._check_writable()
        commit = self._commit(transaction)
        blob = self._upload(commit, oid, blobfilename)
        commit.restore(oid, data, prev_txn, self._restored.get(oid, ZERO_TID), blob=blob)
        if commit.imposed:
            self._remember_restored((oid,), commit.ttid)
        commit._process(block=False)

    def _upload(self, commit, oid: bytes, blobfilename: str) -> tuple[bytes, int]:
        # the file is ours from now on: moved into the cache at the finish,
        # removed at the abort
        filename = commit.blob_files[oid] = self._blob_cache.take(blobfilename)
        return upload(commit, oid, filename)

    def loadBlob(self, oid: bytes, serial: bytes) -> str:
        cache = self._blobs()
        filename = cache.get(oid, serial)
        if filename is not None:
            return filename
        return cache.fetch(oid, serial, lambda f: download(self.app, oid, serial, f))

    def openCommittedBlobFile(self, oid: bytes, serial: bytes, blob=None):
        for _ in range(3):  # pruned by another process between lookup and open
            filename = self.loadBlob(oid, serial)
            try:
                return open(filename, "rb") if blob is None else BlobFile(filename, "r", blob)
            except FileNotFoundError:
                continue
        raise POSException.POSKeyError("blob file vanished from the cache", oid, serial)

    def _blobs_packed(self, pack_tid: bytes) -> int:
        """After our pack: drop from the cache the revisions it removed
        (every cached file older than ``pack_tid`` is asked about), so that
        loadBlob of a packed revision fails as on the storages.  How many
        files were dropped."""
        if self._blob_cache is None:
            return 0
        cached = self._blob_cache.files_before(pack_tid)
        if not cached:
            return 0
        app = self.app
        answers = app.ask_many((app.pt.partition(oid), Packets.AskObject, (oid, serial, None))
                               for oid, serial, _ in cached)
        dropped = 0
        for (_, _, path), (_, error) in zip(cached, answers, strict=True):
            if isinstance(error, RemoteError) and error.code in (
                    ErrorCodes.OID_NOT_FOUND, ErrorCodes.OID_DOES_NOT_EXIST):
                self._blob_cache.remove(path)
                dropped += 1
        return dropped

    def _blobs_committed(self, commit, tid: bytes) -> None:
        for oid, filename in commit.blob_files.items():
            try:
                self._blob_cache.add(oid, tid, filename)
            except OSError as e:  # committed all the same: loaded again if needed
                log.warning("%s: blob of %s not kept in the cache: %s", self.app.label,
                            oid.hex(), e)

    @staticmethod
    def _blobs_aborted(commit) -> None:
        for filename in commit.blob_files.values():
            try:
                os.remove(filename)
            except FileNotFoundError:
                pass
