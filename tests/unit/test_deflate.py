"""Record compression (neozodb/deflate.py): ISA-L by default when
installed, zlib otherwise or when a zlib level is asked; zlib streams
either way, so NEO's clients (zlib) read what ours write and back."""
from __future__ import annotations

import base64
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


# -- the default engine's policy (deflate.AdaptiveCompressor) -----------------------------

def zodb_record(klass: bytes, state) -> bytes:
    """A record as ZODB writes it: the class's pickle, then the state's."""
    return b"\x80\x03c" + klass + b"\nq\x00." + pickle.dumps(state, 3)


TEXT = " ".join(["lorem ipsum dolor sit amet"] * 20)


def test_the_default_policy_keeps_a_stream_that_saves_a_quarter():
    for data in records():
        # a new one each time: these share one entry, and the failures of
        # the random ones would skip the next (see the test below)
        compression, stored, checksum = deflate.record_compressor(DEFAULT_LEVEL)(data)
        assert checksum == hashlib.sha1(stored).digest()
        packed = deflate.deflate(data)
        if len(data) >= 33 and len(packed) <= len(data) * 3 // 4:
            assert compression == ZLIB and zlib.decompress(stored) == data
        else:
            assert (compression, stored) == (NONE, data)
    # what saves less than a quarter is stored as it is: base64 of random
    # bytes (6 bits a character) deflates to about 87% at this size
    data = zodb_record(b"app\nToken", {"token": base64.b64encode(os.urandom(225)).decode()})
    assert 0.75 < len(deflate.deflate(data)) / len(data) < 1
    assert deflate.record_compressor(DEFAULT_LEVEL)(data)[:2] == (NONE, data)


def test_a_class_that_does_not_compress_is_not_tried_for_a_while(monkeypatch):
    tries = []
    real = deflate.deflate
    monkeypatch.setattr(deflate, "deflate", lambda data: tries.append(data) or real(data))
    compress = deflate.AdaptiveCompressor()

    def image() -> bytes:
        return zodb_record(b"app.images\nThumbnail", {"png": os.urandom(500)})

    def page() -> bytes:  # the same class, compressible
        return zodb_record(b"app.images\nThumbnail", {"text": TEXT})

    assert compress(image())[0] == NONE and len(tries) == 1
    # the next 2 records of the class are stored as they are, untried
    assert compress(page())[:2] == (NONE, page()) and compress(page())[0] == NONE
    assert len(tries) == 1
    assert compress(page())[0] == ZLIB and len(tries) == 2
    assert compress(page())[0] == ZLIB and len(tries) == 3  # the success forgot the failure
    # failures in a row: twice as many records untried each time, up to 128
    gaps = []
    for _ in range(9):
        before, count = len(tries), 0
        while len(tries) == before:
            assert compress(image())[0] == NONE
            count += 1
        gaps.append(count - 1)
    assert gaps == [0, 2, 4, 8, 16, 32, 64, 128, 128]
    # the count of failures stops at 128's: a class that never compresses
    # does not grow an ever bigger number
    assert [state[0] for state in compress._classes.values()] == [7]
    # other classes, and records that are not ZODB's, are tried meanwhile
    before = len(tries)
    assert compress(zodb_record(b"app.docs\nPage", {"text": TEXT}))[0] == ZLIB
    assert compress(b"not a ZODB record: " + TEXT.encode())[0] == ZLIB
    assert len(tries) == before + 2


def test_the_classes_followed_are_bounded():
    compress = deflate.AdaptiveCompressor()
    for i in range(3000):
        compress(zodb_record(b"app.gen\nC%d" % i, {"png": os.urandom(100)}))
    assert 0 < len(compress._classes) <= 1024


def test_explicit_levels_and_none_keep_their_rules():
    data = zodb_record(b"app\nToken", {"token": base64.b64encode(os.urandom(225)).decode()})
    for level in (1, 6, 9):  # NEO's rule: a stream whenever smaller, byte for byte zlib's
        assert deflate.record_compressor(level)(data)[:2] == (ZLIB, zlib.compress(data, level))
    assert deflate.record_compressor(None)(zodb_record(b"a\nB", {"text": TEXT}))[0] == NONE
