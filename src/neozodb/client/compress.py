"""Record compression as NEO does it: zlib (id 1) only when it makes the
record smaller, and a SHA-1 of the bytes as stored (neozodb/deflate.py)."""
from __future__ import annotations

import hashlib

from neozodb.deflate import DEFAULT_LEVEL, NONE, ZLIB, inflate
from neozodb.protocol import ZERO_HASH
from neozodb.protocol.blobs import BLOB_FLAG, TAIL_SIZE


class WrongChecksum(Exception):
    pass


def parse_compress(value: bool | str | None) -> int | None:
    """The ``compress`` option: True/'zlib' (the default: ISA-L if
    installed, else zlib level 6), 'zlib=N' (zlib at level N), or False.

    Returns the level (DEFAULT_LEVEL for the default), or None for no
    compression."""
    if value in (None, False) or str(value).lower() in ("false", "0", "no", "off", "none"):
        return None
    if value is True or str(value).lower() in ("true", "1", "yes", "on", "zlib"):
        return DEFAULT_LEVEL
    text = str(value).lower()
    if text.startswith("zlib="):
        level = int(text[5:])
        if 0 <= level <= 9:
            return level
    raise ValueError(f"invalid compress option: {value!r}")


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
        return inflate(data)
    if compression != NONE:
        raise WrongChecksum(f"unknown compression {compression} for {oid.hex()}")
    return data
