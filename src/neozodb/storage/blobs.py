"""Blob contents on a storage node (feature ``blob``; docs/design.md,
"Blobs"), a mixin of the client handler.

An upload: the chunks a client sends, in order, for the blob an object of
its transaction gets, before the store of the object's record.  They are
written under a new blob id as they come, and hashed; the store of the
record (a blob revision, whose tail names the content's digest and size)
must match them, and attaches them to its data row.  An upload the record
store does not take is deleted at the vote or the abort; one left by a
crash, at the next start.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

from neozodb.net.connection import HandlerError
from neozodb.protocol import ErrorCodes, Packets, ProtocolError
from neozodb.protocol.blobs import BLOB_FLAG, CHUNK, chunks, split_tail, strip
from neozodb.protocol.features import BLOB
from neozodb.protocol.values import check_id

log = logging.getLogger("neozodb.storage")

WINDOW = 4  # chunks asked ahead when replicating a content


@dataclass(eq=False)
class Upload:
    blob_id: int
    chunks: int = 0
    size: int = 0
    hasher: object = field(default_factory=hashlib.sha256)


def drop_uploads(backend, txn) -> None:
    """Delete the uploads of ``txn`` that no record store took."""
    for upload in txn.uploads.values():
        backend.drop_blob(upload.blob_id)
    txn.uploads.clear()


def answer_record(conn, compression: int, checksum: bytes, data: bytes):
    """What a peer gets of a stored record: a blob revision stripped of its
    tail for a peer without the feature (a NEO client reads the record)."""
    if BLOB in conn.peer_features:
        return compression, checksum, data
    return strip(compression, checksum, data)


class Blobs:
    """ClientHandler's blob requests (see the module docstring)."""

    def _blob_peer(self, conn, packet) -> None:
        if BLOB not in conn.peer_features:
            raise ProtocolError("unexpected %s" % packet.name)

    def AskStoreBlobChunk(self, conn, msg_id, ttid, oid, n, data):
        app = self.app
        self._blob_peer(conn, Packets.AskStoreBlobChunk)
        self._writable(Packets.AskStoreBlobChunk)
        check_id(ttid, "ttid")
        check_id(oid, "oid")
        if len(data) > CHUNK or n < 0:
            raise ProtocolError("blob chunk %r of %d bytes for %s" % (n, len(data), oid.hex()))
        if ttid in app.locks.aborted:
            conn.answer(msg_id, Packets.AnswerStoreBlobChunk)  # moot: the client aborts
            return
        txn = self._own(conn, ttid, Packets.AskStoreBlobChunk)
        if txn.voted:
            raise ProtocolError("blob chunk after vote in %s" % ttid.hex())
        if app.cell_state(app.pt.partition(oid)) is None:
            conn.answer(msg_id, Packets.AnswerStoreBlobChunk)  # not ours: ignored
            return
        upload = txn.uploads.get(oid)
        if n == 0:
            if upload is not None:  # sent again (the record is stored again)
                app.backend.drop_blob(upload.blob_id)
            upload = txn.uploads[oid] = Upload(app.backend.new_blob())
        elif upload is None or n != upload.chunks or upload.size != n * CHUNK:
            raise ProtocolError("blob chunk %d of %s out of order" % (n, oid.hex()))
        app.backend.store_blob_chunk(upload.blob_id, n, data)
        upload.hasher.update(data)
        upload.chunks += 1
        upload.size += len(data)
        conn.answer(msg_id, Packets.AnswerStoreBlobChunk)

    def _blob_record(self, conn, txn, oid: bytes, compression: int, data: bytes) -> None:
        """Check a blob revision's store against the upload of its content
        (before anything of the store is kept)."""
        if BLOB not in conn.peer_features:
            raise ProtocolError("blob revision from a peer without blobs")
        _, _, digest, size = split_tail(compression, data)
        upload = txn.uploads.get(oid)
        if upload is None:
            # nothing sent: the content must be here already (the same
            # record stored before, or an undo's back-pointer): checked in
            # _blob_attach once the data row is known
            return
        if upload.hasher.digest() != digest or upload.size != size:
            log.error("%s: blob of %s in %s does not match its record (%d bytes received,"
                      " %d announced)", self.app.label, oid.hex(), txn.ttid.hex(),
                      upload.size, size)
            raise HandlerError("blob content of %s does not match its record" % oid.hex(),
                               ErrorCodes.PROTOCOL_ERROR)

    def _blob_attach(self, txn, oid: bytes, data_id: int | None, out_of_date: bool) -> None:
        """After a blob revision's data row was stored (and held): it gets
        its upload.  Without one, the row must have its content, except in
        an OUT_OF_DATE cell: a client that uploaded the content before it
        saw us running (or an undo to a revision we miss) stores the record
        alone, and the replicator fetches the content from a readable cell
        before the partition is done (``replicate_blobs``).  Once it told
        the master the partition is done, it would not: refused then."""
        app = self.app
        backend = app.backend
        upload = txn.uploads.pop(oid, None)
        if upload is not None:
            backend.attach_blob(data_id, upload.blob_id)
            return
        if data_id is None or backend.has_blob(data_id):
            return
        partition = app.pt.partition(oid)
        if out_of_date and partition not in app.replicator.notified:
            log.info("%s: blob revision of %s in %s stored without its content in"
                     " OUT_OF_DATE partition %d: replication fetches it", app.label,
                     oid.hex(), txn.ttid.hex(), partition)
            return
        backend.release_data([data_id], prune=True)  # the store's hold: nothing kept
        raise HandlerError("no blob content for %s in %s" % (oid.hex(), txn.ttid.hex()),
                           ErrorCodes.PROTOCOL_ERROR)

    def AskBlobChunk(self, conn, msg_id, checksum, n):
        answer_blob_chunk(self.app, conn, msg_id, checksum, n)


def check_replicated(conn, compression: int, data: bytes) -> None:
    """A replicated blob revision: only from a peer with the feature, and
    with a whole tail."""
    if compression & BLOB_FLAG:
        if BLOB not in conn.peer_features:
            raise ProtocolError("blob revision from %s, which has no blobs" % conn.label)
        split_tail(compression, data)


def answer_blob_chunk(app, conn, msg_id: int, checksum: bytes, n: int) -> None:
    """A chunk of a content we have, to a client or a replicating storage."""
    if BLOB not in conn.peer_features:
        raise ProtocolError("unexpected AskBlobChunk")
    if len(checksum) != 20 or not 0 <= n < 1 << 62:
        raise ProtocolError("bad AskBlobChunk")
    chunk = app.backend.load_blob_chunk(checksum, n)
    if chunk is None:
        raise HandlerError("no chunk %d of blob %s here" % (n, checksum.hex()),
                           ErrorCodes.OID_NOT_FOUND)
    conn.answer(msg_id, Packets.AnswerBlobChunk, chunk)


async def replicate_blobs(app, conn, partition: int, first: tuple[int, int],
                          last: tuple[int, int] | None = None) -> None:
    """Fetch from a replication source the contents that the blob revisions
    of ``partition`` within ``first`` and ``last`` (excluded; None: no
    end) lack here; BadContent if the source's copy does not match.

    Found in the database, not among the records just received: a row a
    client stored here, in our OUT_OF_DATE cell, without the content (it
    uploaded it before it saw us running: the store is accepted lockless,
    and the source will not send the record again), and a row an
    interrupted replication wrote before its content came, lack theirs too.
    Returns once a look finds none lacking, with no wait after it: the
    caller may tell the master the partition is done in the same turn."""
    backend = app.backend
    while True:
        lacking = backend.blobs_lacking(partition, first, last)
        if not lacking:
            return
        for data_id in lacking:
            found = backend.load_data(data_id)
            if found is None or backend.has_blob(data_id):
                continue  # gone, or given its content, while we fetched another
            checksum, compression, stored = found
            await _fetch_content(app, conn, data_id, checksum, compression, stored)


async def _fetch_content(app, conn, data_id: int, checksum: bytes, compression: int,
                         stored: bytes) -> None:
    """Fetch and attach the content of data row ``data_id``."""
    backend = app.backend
    _, _, digest, size = split_tail(compression, stored)
    blob_id = backend.new_blob()
    hasher = hashlib.sha256()
    asked = []
    total = chunks(size) or 1  # an empty content is one empty chunk
    n = received = 0
    try:
        while received < total:
            while n < total and len(asked) < WINDOW:
                asked.append(conn.ask(Packets.AskBlobChunk, checksum, n))
                n += 1
            (data,) = await asked.pop(0)
            backend.store_blob_chunk(blob_id, received, data)
            hasher.update(data)
            received += 1
            size_left = size - (received - 1) * CHUNK
            if len(data) != min(CHUNK, size_left):
                break
        if hasher.digest() != digest:
            raise BadContent("blob content %s from %s does not match its record" % (
                checksum.hex(), conn.label))
    except BaseException:
        for future in asked:
            future.cancel()
        backend.drop_blob(blob_id)
        raise
    if backend.load_data(data_id) is None:
        backend.drop_blob(blob_id)  # the row went while we fetched (attached, it would stay)
        return
    if backend.attach_blob(data_id, blob_id):
        log.debug("%s: blob content %s (%d bytes) fetched from %s", app.label,
                  checksum.hex(), size, conn.label)


class BadContent(Exception):
    """A replication source sent a blob content that does not match."""

