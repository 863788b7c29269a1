"""Compression of object records, as NEO stores them: zlib streams
(compression id 1), kept only when smaller, with the SHA-1 of the stored
bytes.

By default the stream is made by ISA-L (the ``isal`` package, in the
``client`` extra) when it is installed: on records of a few hundred bytes
to a few KB it takes from half to a seventh of zlib's time at level 6, for
the same size within a few percent (bench/README.md, "Compression").  Its
output is an ordinary zlib stream: any zlib, NEO's clients included,
reads it, and records written by zlib read the same.  ``zlib=N`` asks for
Python's zlib at level N, byte for byte what NEO writes at that level.
"""
from __future__ import annotations

import hashlib
import zlib

try:
    from isal import isal_zlib
except ImportError:  # not installed (no wheel for this platform): zlib does it all
    isal_zlib = None

#: the ``compress`` option's default: ISA-L if installed, else zlib at level 6
DEFAULT_LEVEL = -1
#: what DEFAULT_LEVEL uses, for the logs and the benchmarks
ENGINE = "isal" if isal_zlib is not None else "zlib"

NONE, ZLIB = 0, 1
# below this, zlib's header and checksum leave no room for a gain
_MIN_SIZE = 33


def deflate(data: bytes, level: int = DEFAULT_LEVEL) -> bytes:
    """``data`` as a zlib stream."""
    if level == DEFAULT_LEVEL and isal_zlib is not None:
        return isal_zlib.compress(data, isal_zlib.ISAL_DEFAULT_COMPRESSION)
    return zlib.compress(data, level)


def inflate(data: bytes) -> bytes:
    """The bytes of a zlib stream; ``zlib.error`` if it is not one,
    whichever implementation reads it."""
    if isal_zlib is None:
        return zlib.decompress(data)
    try:
        return isal_zlib.decompress(data)
    except Exception as e:  # isal's IsalError is not zlib.error
        raise zlib.error(str(e)) from None


def compress_record(data: bytes, level: int | None) -> tuple[int, bytes, bytes]:
    """(compression id, stored bytes, checksum) of a record: compressed
    (``level`` None: never) when that makes it smaller."""
    if level is not None and len(data) >= _MIN_SIZE:
        if level == DEFAULT_LEVEL and isal_zlib is not None:  # deflate(), a call less
            packed = isal_zlib.compress(data, isal_zlib.ISAL_DEFAULT_COMPRESSION)
        else:
            packed = zlib.compress(data, level)
        if len(packed) < len(data):
            return ZLIB, packed, hashlib.sha1(packed).digest()
    return NONE, data, hashlib.sha1(data).digest()
