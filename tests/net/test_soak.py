"""The soak's fault schedule (tests/net/schedule.py) for 60 s in ``make
test``: partitions, one-way cuts, freezes and SIGKILLs with restarts,
one at a time, under history workloads in two client hosts; then heal,
every cell UP_TO_DATE, and the checker's verdict: nothing lost, no
problem, replicas identical.  The seed is printed;
NEOZODB_NET_SEED=<seed> replays the schedule and the transactions
(``python -m tests.net.soak --minutes 10`` is the long run)."""
from __future__ import annotations

import pytest
from schedule import report, run_soak

from seeds import replay_seed

SECONDS = 60.0

pytestmark = [pytest.mark.timeout(SECONDS + 300), pytest.mark.usefixtures("netns_ok")]


def test_fault_schedule(tmp_path):
    seed = replay_seed("NEOZODB_NET_SEED", "fault schedule")
    numbers = run_soak(str(tmp_path), SECONDS, seed)
    report(numbers)
    assert numbers["problems"] == [], "seed %d" % seed
    assert numbers["lost"] == 0
    assert numbers["acknowledged"] > 0
