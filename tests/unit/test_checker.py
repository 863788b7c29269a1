"""Which copies a replica check reports (storage/checker.py)."""
from __future__ import annotations

import pytest

from neozodb.storage.checker import odd_ones

pytestmark = pytest.mark.timeout(10)


def test_all_agree():
    assert odd_ones({1: ("a",), 2: ("a",), 3: ("a",)}, None) == set()


def test_majority_decides():
    assert odd_ones({1: ("a",), 2: ("b",), 3: ("a",)}, None) == {2}


def test_no_majority():
    assert odd_ones({1: ("a",), 2: ("b",)}, None) is None
    assert odd_ones({1: ("a",), 2: ("b",), 3: ("c",)}, None) is None


def test_reference_wins_over_majority():
    assert odd_ones({1: ("a",), 2: ("b",), 3: ("b",)}, 1) == {2, 3}
    assert odd_ones({1: ("a",), 2: ("b",)}, 2) == {1}
