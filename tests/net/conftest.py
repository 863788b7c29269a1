"""Network-fault tests: skipped, with the reason, where network namespaces
cannot be made (not root, no ip or iptables, refused by the kernel)."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import netns  # noqa: E402


@pytest.fixture(scope="session")
def netns_unavailable() -> str | None:
    """Why this machine cannot run tests/net (checked once, by making a
    namespace), None if it can; later failures are failures."""
    reason = netns.unavailable()
    if reason is None:
        name = netns.owned_name("probe")
        try:
            netns.run([netns.tool("ip"), "netns", "add", name])
        except netns.NetError as e:
            reason = "network namespaces cannot be made here: %s" % e
        else:
            netns.destroy([name])
    return reason


@pytest.fixture
def netns_ok(netns_unavailable) -> None:
    if netns_unavailable is not None:
        pytest.skip(netns_unavailable)
