"""The soak of tests/net: a rolling schedule of network and process
faults under history workloads, then the checker's verdict (the schedule
and its report are in schedule.py, which tests/net/test_soak.py runs for
60 s in ``make test``).  From the repository root, as root::

    .venv/bin/python -m tests.net.soak --minutes 10 --seed 1234

Options: ``--minutes`` (default 10), ``--seed`` (printed when drawn),
``--dir`` (kept; by default a temporary directory, removed when no
problem was found).  Exit status 0 when no problem was found, 1 otherwise,
2 when network namespaces cannot be made here."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from schedule import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
