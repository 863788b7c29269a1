"""Blob revisions on the wire and in storage (feature ``blob``; the plan is
in docs/design.md, "Blobs").

A blob revision's record is the ZODB record (possibly compressed) followed
by a *tail*: the SHA-256 of the blob's content and its size (8 bytes, big
endian), with ``BLOB_FLAG`` set in its compression id.  Its checksum is the
SHA-1 of the whole, like any record's.  Contents move in chunks of
``CHUNK`` bytes (the last one shorter), chunk ``n`` covering bytes
``n * CHUNK`` to ``(n + 1) * CHUNK``.  Pure: no I/O.
"""
from __future__ import annotations

import hashlib

from .catalogue import ProtocolError

BLOB_FLAG = 0x80
DIGEST_SIZE = 32
TAIL_SIZE = DIGEST_SIZE + 8
CHUNK = 1 << 20
# greatest blob size a tail may name (what an 8-byte size and a chunk
# number kept in 63 bits allow, far beyond any file system's file)
MAX_SIZE = (1 << 63) - 1


def is_blob(compression: int | None) -> bool:
    """``compression`` None: a deletion as NEO's storages answer it."""
    return bool(compression and compression & BLOB_FLAG)


def add_tail(compression: int, stored: bytes, digest: bytes, size: int) -> tuple[int, bytes]:
    """(compression, stored bytes) of the blob revision whose record is
    ``stored`` (compressed as ``compression`` says) and whose content has
    SHA-256 ``digest`` and ``size`` bytes."""
    if len(digest) != DIGEST_SIZE or not 0 <= size <= MAX_SIZE:
        raise ValueError("bad blob digest or size")
    return compression | BLOB_FLAG, stored + digest + size.to_bytes(8, "big")


def split_tail(compression: int, stored: bytes) -> tuple[int, bytes, bytes, int]:
    """(compression of the record, record, content digest, content size)
    of a blob revision's stored bytes; ProtocolError if they cannot be."""
    if not compression & BLOB_FLAG or len(stored) < TAIL_SIZE:
        raise ProtocolError("not a blob revision (compression %r, %d bytes)" % (
            compression, len(stored)))
    size = int.from_bytes(stored[-8:], "big")
    if size > MAX_SIZE:
        raise ProtocolError("blob size out of range")
    return (compression & ~BLOB_FLAG, stored[:-TAIL_SIZE],
            stored[-TAIL_SIZE:-8], size)


def strip(compression: int, checksum: bytes, stored: bytes) -> tuple[int, bytes, bytes]:
    """(compression, checksum, stored bytes) of the record alone, as a peer
    without the feature gets a blob revision; others unchanged."""
    if not compression & BLOB_FLAG:
        return compression, checksum, stored
    compression, record, _, _ = split_tail(compression, stored)
    return compression, hashlib.sha1(record).digest(), record


def chunks(size: int) -> int:
    """How many chunks a content of ``size`` bytes has (0 for none)."""
    return -(-size // CHUNK)
