"""Record compression (neozodb/deflate.py): ISA-L by default when
installed, zlib otherwise or when a zlib level is asked; zlib streams
either way, so NEO's clients (zlib) read what ours write and back."""
from __future__ import annotations

import hashlib
import os
import pickle
import random
import subprocess
import sys
import zlib

import pytest

from neozodb import deflate
from neozodb.client.compress import parse_compress
from neozodb.deflate import DEFAULT_LEVEL, NONE, ZLIB, compress_record, inflate

pytestmark = pytest.mark.timeout(60)


def records() -> list[bytes]:
    """ZODB-like pickles of a few hundred bytes to tens of KB, more or less
    compressible."""
    rnd = random.Random(7)
    words = ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing"]
    out = []
    for n in (10, 40, 300, 2000, 20000):
        out.append(pickle.dumps({"text": " ".join(rnd.choice(words) for _ in range(n))}, 3))
        out.append(pickle.dumps({"data": os.urandom(n)}, 3))
        out.append(pickle.dumps({"key-%06d" % rnd.randrange(10 ** 6): i for i in range(n // 10)},
                                3))
    return out


def test_the_default_engine_is_isal_when_installed():
    try:
        import isal  # noqa: F401
    except ImportError:
        assert deflate.ENGINE == "zlib"
    else:
        # the client extra installs it on this machine kind: a broken
        # install must not silently fall back
        assert deflate.ENGINE == "isal"


@pytest.mark.parametrize("level", [DEFAULT_LEVEL, 1, 6, 9])
def test_every_stored_record_is_a_zlib_stream_of_the_data(level):
    compressed = 0
    for data in records():
        compression, stored, checksum = compress_record(data, level)
        assert checksum == hashlib.sha1(stored).digest()
        if compression == ZLIB:
            compressed += 1
            assert len(stored) < len(data)
            assert zlib.decompress(stored) == data  # what NEO's clients do
            assert inflate(stored) == data
        else:
            assert compression == NONE and stored == data
    assert compressed >= 8  # the text and the dicts at least


@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_an_explicit_zlib_level_writes_what_zlib_writes(level):
    for data in records():
        compression, stored, _ = compress_record(data, level)
        if compression == ZLIB:
            assert stored == zlib.compress(data, level)


def test_small_or_incompressible_records_are_stored_as_they_are():
    for data in (b"", b"x" * 32, os.urandom(5000)):
        compression, stored, _ = compress_record(data, DEFAULT_LEVEL)
        assert (compression, stored) == (NONE, data)
    assert compress_record(b"x" * 33, DEFAULT_LEVEL)[0] == ZLIB
    assert compress_record(b"x" * 1000, None)[:2] == (NONE, b"x" * 1000)


def test_inflate_reads_zlib_and_refuses_garbage_as_zlib_does():
    data = records()[3]
    for level in range(10):
        assert inflate(zlib.compress(data, level)) == data
    for bad in (b"not zlib at all", zlib.compress(data)[:-3], zlib.compress(data)[:-1] + b"!"):
        with pytest.raises(zlib.error):
            inflate(bad)


def test_the_option_default_and_zlib_levels():
    assert parse_compress(True) == parse_compress("zlib") == DEFAULT_LEVEL
    assert parse_compress("zlib=6") == 6
    assert parse_compress("zlib=0") == 0
    assert parse_compress(False) is None
    with pytest.raises(ValueError):
        parse_compress("zlib=10")


def test_without_isal_zlib_does_everything():
    """Where isal is not installed (no wheel for the platform), the default
    is zlib at level 6 and reads are zlib's: checked in a process where
    importing isal fails."""
    script = """
import sys, zlib, pickle
sys.modules["isal"] = None  # import isal raises ImportError
from neozodb import deflate
assert deflate.ENGINE == "zlib", deflate.ENGINE
data = pickle.dumps({"text": "lorem ipsum dolor " * 100}, 3)
compression, stored, _ = deflate.compress_record(data, deflate.DEFAULT_LEVEL)
assert compression == deflate.ZLIB and stored == zlib.compress(data, 6)
assert deflate.inflate(stored) == data
try:
    deflate.inflate(b"garbage")
except zlib.error:
    print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
