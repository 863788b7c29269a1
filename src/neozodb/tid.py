"""TID arithmetic: ZODB timestamps <-> UNIX time, and TID allocation rules.

A ZODB TID is a ``persistent.TimeStamp`` packed as a 64-bit integer:

- the high 32 bits count "minutes since 1900-01-01 00:00 UTC" in a calendar
  where every month has 31 days (so it is not a real minute count: the gap
  between Feb 28 and Mar 1 is four fake days);
- the low 32 bits are the seconds within that minute, scaled by
  ``2**32 / 60`` and truncated.

This module is pure (no clock of its own: callers pass ``now``), so that the
master's transaction manager can be tested deterministically.
"""

from __future__ import annotations

import calendar
import datetime
import math
import re
import time

__all__ = [
    "MAX_TID",
    "final_tid",
    "format_tid_time",
    "next_tid",
    "tid_from_time",
    "tid_from_user",
    "time_from_tid",
]

MAX_TID = (1 << 64) - 1

_HEX = re.compile(r"0[xX][0-9a-fA-F]+")
_DEC = re.compile(r"[0-9]+")

# The exact divisor persistent.TimeStamp uses; 60 / 2**32 is exact in binary
# floating point, so dividing by it rounds the same way TimeStamp does.
_SECOND_UNIT = 60.0 / (1 << 32)


def _pack(year: int, month: int, day: int, hour: int, minute: int, second: float) -> int:
    minutes = (((year - 1900) * 12 + month - 1) * 31 + day - 1) * 24 + hour
    minutes = minutes * 60 + minute
    # TimeStamp truncates rather than rounds: do the same so TIDs match.
    return (minutes << 32) | int(second / _SECOND_UNIT)


def _unpack(tid: int) -> tuple[int, int, int, int, int, float]:
    minutes = tid >> 32
    minute = minutes % 60
    hours = minutes // 60
    hour = hours % 24
    days = hours // 24
    day = days % 31 + 1
    months = days // 31
    month = months % 12 + 1
    year = months // 12 + 1900
    return year, month, day, hour, minute, (tid & 0xFFFFFFFF) * _SECOND_UNIT


def tid_from_time(t: float) -> int:
    """TID of UNIX time ``t`` (UTC), as ``TimeStamp(*gmtime(t)[:5], t % 60)``."""
    g = time.gmtime(t)
    return _pack(g.tm_year, g.tm_mon, g.tm_mday, g.tm_hour, g.tm_min, t % 60)


def time_from_tid(tid: int) -> float:
    """UNIX time of ``tid`` (inverse of :func:`tid_from_time` up to ~14 ns).

    ``calendar.timegm`` works by day arithmetic, so a day past the end of a
    real month (possible in a hand-made TID) simply rolls over.
    """
    year, month, day, hour, minute, second = _unpack(tid)
    return calendar.timegm((year, month, day, hour, minute, 0)) + second


def format_tid_time(tid: int) -> str:
    """``'2026-11-27 20:59:44.954196'``: the UTC date of ``tid``, as ZODB's
    ``TimeStamp`` prints it (microseconds rounded)."""
    year, month, day, hour, minute, second = _unpack(tid)
    return "%04d-%02d-%02d %02d:%02d:%09.6f" % (year, month, day, hour, minute, second)


def neo_tid_time(tid: int) -> str:
    """The UTC date of ``tid`` as NEO's neoctl prints it: a ``datetime``,
    so microseconds truncated (one less than :func:`format_tid_time` half
    of the time) and left out when zero; :func:`format_tid_time` for a
    hand-made TID that is no real date."""
    year, month, day, hour, minute, _ = _unpack(tid)
    seconds, rest = divmod((tid & 0xFFFFFFFF) * 60, 1 << 32)
    try:
        return str(datetime.datetime(year, month, day, hour, minute, seconds,
                                     int(rest * (1e6 / (1 << 32)))))
    except ValueError:
        return format_tid_time(tid)


def next_tid(now: float, last: int) -> int:
    """A TID for ``now`` that is strictly greater than ``last``.

    The clock may go backwards or be coarse, so fall back to ``last + 1``.
    """
    tid = tid_from_time(now)
    return tid if tid > last else last + 1


def final_tid(now: float, last: int, ttid: int, num_partitions: int) -> int:
    """The final TID of a transaction whose temporary TID is ``ttid``.

    Transaction metadata was already stored in partition ``ttid % np`` at
    vote time, so the final TID must map to the same partition: take the
    smallest TID >= ``next_tid(now, last)`` congruent to ``ttid`` mod ``np``.
    """
    if num_partitions <= 0:
        raise ValueError("num_partitions must be positive")
    base = next_tid(now, last)
    return base + (ttid - base) % num_partitions


def tid_from_user(text: str) -> int:
    """Parse a TID given on neoctl's command line.

    Accepted: ``tid:<int>`` (decimal, or hexadecimal with ``0x``), or a UNIX
    time as a float.  Anything else raises ``ValueError``.
    """
    text = text.strip()
    if text.startswith("tid:"):
        digits = text[4:].strip()
        # Stricter than int(x, 0): no sign, no underscores, no octal/binary.
        if _HEX.fullmatch(digits):
            value = int(digits[2:], 16)
        elif _DEC.fullmatch(digits):
            value = int(digits, 10)
        else:
            raise ValueError("invalid TID: %r" % text)
        if value > MAX_TID:
            raise ValueError("TID out of range: %r" % text)
        return value
    try:
        t = float(text)
    except ValueError:
        raise ValueError("invalid TID or time: %r" % text) from None
    if not math.isfinite(t) or t < 0:
        raise ValueError("invalid time: %r" % text)
    try:
        tid = tid_from_time(t)
    except (OverflowError, OSError, ValueError):
        raise ValueError("time out of range: %r" % text) from None
    if tid > MAX_TID:
        raise ValueError("time out of range: %r" % text)
    return tid
