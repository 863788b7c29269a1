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

import functools
import hashlib
import zlib
from collections.abc import Callable

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
# The default engine keeps a stream that saves at least 1/2**_KEEP_SHIFT
# of the record (a quarter): for less, inflating it at every load costs
# more time than its bytes saved take on a network of 1 Gb/s (about 2.5 us
# against 8 ns a byte, for records of a few hundred bytes).  `zlib=N`
# keeps NEO's rule, a stream whenever it is smaller, for space above all.
_KEEP_SHIFT = 2
# Records of a class whose last try fell short of that are stored as they
# are, the next 2, 4, 8... up to 2**_MAX_SKIP_SHIFT (128) records of that
# class, then tried again: incompressible contents (random, already
# compressed) stop costing a deflation each.
_MAX_SKIP_SHIFT = 7
_MAX_CLASSES = 1024  # classes followed at once (the table starts over past it)



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


class AdaptiveCompressor:
    """The default engine's policy, ``compress_record`` for DEFAULT_LEVEL
    with two rules of its own (docs/design.md, "Stores"): a stream is kept
    when it saves at least a quarter of the record, and records of a class whose
    last try did not are stored as they are for a while (up to 128).  The
    class is the first pickle of a ZODB record (``module\\nname\\n``); records
    of other shapes share one entry.  Either way the record is one NEO reads:
    this decides only which are compressed.  Several threads may call it:
    a race loses a count, never a record."""

    def __init__(self) -> None:
        self._classes: dict[bytes, list[int]] = {}  # class -> [failed tries in a row, skips left]

    def __call__(self, data: bytes) -> tuple[int, bytes, bytes]:
        size = len(data)
        if size >= _MIN_SIZE:
            end = data.find(b"\n", 0, 128)
            key = data[:data.find(b"\n", end + 1, 256) + 1] if end >= 0 else b""
            state = self._classes.get(key)
            if state is not None and state[1] > 0:
                state[1] -= 1
            else:
                packed = deflate(data)
                if len(packed) <= size - (size >> _KEEP_SHIFT):
                    if state is not None:
                        state[0] = 0
                    return ZLIB, packed, hashlib.sha1(packed).digest()
                if state is None:
                    if len(self._classes) >= _MAX_CLASSES:
                        self._classes.clear()
                    state = self._classes[key] = [0, 0]
                if state[0] < _MAX_SKIP_SHIFT:
                    state[0] += 1
                state[1] = 1 << state[0]
        return NONE, data, hashlib.sha1(data).digest()


def record_compressor(level: int | None) -> Callable[[bytes], tuple[int, bytes, bytes]]:
    """What makes (compression id, stored bytes, checksum) of each record
    for the ``compress`` option's ``level``: the adaptive policy for the
    default engine, NEO's rule (compressed when smaller) for an explicit
    zlib level, byte for byte what NEO writes, or never compressed (None)."""
    if level == DEFAULT_LEVEL:
        return AdaptiveCompressor()
    return functools.partial(compress_record, level=level)
