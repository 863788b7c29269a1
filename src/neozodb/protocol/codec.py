"""Handshake, message encoding and the incremental stream decoder."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import NoReturn

import msgpack

from .catalogue import PACKETS, ProtocolError
from .enums import ENUMS, ErrorCodes

__all__ = ["PROTOCOL_VERSION", "HANDSHAKE", "check_handshake", "encode", "Decoder",
           "MAX_MESSAGE_SIZE", "FIRST_BYTES_LIMIT"]

PROTOCOL_VERSION = 5
HANDSHAKE = msgpack.packb(["NEO", PROTOCOL_VERSION], use_bin_type=True)
assert HANDSHAKE == b"\x92\xa3NEO\x05"
_HANDSHAKE_PREFIX = HANDSHAKE[:-1]


def check_handshake(data: bytes) -> None:
    """Accept the 6 handshake bytes received from a peer, or raise."""
    if data == HANDSHAKE:
        return
    if data[:1] == b"\x16":  # a TLS record: the peer has TLS configured, we have not
        raise ProtocolError("TLS handshake received on a plain port (this node has no --ca/--cert/--key)")
    if len(data) == len(HANDSHAKE) and data[:-1] == _HANDSHAKE_PREFIX:
        raise ProtocolError("protocol version mismatch")
    raise ProtocolError("not a NEO peer")


# ---------------------------------------------------------------------------
# Encoding

# Enum members are few: precompute their ext objects once.
_EXT_OF_MEMBER: dict[object, msgpack.ExtType] = {
    m: msgpack.ExtType(e.EXT_CODE, msgpack.packb(m.value)) for e in ENUMS for m in e
}


def _default(obj: object) -> msgpack.ExtType:
    # Called by the Packer for anything it cannot encode natively; enum
    # members are plain Enum (not int) precisely so that they land here.
    try:
        return _EXT_OF_MEMBER[obj]
    except (KeyError, TypeError):
        raise TypeError(f"cannot encode {type(obj).__name__}: {obj!r}") from None


# A Packer is not thread-safe, and packb() would allocate a fresh Packer
# (and its buffer) per message: keep one per thread.
_local = threading.local()
_ERROR = 0x8000


def _new_pack() -> Callable[[object], bytes]:
    pack = _local.pack = msgpack.Packer(use_bin_type=True, default=_default).pack
    return pack


def encode(msg_id: int, code: int, args: tuple | list) -> bytes:
    """One framed message: msgpack of ``[msg_id, code, args]``.

    Arguments are not validated (see ``PacketType.check``).  ``Error``
    accepts an ``ErrorCodes`` member as its code and sends its int value.
    """
    if code == _ERROR and args and type(args[0]) is ErrorCodes:
        args = (args[0].value, *args[1:])
    try:
        pack = _local.pack
    except AttributeError:
        pack = _new_pack()
    return pack((msg_id, code, args))


# ---------------------------------------------------------------------------
# Decoding

# Payloads as the reference encoder writes them (positive fixint); anything
# else is decoded the slow way in _ext_hook.
_MEMBER_OF_EXT: tuple[dict[bytes, object], ...] = tuple(
    {msgpack.packb(m.value): m for m in e} for e in ENUMS)


def _ext_hook(code: int, data: bytes) -> object:
    try:
        return _MEMBER_OF_EXT[code][data]
    except (IndexError, KeyError):
        pass
    if not 0 <= code < len(ENUMS):
        raise ProtocolError(f"unknown ext type {code}")
    enum = ENUMS[code]
    try:
        value = msgpack.unpackb(data)
        if type(value) is int:
            return enum(value)
    except Exception:
        pass
    raise ProtocolError(f"invalid {enum.__name__} value")


_MAX_MSG_ID = 0xFFFFFFFF

# Limits on what one message may hold.  msgpack's defaults derive from the
# buffer size, so a 5-byte header could announce 64 M elements; these stay
# above what any legitimate message holds within NEO's 64 MiB bound: a p64
# list costs 10 bytes an entry (so 6.7 M oids, e.g. the invalidations or
# AnswerTIDs of a huge transaction, fit in 8 M), a map entry at least 2
# bytes (partitions of CheckReplicas); str appears only in free-form `any`
# fields; ext payloads are enum values (1 to 9 bytes).  Nesting is bounded
# by msgpack itself (StackError past 1024 levels, before any allocation).
MAX_MESSAGE_SIZE = 64 << 20
MAX_ARRAY_LEN = 8 << 20
MAX_MAP_LEN = 4 << 20
MAX_STR_LEN = 16 << 20
MAX_EXT_LEN = 16

# Before a peer identifies, it may send this many bytes in all: its
# RequestIdentification (or NEO's anonymous neoctl's first request) takes
# a few hundred.  Decoding amplifies input about 80 times (a 1-byte empty
# map is a 64-byte dict), so unidentified input is held as raw bytes until
# a message is complete (checked by a non-constructing msgpack pass): a
# partial message costs its bytes only, a complete one at most ~5 MB while
# it is decoded and refused.
FIRST_BYTES_LIMIT = 64 << 10


class Decoder:
    """Incremental decoder of the message stream that follows the handshake.

    ``feed()`` bytes as they arrive and iterate to get each complete,
    validated ``(msg_id, code, args)``.  Any malformed input raises
    :class:`ProtocolError`, after which the decoder refuses to continue:
    there is no way to resynchronise a msgpack stream.

    With ``first_limit``, the decoder starts restricted: at most that many
    bytes in all until :meth:`lift_limit` is called (the peer identified).
    """

    __slots__ = ("_unpacker", "_next", "_broken", "_probe", "_held", "_first_limit",
                 "_received", "_pending")

    def __init__(self, max_buffer_size: int = MAX_MESSAGE_SIZE,
                 first_limit: int | None = None) -> None:
        self._unpacker = msgpack.Unpacker(
            use_list=False, raw=False, strict_map_key=False,
            ext_hook=_ext_hook, max_buffer_size=max_buffer_size,
            max_bin_len=max_buffer_size, max_str_len=min(MAX_STR_LEN, max_buffer_size),
            max_array_len=min(MAX_ARRAY_LEN, max_buffer_size),
            max_map_len=min(MAX_MAP_LEN, max_buffer_size), max_ext_len=MAX_EXT_LEN)
        self._next = self._unpacker.__next__
        self._broken: str | None = None
        # restricted mode: a msgpack pass that builds nothing finds where
        # messages end; complete ones go to _unpacker, the rest is _held
        self._probe: msgpack.Unpacker | None = None
        self._held = bytearray()
        self._first_limit = first_limit or 0
        self._received = 0
        self._pending: str | None = None  # the probe's error, raised after what came before
        if first_limit is not None:
            self._probe = msgpack.Unpacker(max_buffer_size=first_limit)

    @property
    def restricted(self) -> bool:
        return self._probe is not None

    def feed(self, data: bytes) -> None:
        if self._broken is not None:
            raise ProtocolError(self._broken)
        if self._probe is not None:
            return self._feed_restricted(data)
        try:
            self._unpacker.feed(data)
        except Exception as e:
            self._fail(f"cannot buffer input: {_reason(e)}", e)

    def _feed_restricted(self, data: bytes) -> None:
        if self._pending is not None:
            self._fail(self._pending)
        self._received += len(data)
        if self._received > self._first_limit:
            self._fail(f"more than {self._first_limit} bytes before identification")
        probe = self._probe
        held = self._held
        # where held[0] is in the stream (probe.tell() is not: it counts the
        # bytes of an incomplete message it went through)
        passed = end = self._received - len(data) - len(held)
        held += data
        probe.feed(data)
        try:
            while True:
                probe.skip()
                end = probe.tell()
        except msgpack.OutOfData:
            pass
        except Exception as e:  # StackError: nested deeper than msgpack's 1024
            # the messages before it are processed first, as unrestricted
            self._pending = f"malformed message: {_reason(e)}"
        if end > passed:
            self._unpacker.feed(bytes(held[:end - passed]))
            del held[:end - passed]

    def lift_limit(self) -> None:
        """The peer identified: its messages may now be as large as any."""
        if self._probe is None:
            return
        self._probe = None
        if self._held:
            data, self._held = bytes(self._held), bytearray()
            try:
                self._unpacker.feed(data)
            except Exception as e:
                self._fail(f"cannot buffer input: {_reason(e)}", e)

    def __iter__(self) -> Iterator[tuple[int, int, tuple]]:
        return self

    def __next__(self) -> tuple[int, int, tuple]:
        if self._broken is not None:
            raise ProtocolError(self._broken)
        try:
            msg = self._next()
        except StopIteration:
            if self._pending is not None:
                self._fail(self._pending)
            raise
        except ProtocolError as e:
            self._fail(str(e), e)
        except Exception as e:
            self._fail(f"malformed message: {_reason(e)}", e)
        # Hot path: every received message goes through these checks.
        if type(msg) is tuple and len(msg) == 3:
            msg_id, code, args = msg
            if type(code) is int:
                pt = PACKETS.get(code)
                if (pt is not None and type(msg_id) is int
                        and 0 <= msg_id <= _MAX_MSG_ID and type(args) is tuple
                        and pt.validate(args)):
                    return msg
        self._fail(_explain(msg))

    def _fail(self, reason: str, cause: BaseException | None = None) -> NoReturn:
        self._broken = "decoder unusable after: " + reason
        raise ProtocolError(reason) from cause


def _reason(e: BaseException) -> str:
    text = str(e)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _explain(msg: object) -> str:
    """Why a decoded object is not an acceptable message (slow path)."""
    if type(msg) is not tuple or len(msg) != 3:
        return "message is not a 3-element array"
    msg_id, code, args = msg
    if type(code) is not int:
        return "packet code is not an int"
    pt = PACKETS.get(code)
    if pt is None:
        return f"unknown packet code 0x{code:x}" if code >= 0 else f"unknown packet code {code}"
    if type(msg_id) is not int or not 0 <= msg_id <= _MAX_MSG_ID:
        return f"{pt.name}: invalid message id"
    if type(args) is not tuple:
        return f"{pt.name}: arguments are not an array"
    return pt.explain(args) or f"{pt.name}: invalid arguments"
