"""Seeds of the randomised tests: printed, and taken from an environment
variable when it is set, so that a failure can be replayed."""
from __future__ import annotations

import os
import random


def replay_seed(variable: str, what: str) -> int:
    """The seed in ``$variable``, or a new one; printed with how to replay it."""
    seed = int(os.environ.get(variable) or random.randrange(1 << 32))
    print("%s seed %d (%s=%d replays it)" % (what, seed, variable, seed))
    return seed
