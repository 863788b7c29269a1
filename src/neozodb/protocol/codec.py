"""Handshake, message encoding and the incremental stream decoder."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import NoReturn

import msgpack

from .catalogue import PACKETS, ProtocolError
from .enums import ENUMS, ErrorCodes

__all__ = ["PROTOCOL_VERSION", "HANDSHAKE", "check_handshake", "encode", "Decoder"]

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


class Decoder:
    """Incremental decoder of the message stream that follows the handshake.

    ``feed()`` bytes as they arrive and iterate to get each complete,
    validated ``(msg_id, code, args)``.  Any malformed input raises
    :class:`ProtocolError`, after which the decoder refuses to continue:
    there is no way to resynchronise a msgpack stream.
    """

    __slots__ = ("_unpacker", "_next", "_broken")

    def __init__(self, max_buffer_size: int = 64 << 20) -> None:
        self._unpacker = msgpack.Unpacker(
            use_list=False, raw=False, strict_map_key=False,
            ext_hook=_ext_hook, max_buffer_size=max_buffer_size)
        self._next = self._unpacker.__next__
        self._broken: str | None = None

    def feed(self, data: bytes) -> None:
        if self._broken is not None:
            raise ProtocolError(self._broken)
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
