"""Every module imports on its own: no runtime import cycle hides behind
the order in which other modules happen to be imported first."""
from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import neozodb

pytestmark = pytest.mark.timeout(120)

# In one fresh interpreter: forget every neozodb module, import one, repeat.
CHECK = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "neozodb" or m.startswith("neozodb.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc().splitlines()[-1])
print("\\n".join(failed))
"""


def test_every_module_imports_on_its_own():
    names = [m.name for m in pkgutil.walk_packages(neozodb.__path__, "neozodb.")]
    assert "neozodb.master.handlers" in names and len(names) > 50
    out = subprocess.run([sys.executable, "-c", CHECK, *names], capture_output=True, text=True,
                         timeout=100)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
