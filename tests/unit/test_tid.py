"""TID <-> time arithmetic, checked against persistent.TimeStamp."""

import calendar
import struct
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from persistent.TimeStamp import TimeStamp

from neozodb.tid import (
    MAX_TID,
    final_tid,
    format_tid_time,
    next_tid,
    tid_from_time,
    tid_from_user,
    time_from_tid,
)

pytestmark = pytest.mark.timeout(60)

# From neoctl-output.md: last_tid = 0x40d4debbfcdf855 (2026-11-27 20:59:44.954196)
KNOWN_TID = 0x40D4DEBBFCDF855
KNOWN_TEXT = "2026-11-27 20:59:44.954196"
KNOWN_TIME = calendar.timegm((2026, 11, 27, 20, 59, 44)) + 0.954196

# Times from 1970 to 2100: the range TIDs are realistically made of.
times = st.floats(min_value=0, max_value=4102444800.0, allow_nan=False)


def timestamp_tid(t: float) -> int:
    """What ZODB itself does to turn a time into a TID."""
    ts = TimeStamp(*time.gmtime(t)[:5] + (t % 60,))
    return struct.unpack(">Q", ts.raw())[0]


def p64(n: int) -> bytes:
    return struct.pack(">Q", n)


def test_known_tid_formats_as_neoctl_prints_it():
    assert format_tid_time(KNOWN_TID) == KNOWN_TEXT
    assert str(TimeStamp(p64(KNOWN_TID))) == KNOWN_TEXT


def test_known_time_gives_the_known_tid():
    tid = tid_from_time(KNOWN_TIME)
    assert tid == timestamp_tid(KNOWN_TIME)
    # The minute part is exact; the printed time is rounded to the
    # microsecond, and one microsecond is ~71.6 units of the low word.
    assert tid >> 32 == KNOWN_TID >> 32
    assert abs(tid - KNOWN_TID) < 72
    assert format_tid_time(tid) == KNOWN_TEXT


def test_known_tid_time_matches_timestamp():
    assert time_from_tid(KNOWN_TID) == pytest.approx(TimeStamp(p64(KNOWN_TID)).timeTime(), abs=1e-6)
    assert time_from_tid(KNOWN_TID) == pytest.approx(KNOWN_TIME, abs=1e-6)


def test_months_have_31_days():
    # 2026-03-01 00:00 is 4 fake days (Feb 28, 29, 30, 31) after 2026-02-28
    # 00:00, not 1.
    feb28 = tid_from_time(calendar.timegm((2026, 2, 28, 0, 0, 0)))
    mar01 = tid_from_time(calendar.timegm((2026, 3, 1, 0, 0, 0)))
    assert (mar01 >> 32) - (feb28 >> 32) == 4 * 24 * 60
    assert time_from_tid(mar01) - time_from_tid(feb28) == 86400


@given(times)
def test_tid_from_time_matches_timestamp(t):
    assert tid_from_time(t) == timestamp_tid(t)


@given(times)
def test_round_trip(t):
    tid = tid_from_time(t)
    back = time_from_tid(tid)
    # Truncation to 60/2**32 s, plus float rounding of large times.
    assert t - 2e-6 <= back <= t + 1e-6
    assert time_from_tid(tid) == pytest.approx(TimeStamp(p64(tid)).timeTime(), abs=1e-6)
    assert tid_from_time(back) in (tid, tid - 1, tid + 1)


@given(
    st.integers(min_value=0, max_value=(2200 - 1900) * 12 * 31 * 24 * 60), st.integers(0, 2**32 - 1)
)
def test_format_matches_timestamp(minutes, low):
    tid = minutes << 32 | low
    assert format_tid_time(tid) == str(TimeStamp(p64(tid)))


@given(times, st.integers(min_value=0, max_value=MAX_TID >> 1))
def test_next_tid_strictly_increasing(now, last):
    tid = next_tid(now, last)
    assert tid > last
    assert tid == max(tid_from_time(now), last + 1)


def test_next_tid_sequence_with_frozen_or_backward_clock():
    last = 0
    for now in [1000.0, 1000.0, 1000.0, 999.0, 1000.5, 1000.5]:
        tid = next_tid(now, last)
        assert tid > last
        last = tid
    assert next_tid(1000.0, 0) == tid_from_time(1000.0)


@given(
    times,
    st.integers(min_value=0, max_value=MAX_TID >> 1),
    st.integers(min_value=0, max_value=MAX_TID >> 1),
    st.integers(min_value=1, max_value=1000),
)
def test_final_tid_modulo(now, last, ttid, np):
    tid = final_tid(now, last, ttid, np)
    base = next_tid(now, last)
    assert tid > last
    assert tid >= base
    assert tid % np == ttid % np
    # Smallest such value.
    assert tid - base < np


def test_final_tid_examples():
    # The clock (1970) is behind `last`: allocation goes on from last + 1.
    last = tid_from_time(1e9) // 10 * 10
    assert final_tid(0.0, last, 7, 10) == last + 7
    assert final_tid(0.0, last + 6, 7, 10) == last + 7
    assert final_tid(0.0, last + 7, 7, 10) == last + 17
    assert final_tid(0.0, last, 7, 1) == last + 1
    # The clock is ahead: start from it.
    now = tid_from_time(KNOWN_TIME)
    assert final_tid(KNOWN_TIME, 0, now + 3, 12) == now + 3
    assert final_tid(KNOWN_TIME, 0, now, 12) == now
    assert final_tid(KNOWN_TIME, 0, now - 1, 12) == now + 11
    with pytest.raises(ValueError):
        final_tid(0.0, last, 7, 0)


def test_tid_from_user():
    assert tid_from_user("tid:0x40d4debbfcdf855") == KNOWN_TID
    assert tid_from_user("tid:0X40D4DEBBFCDF855") == KNOWN_TID
    assert tid_from_user("tid:%d" % KNOWN_TID) == KNOWN_TID
    assert tid_from_user("tid:0") == 0
    assert tid_from_user("tid:%d" % MAX_TID) == MAX_TID
    assert tid_from_user(" %r " % KNOWN_TIME) == tid_from_time(KNOWN_TIME)
    assert tid_from_user("1000") == tid_from_time(1000.0)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "tid:",
        "tid:x",
        "tid:0x",
        "tid:-1",
        "tid:+1",
        "tid:1_000",
        "tid:0o17",
        "tid:1.5",
        "tid:%d" % (MAX_TID + 1),
        "TID:1",
        "0x40d4debbfcdf855",
        "yesterday",
        "nan",
        "inf",
        "-1",
        "1e30",
    ],
)
def test_tid_from_user_rejects(text):
    with pytest.raises(ValueError):
        tid_from_user(text)
