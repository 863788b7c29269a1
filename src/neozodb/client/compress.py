"""Record compression as NEO does it: zlib (id 1) only when it makes the
record smaller, and a SHA-1 of the bytes as stored."""
from __future__ import annotations

import hashlib
import zlib

from neozodb.protocol import ZERO_HASH
from neozodb.protocol.blobs import BLOB_FLAG, TAIL_SIZE

NONE, ZLIB = 0, 1


class WrongChecksum(Exception):
    pass


def parse_compress(value: bool | str | None) -> int | None:
    """The ``compress`` option: True/'zlib' (level 6), 'zlib=N', or False.

    Returns the zlib level, or None for no compression."""
    if value in (None, False) or str(value).lower() in ("false", "0", "no", "off", "none"):
        return None
    if value is True or str(value).lower() in ("true", "1", "yes", "on", "zlib"):
        return 6
    text = str(value).lower()
    if text.startswith("zlib="):
        level = int(text[5:])
        if 0 <= level <= 9:
            return level
    raise ValueError(f"invalid compress option: {value!r}")


def compress(data: bytes, level: int | None) -> tuple[int, bytes, bytes]:
    """(compression id, stored bytes, checksum)."""
    if level is not None and len(data) > 32:
        packed = zlib.compress(data, level)
        if len(packed) < len(data):
            return ZLIB, packed, hashlib.sha1(packed).digest()
    return NONE, data, hashlib.sha1(data).digest()


def decompress(oid: bytes, serial: bytes, compression: int, checksum: bytes,
               data: bytes, verify: bool = True) -> bytes | None:
    """The object's bytes, or None for a deletion / undone creation."""
    if checksum == ZERO_HASH and not data:
        return None
    if verify and hashlib.sha1(data).digest() != checksum:
        raise WrongChecksum(f"wrong checksum for {oid.hex()} at {serial.hex()}")
    if compression & BLOB_FLAG:  # a blob revision: its record, without the tail
        if len(data) < TAIL_SIZE:
            raise WrongChecksum(f"truncated blob revision of {oid.hex()} at {serial.hex()}")
        compression &= ~BLOB_FLAG
        data = data[:-TAIL_SIZE]
    if compression == ZLIB:
        return zlib.decompress(data)
    if compression != NONE:
        raise WrongChecksum(f"unknown compression {compression} for {oid.hex()}")
    return data
