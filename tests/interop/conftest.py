"""Interoperability with NEO: skipped unless NEO_SRC names NEO's source."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from neopeer import NEO_SRC, neo_available  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if neo_available():
        return
    skip = pytest.mark.skip(reason="NEO_SRC does not name NEO's source (%r); "
                            "run `make interop NEO_SRC=...`" % NEO_SRC)
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)
