"""A long-running task that dies stops its node (net/tasks.py)."""
from __future__ import annotations

import asyncio
import logging

import pytest

from callbacks import callbacks_ran
from neozodb.net.tasks import watch

pytestmark = pytest.mark.timeout(30)


class App:
    label = "S1"


def test_a_dying_task_stops_the_node_with_one_line(caplog):
    stopped = []

    async def dies():
        raise KeyError("boom")

    async def main():
        called = asyncio.get_running_loop().create_future()

        def stop():
            stopped.append(1)
            if not called.done():
                called.set_result(None)
        watch(App(), asyncio.ensure_future(dies()), "replication", stop)
        await asyncio.wait_for(called, 5)  # times out (failing) if it is never called
    with caplog.at_level(logging.ERROR, "neozodb.net"):
        asyncio.run(main())
    assert stopped == [1]
    (record,) = caplog.records
    assert record.getMessage() == "S1: replication died (KeyError: 'boom'): stopping the node"


def test_cancelled_or_finished_tasks_do_not_stop_it():
    stopped = []

    async def main():
        ok = watch(App(), asyncio.ensure_future(asyncio.sleep(0)), "a", lambda: stopped.append(1))
        cancelled = watch(App(), asyncio.ensure_future(asyncio.sleep(10)), "b",
                          lambda: stopped.append(2))
        cancelled.cancel()
        await callbacks_ran(ok)  # watch's callbacks have run: stop would have been called
        await callbacks_ran(cancelled)
    asyncio.run(main())
    assert stopped == []
